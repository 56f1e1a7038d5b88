"""One time budget shared by the phases of a shutdown or an unload.

SIGTERM gives the whole shutdown ``--exit-timeout-secs``: draining in-flight requests may use
it up to a reserve kept for stopping the workers (a worker still executing then is killed),
and a last moment is kept for closing the gRPC server. systemd's ``TimeoutStopSec`` must stay
above it (systemd/shmserve.service: 60 s against the default 30 s).
"""

from __future__ import annotations

import time


class TimeBudget:
    def __init__(self, seconds: float) -> None:
        seconds = max(seconds, 0.0)
        self.end = time.monotonic() + seconds
        self._stop_reserve = min(5.0, seconds / 4)   # for stopping workers
        self._close_reserve = min(0.5, seconds / 10)  # for closing the server

    def left(self) -> float:
        return max(0.0, self.end - time.monotonic())

    def for_draining(self) -> float:
        """How long in-flight requests may still be waited for."""
        return max(0.0, self.left() - self._stop_reserve)

    def for_stopping(self) -> float:
        """How long workers may take to finalize before they are killed."""
        return max(0.0, self.left() - self._close_reserve)
