"""The server's log, as tritonserver's flags and its logging API shape it.

``--log-file`` sends the process's stdout and stderr there (appending), before any worker or
frontend starts, so every process's lines land in it. ``--log-info``, ``--log-warning`` and
``--log-error`` switch the messages of that level on or off, ``--log-verbose`` adds DEBUG
messages, and ``--log-format ISO8601`` prints UTC timestamps as ``YYYY-MM-DDThh:mm:ssZ``; in
the supervisor here, and in workers through ``log_switches`` (workers/log_switches.py). The
logging API (gRPC LogSettings, HTTP /v2/logging) reads and changes the same settings at run
time, with Triton's texts for bad values. Frontend processes keep the settings they started
with.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

from shmserve.daemon.errors import invalid_argument, unimplemented
from shmserve.daemon.settings import Settings
from shmserve.workers.protocol import LogSwitches

DEFAULT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOG_FORMATS = ("default", "ISO8601")


def redirect_output(path: str) -> None:
    """Append stdout and stderr (file descriptors 1 and 2, inherited by every child) to
    ``path``. Raises OSError when it cannot be opened."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(fd, 1)
        os.dup2(fd, 2)
    finally:
        os.close(fd)


class _LevelSwitch(logging.Filter):
    """Drops INFO, WARNING or ERROR (and above) records while their switch is off."""

    def __init__(self, settings: Settings) -> None:
        super().__init__()
        self._settings = settings

    def filter(self, record: logging.LogRecord) -> bool:
        settings = self._settings
        if record.levelno >= logging.ERROR:
            return settings.log_error
        if record.levelno >= logging.WARNING:
            return settings.log_warning
        if record.levelno >= logging.INFO:
            return settings.log_info
        return True


def _formatter(log_format: str) -> logging.Formatter:
    if log_format == "ISO8601":
        formatter = logging.Formatter(DEFAULT_FORMAT, datefmt="%Y-%m-%dT%H:%M:%SZ")
        formatter.converter = time.gmtime
        return formatter
    return logging.Formatter(DEFAULT_FORMAT)


def _our_handlers() -> list[logging.Handler]:
    return [handler for handler in logging.getLogger().handlers
            if getattr(handler, "shmserve_server_log", False)]


def install_server_log(settings: Settings) -> None:
    """The root logger writes to stderr through our level switches and format."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.shmserve_server_log = True  # type: ignore[attr-defined]
    handler.addFilter(_LevelSwitch(settings))
    root.addHandler(handler)
    _apply(settings)


def _apply(settings: Settings) -> None:
    for handler in _our_handlers():
        handler.setFormatter(_formatter(settings.log_format))
    level = logging.DEBUG if settings.log_verbose else logging.INFO
    logging.getLogger().setLevel(level)
    logging.getLogger("shmserve").setLevel(level)


def update_log_setting(settings: Settings, key: str, value: Any, kind: str) -> None:
    """One setting from the logging API (``kind``: the value's parameter type name); raises
    ServeError with Triton's texts."""
    if key == "log_file":
        raise unimplemented("log file location can not be updated through network protocol")
    if key in ("log_info", "log_warning", "log_error"):
        if kind != "bool_param":
            raise invalid_argument(f"expect boolean for '{key}'")
        setattr(settings, key, bool(value))
    elif key == "log_verbose_level":
        if kind != "uint32_param":
            raise invalid_argument(f"expect uint32 for '{key}'")
        settings.log_verbose = int(value)
    elif key == "log_format":
        if kind != "string_param":
            raise invalid_argument(f"expect string for '{key}'")
        if value not in LOG_FORMATS:
            raise invalid_argument(f"invalid argument for log_format, got: {value}")
        settings.log_format = str(value)
    else:
        raise invalid_argument(f"unsupported log setting '{key}'")
    _apply(settings)


def log_switches(settings: Settings) -> LogSwitches:
    """What workers follow of the log settings."""
    return LogSwitches(settings.log_info, settings.log_warning, settings.log_error,
                       settings.log_verbose, settings.log_format == "ISO8601")


def log_settings(settings: Settings) -> dict[str, Any]:
    """Every log setting's value, as the logging API answers them."""
    return {"log_file": settings.log_file, "log_info": settings.log_info,
            "log_warning": settings.log_warning, "log_error": settings.log_error,
            "log_verbose_level": settings.log_verbose, "log_format": settings.log_format}
