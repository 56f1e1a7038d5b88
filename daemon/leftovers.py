"""Find and end the processes a dead server of this user left behind.

Every fork server and worker carries its supervisor's pid in its environment
(workers/lineage.py). A process whose supervisor is gone, and that belongs to this user, is a
leftover: a new start ends it before it cleans the dead server's arenas, so a worker still
executing for a dead server can neither hold a GPU nor recreate a segment.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time

from shmserve.workers.lineage import SUPERVISOR_ENV, process_alive

log = logging.getLogger("shmserve")
_MARKER = SUPERVISOR_ENV.encode() + b"="


def _supervisor_of(pid: int) -> int | None:
    """The supervisor pid a process carries, or None (not ours, gone, or unreadable)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as environ:
            variables = environ.read().split(b"\0")
    except OSError:
        return None
    for variable in variables:
        if variable.startswith(_MARKER):
            with contextlib.suppress(ValueError):
                return int(variable[len(_MARKER):])
    return None


def find_leftovers() -> list[int]:
    """Pids of this user's processes whose shmserve supervisor is dead."""
    me, uid = os.getpid(), os.geteuid()
    found: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        pid = int(entry)
        supervisor = _supervisor_of(pid)
        if supervisor is None or supervisor == me or process_alive(supervisor):
            continue
        with contextlib.suppress(OSError):
            if os.stat(f"/proc/{pid}").st_uid == uid:
                found.append(pid)
    return found


def end_leftovers(timeout: float = 5.0) -> list[int]:
    """SIGKILL every leftover and wait (briefly) until they are gone; returns their pids."""
    pids = find_leftovers()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while any(process_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.01)
    if pids:
        log.warning("ended %d process(es) left by dead shmserve server(s): %s", len(pids),
                    " ".join(map(str, pids)))
    return pids
