"""tritonserver's other flags, so that an existing command line starts shmserve.

Each flag below takes tritonserver's value syntax. A flag whose setting changes nothing here
(a thread count, a memory pool shmserve does not have) is accepted and named in one warning at
start-up. A flag that would change what the server does in a way shmserve cannot honour
(another protocol) stops the start with a clear error, rather than
serving something the user did not ask for. Two deprecated flags map onto their successors.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

from shmserve.daemon.backend_config import without_effect
from shmserve.daemon.settings import Settings, parse_bool
from shmserve.daemon.trace_config import parse_trace_config

# A check: the value given -> why shmserve cannot honour it, or None.
Refusal = Callable[[str], str | None]


def _when_true(why: str) -> Refusal:
    return lambda value: why if _true(value) else None


def _true(value: str) -> bool:
    try:
        return parse_bool(value)
    except argparse.ArgumentTypeError:
        return True


@dataclass(frozen=True, slots=True)
class CompatFlag:
    flag: str
    refuse: Refusal | None = None   # None: accepted, without effect
    repeatable: bool = False


COMPAT_FLAGS: tuple[CompatFlag, ...] = (
    CompatFlag("--allow-sagemaker", _when_true("the SageMaker endpoint is not supported")),
    CompatFlag("--allow-vertex-ai", _when_true("the Vertex AI endpoint is not supported")),
    CompatFlag("--model-namespacing", _when_true("model namespacing is not supported")),
    CompatFlag("--backend-directory"),
    CompatFlag("--trace-file"),
    CompatFlag("--trace-level", repeatable=True),
    CompatFlag("--trace-rate"),
    CompatFlag("--trace-count"),
    CompatFlag("--trace-log-frequency"),
    CompatFlag("--cache-directory"),
    CompatFlag("--pinned-memory-pool-byte-size"),
    CompatFlag("--cuda-memory-pool-byte-size", repeatable=True),
    CompatFlag("--cuda-virtual-address-size", repeatable=True),
    CompatFlag("--min-supported-compute-capability"),
    CompatFlag("--buffer-manager-thread-count"),
    CompatFlag("--model-load-thread-count"),
    CompatFlag("--model-load-gpu-limit", repeatable=True),
    CompatFlag("--enable-peer-access"),
    CompatFlag("--http-thread-count"),
    CompatFlag("--grpc-infer-allocation-pool-size"),
    CompatFlag("--grpc-infer-response-compression-level"),
    CompatFlag("--sagemaker-port"),
    CompatFlag("--sagemaker-safe-port-range"),
    CompatFlag("--sagemaker-thread-count"),
    CompatFlag("--vertex-ai-port"),
    CompatFlag("--vertex-ai-thread-count"),
    CompatFlag("--vertex-ai-default-model"),
)
# tritonserver's older trace flags -> their --trace-config form.
TRACE_FLAGS = {"--trace-file": "triton,file", "--trace-level": "level",
               "--trace-rate": "rate", "--trace-count": "count",
               "--trace-log-frequency": "triton,log-frequency"}
# Deprecated tritonserver flags with a successor here.
STRICT_MODEL_CONFIG = "--strict-model-config"        # true: --disable-auto-complete-config
RESPONSE_CACHE_BYTES = "--response-cache-byte-size"  # N: --cache-config local,size=N


def _dest(flag: str) -> str:
    return "tritonserver_" + flag.lstrip("-").replace("-", "_")


def add_compat_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "tritonserver's other flags", "accepted so that tritonserver command lines start "
        "shmserve; those without an effect here are named in a warning at start-up, and those "
        "shmserve cannot honour (SageMaker, Vertex AI, model namespacing) stop the start")
    for compat in COMPAT_FLAGS:
        group.add_argument(compat.flag, dest=_dest(compat.flag), metavar="VALUE",
                           action="append" if compat.repeatable else "store",
                           help=argparse.SUPPRESS)
    group.add_argument(STRICT_MODEL_CONFIG, dest=_dest(STRICT_MODEL_CONFIG), type=parse_bool,
                       metavar="BOOL", help="deprecated: true is --disable-auto-complete-config")
    group.add_argument(RESPONSE_CACHE_BYTES, dest=_dest(RESPONSE_CACHE_BYTES), type=int,
                       metavar="BYTES", help="deprecated: --cache-config local,size=BYTES")


def apply_compat_flags(args: argparse.Namespace, settings: Settings) -> list[str]:
    """Map the deprecated flags onto ``settings``; the flags given without effect (for a
    warning). Raises ValueError naming a flag that cannot be honoured."""
    ignored: list[str] = []
    for compat in COMPAT_FLAGS:
        given = getattr(args, _dest(compat.flag), None)
        if given is None:
            continue
        if compat.flag in TRACE_FLAGS:
            for value in given if isinstance(given, list) else [given]:
                try:
                    entry = parse_trace_config(f"{TRACE_FLAGS[compat.flag]}={value}")
                except argparse.ArgumentTypeError as exc:
                    raise ValueError(f"{compat.flag}={value}: {exc}") from None
                settings.trace_config = [*settings.trace_config, entry]
            continue
        for value in given if isinstance(given, list) else [given]:
            why = compat.refuse(value) if compat.refuse is not None else None
            if why is not None:
                raise ValueError(f"{compat.flag}={value}: {why}")
        ignored.append(compat.flag)
    ignored += [f"--backend-config={text}" for text in without_effect(settings.backend_config)]
    if getattr(args, _dest(STRICT_MODEL_CONFIG), None):
        settings.disable_auto_complete_config = True
    size = getattr(args, _dest(RESPONSE_CACHE_BYTES), None)
    if size is not None and size > 0:
        settings.cache_config = [*settings.cache_config, ("local", "size", str(size))]
    return ignored
