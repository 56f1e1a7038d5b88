"""The trace settings as given on the command line (``--trace-config``, tritonserver's
syntax). Standard library only: the settings table imports it, and ``import shmserve`` must
stay light (no gRPC)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, replace

LEVELS = ("OFF", "TIMESTAMPS", "TENSORS")
MIN_TRACE_COUNT = -1


@dataclass(frozen=True, slots=True)
class TraceConfig:
    level: tuple[str, ...] = ("OFF",)
    rate: int = 1000
    count: int = -1
    log_frequency: int = 0
    file: str = ""


def parse_trace_config(text: str) -> tuple[str, str]:
    """One ``--trace-config``: (key, value), a triton-mode key written ``triton,key``."""
    mode, _, rest = text.partition(",")
    if rest:
        if mode == "opentelemetry":
            raise argparse.ArgumentTypeError("the opentelemetry trace mode is not supported; "
                                             "use the triton mode (a trace file)")
        if mode != "triton":
            raise argparse.ArgumentTypeError(f"unknown trace mode '{mode}' in '{text}'")
        key, _, value = rest.partition("=")
        if key not in ("file", "log-frequency"):
            raise argparse.ArgumentTypeError(f"unknown triton trace setting '{key}'")
    else:
        key, _, value = text.partition("=")
        if key not in ("level", "rate", "count", "mode"):
            raise argparse.ArgumentTypeError(f"unknown trace setting '{key}' in '{text}'")
        if key == "mode" and value != "triton":
            raise argparse.ArgumentTypeError(
                f"trace mode '{value}' is not supported; use the triton mode")
        if key == "level" and value.upper() not in LEVELS:
            raise argparse.ArgumentTypeError(f"unknown trace level '{value}'")
    if key in ("rate", "count", "log-frequency"):
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number for {key}, got '{value}'"
                                             ) from None
        if number < (MIN_TRACE_COUNT if key == "count" else 0):
            raise argparse.ArgumentTypeError(f"{key} out of range, got '{value}'")
    return key, value


def config_from(entries: list[tuple[str, str]]) -> TraceConfig:
    config = TraceConfig()
    levels: list[str] = []
    for key, value in entries:
        if key == "level":
            levels.append(value.upper())
        elif key == "rate":
            config = replace(config, rate=int(value))
        elif key == "count":
            config = replace(config, count=int(value))
        elif key == "log-frequency":
            config = replace(config, log_frequency=int(value))
        elif key == "file":
            config = replace(config, file=value)
    if levels:
        on = tuple(level for level in ("TIMESTAMPS", "TENSORS") if level in levels)
        config = replace(config, level=on or ("OFF",))
    return config
