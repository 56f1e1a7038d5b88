"""An embedded server's keyword settings -> the ``shmserve serve`` command line.

The keywords are the settings table's names (daemon/settings.py), checked here with the
table's own parsers so a wrong name or value fails in the host program, before any process
starts.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import MISSING
from typing import Any

from shmserve.daemon.settings import SettingSpec, parse_bool, setting_fields

# Set by shmserve.Server itself: the pipe that ties the server to the host program.
MANAGED = frozenset({"lifeline_fd"})


def _text(name: str, value: Any, spec: SettingSpec) -> str:
    if isinstance(value, bool) or spec.parse is parse_bool:
        if not isinstance(value, bool):
            raise TypeError(f"shmserve.Server: setting '{name}' takes True or False, "
                            f"got {value!r}")
        return "true" if value else "false"
    if isinstance(value, tuple) and len(value) == 3:  # a parsed --grpc-restricted-protocol
        groups, key, rule_value = value
        return f"{','.join(sorted(groups))}:{key}={rule_value}"
    return str(value)


def _checked(name: str, value: Any, spec: SettingSpec) -> str:
    text = _text(name, value, spec)
    try:
        spec.parse(text)
    except (ValueError, argparse.ArgumentTypeError) as exc:
        raise ValueError(f"shmserve.Server: setting '{name}'={value!r}: {exc}") from None
    if spec.choices is not None and text not in spec.choices:
        raise ValueError(f"shmserve.Server: setting '{name}'={value!r}: choose from "
                         f"{', '.join(spec.choices)}")
    return text


def serve_arguments(settings: Mapping[str, Any]) -> list[str]:
    """``serve``'s flags for these settings (only those given; the rest keep the table's
    defaults). Raises TypeError for an unknown name and ValueError for a bad value."""
    table = {item.name: (item, spec) for item, spec in setting_fields()}
    unknown = sorted(set(settings) - set(table))
    if unknown:
        raise TypeError(f"shmserve.Server: unknown setting(s) {', '.join(unknown)}; the "
                        f"settings are {', '.join(sorted(table))} (see shmserve serve --help)")
    arguments: list[str] = []
    for name, value in settings.items():
        item, spec = table[name]
        if name in MANAGED or spec.flag is None:
            raise TypeError(f"shmserve.Server: setting '{name}' cannot be given here "
                            f"({'the server sets it' if name in MANAGED else 'internal'})")
        if value is None:
            if item.default is not None or item.default is MISSING:
                raise ValueError(f"shmserve.Server: setting '{name}' cannot be None")
            continue
        if spec.repeatable:
            if isinstance(value, str | tuple):
                value = [value]
            for element in value:
                arguments.append(f"{spec.flag}={_checked(name, element, spec)}")
            continue
        arguments.append(f"{spec.flag}={_checked(name, value, spec)}")
    return arguments
