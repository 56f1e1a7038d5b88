"""The systemd unit shipped with shmserve (``shmserve.service``, Type=notify)."""

from __future__ import annotations

from pathlib import Path

UNIT_NAME = "shmserve.service"


def unit_path() -> Path:
    return Path(__file__).resolve().parent / UNIT_NAME


def unit_text() -> str:
    return unit_path().read_text()
