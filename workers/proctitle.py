"""A readable title for worker processes in ``ps``/``top``: ``shmserve worker <model>
<instance>``.

The command line (what ``ps aux`` shows) can only be rewritten by overwriting the process's
argv memory, which Python cannot do itself: the ``setproctitle`` package does it. The short
name (``comm``: ``ps -o comm``, ``top``, ``pgrep``; 15 bytes) is set with prctl(PR_SET_NAME).
"""

from __future__ import annotations

import contextlib
import ctypes
import os

_PR_SET_NAME = 15
COMM_LENGTH = 15


def worker_title(model: str, instance: str) -> str:
    return f"shmserve worker {model} {instance}"


def set_process_title(title: str, short_name: str) -> None:
    """Best effort: a title nobody can read is no reason for a worker to fail."""
    # Without SPT_NOENV, setproctitle reuses the environment's memory for a long title, and
    # /proc/<pid>/environ loses the supervisor pid that daemon/leftovers.py looks for.
    os.environ.setdefault("SPT_NOENV", "1")
    with contextlib.suppress(ImportError):
        from setproctitle import setproctitle
        setproctitle(title)
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_NAME, short_name.encode()[:COMM_LENGTH], 0, 0, 0)
