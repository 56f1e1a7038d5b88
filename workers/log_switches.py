"""A worker's log follows the server's log settings: INFO, WARNING and ERROR switched on or
off, DEBUG with a verbose level, ISO 8601 timestamps (protocol.LogSwitches, in the spec at
start and in LOG_SWITCHES frames when the logging API changes them)."""

from __future__ import annotations

import logging
import time

from shmserve.workers.protocol import LogSwitches


class LogSwitchFilter(logging.Filter):
    """Drops the records of a level that is switched off."""

    def __init__(self) -> None:
        super().__init__()
        self.switches = LogSwitches()

    def filter(self, record: logging.LogRecord) -> bool:
        switches = self.switches
        if record.levelno >= logging.ERROR:
            return switches.error
        if record.levelno >= logging.WARNING:
            return switches.warning
        if record.levelno >= logging.INFO:
            return switches.info
        return switches.verbose > 0


def apply_switches(switches: LogSwitches, log_filter: LogSwitchFilter,
                   handlers: list[logging.Handler]) -> None:
    """Follow ``switches`` from now on: the filter's levels and the handlers' timestamps."""
    log_filter.switches = switches
    for handler in handlers:
        formatter = handler.formatter
        if formatter is None:
            continue
        if switches.iso8601:
            formatter.datefmt = "%Y-%m-%dT%H:%M:%SZ"
            formatter.converter = time.gmtime
        else:
            formatter.datefmt = None
            formatter.converter = time.localtime
