"""The worker's reporter thread: tells the supervisor what the model says about itself.

Off the execute loop: every ``REPORT_INTERVAL_SECS`` it asks the backend for the model's own
readiness (Triton's optional ``is_ready()``) and its custom metrics' generation, and sends a
``Report`` frame only when either changed. So ``/metrics`` and ModelReady lag the model by at
most one interval (Triton asks the stub on each ModelReady and reads metrics at scrape time).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from shmserve.workers import protocol
from shmserve.workers.backend import Backend

REPORT_INTERVAL_SECS = 0.2

log = logging.getLogger("shmserve.worker")


def run_reporter(backend: Backend, send: Callable[[list[Any]], None],
                 stopped: threading.Event) -> None:
    last: tuple[int, int] | None = None
    while True:
        ready = backend.model_readiness()
        ready_code = protocol.READY_UNDEFINED if ready is None else int(ready)
        generation, metrics = backend.custom_metrics()
        if (ready_code, generation) != last:
            try:
                send(protocol.Report(ready_code, metrics).pack())
            except OSError:
                return
            last = (ready_code, generation)
        if stopped.wait(REPORT_INTERVAL_SECS):
            return


def start_reporter(backend: Backend, send: Callable[[list[Any]], None],
                   stopped: threading.Event) -> threading.Thread:
    thread = threading.Thread(target=run_reporter, args=(backend, send, stopped),
                              name="reporter", daemon=True)
    thread.start()
    return thread
