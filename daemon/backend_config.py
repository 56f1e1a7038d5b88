"""tritonserver's ``--backend-config [<backend>,]<setting>=<value>``.

Of the global settings, ``default-max-batch-size`` acts here: the max_batch_size an ONNX
model's auto-completed config gets when the model batches and its config names none
(Triton's default 4; 0 turns batching off). Per-backend settings are kept and listed in a
warning at start-up: they tune Triton's own backends (the python stub's shared memory, ORT's
global thread pool, ...) and have no effect here. Standard library only (the settings table
imports it)."""

from __future__ import annotations

import argparse
from collections.abc import Iterable

DEFAULT_MAX_BATCH_SIZE = 4
ACTING = frozenset({("", "default-max-batch-size")})


def parse_backend_config(text: str) -> tuple[str, str, str]:
    """(backend or "" for global, setting, value)."""
    head, sep, value = text.rpartition("=")
    if not sep or not head:
        raise argparse.ArgumentTypeError(
            f"expected [<backend>,]<setting>=<value>, got '{text}'")
    backend, _, setting = head.rpartition(",")
    if not setting:
        raise argparse.ArgumentTypeError(f"no setting name in '{text}'")
    if (backend, setting) == ("", "default-max-batch-size"):
        try:
            if int(value) < 0:
                raise ValueError
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"default-max-batch-size must be a number >= 0, got '{value}'") from None
    return backend, setting, value


def default_max_batch_size(entries: Iterable[tuple[str, str, str]]) -> int:
    found = DEFAULT_MAX_BATCH_SIZE
    for backend, setting, value in entries:
        if (backend, setting) == ("", "default-max-batch-size"):
            found = int(value)
    return found


def without_effect(entries: Iterable[tuple[str, str, str]]) -> list[str]:
    """The given settings that change nothing here, as written."""
    return [f"{backend + ',' if backend else ''}{setting}={value}"
            for backend, setting, value in entries if (backend, setting) not in ACTING]
