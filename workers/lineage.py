"""Tie every process of a server to its supervisor's life.

The supervisor exports its pid as ``SHMSERVE_SUPERVISOR_PID`` before it starts the fork server,
so the fork server and every worker carry it: a later start recognises the leftovers of a dead
server (daemon/leftovers.py). The fork server (a child of the supervisor) and each worker (a
child of the fork server) ask the kernel for SIGKILL when their parent dies, so a SIGKILLed
supervisor takes the fork server with it, and the fork server its workers, even busy or
stopped ones.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal

SUPERVISOR_ENV = "SHMSERVE_SUPERVISOR_PID"
_PR_SET_PDEATHSIG = 1


def set_parent_death_signal(signum: int = signal.SIGKILL) -> None:
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signum)


def die_with_supervisor() -> None:
    """For the fork server: SIGKILL when the supervisor dies; exit at once if it already
    did (the signal is only sent for deaths after the request)."""
    set_parent_death_signal()
    supervisor = os.environ.get(SUPERVISOR_ENV)
    if supervisor and os.getppid() != int(supervisor):
        os._exit(1)


def process_alive(pid: int) -> bool:
    """Whether ``pid`` exists (another user's process counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
