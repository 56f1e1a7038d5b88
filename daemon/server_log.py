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
from typing import Any

from shmserve.daemon.errors import invalid_argument, unimplemented
from shmserve.daemon.settings import Settings
from shmserve.workers.log_switches import LogSwitchFilter, apply_switches
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


# The supervisor's handler filter: the same switches workers follow.
_SWITCH_FILTER = LogSwitchFilter()


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
    handler.setFormatter(logging.Formatter(DEFAULT_FORMAT))
    handler.addFilter(_SWITCH_FILTER)
    root.addHandler(handler)
    _apply(settings)


def _apply(settings: Settings) -> None:
    apply_switches(log_switches(settings), _SWITCH_FILTER, _our_handlers())
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
