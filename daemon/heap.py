"""The C heap of a process serving gRPC (the supervisor, a frontend process): large buffers
reused while requests come, given back once idle.

A large request or response allocates buffers of its size every time: gRPC's join of the
received message, the response we fill (frontend/wire.py), gRPC's own copy of it. glibc
serves blocks above its mmap threshold (at most 32 MiB) with fresh mappings, unmapped when
freed, and trims smaller ones off the heap as they are freed: each request's buffers were new
pages, every page faulted in and zeroed again (a 16 MiB response: 8,192 faults, about 12 ms of
CPU; 64 MiB: 32,770 faults, about 55 ms). So here large blocks come from the heap (mmap
off), a freed block at the heap's top stays for the next request up to ``KEEP_BYTES`` (beyond
it ``free`` gives it back at once, so one huge request never leaves its size behind), and a
timer gives every free page back (``trim_heap``) once the process is idle after work.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import resource
from typing import Any

from shmserve.workers.shm import trim_heap

__all__ = ["KEEP_BYTES", "HeapTrimmer", "heap_free_bytes", "keep_large_buffers", "trim_heap"]
log = logging.getLogger("shmserve.heap")

KEEP_BYTES = 256 << 20   # free() trims the heap's top beyond this (glibc M_TRIM_THRESHOLD)
TRIM_CHECK_SECS = 1.0    # how often the process's page faults are looked at
TRIM_ABOVE_BYTES = 16 << 20  # free bytes worth giving back
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def _libc_function(name: str) -> Any:
    with contextlib.suppress(OSError, AttributeError):
        return getattr(ctypes.CDLL("libc.so.6"), name)
    return None


def keep_large_buffers() -> bool:
    """Large blocks from the heap, kept across requests (see above); False where the C
    library is not glibc (nothing changes then)."""
    mallopt = _libc_function("mallopt")
    if mallopt is None or _libc_function("mallinfo2") is None:
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # One arena: only the main arena's free pages can all be given back (malloc_trim leaves a
    # thread arena's top alone, and gRPC's threads would keep theirs); before gRPC starts
    # its threads.
    return bool(mallopt(_M_ARENA_MAX, 1)) and bool(mallopt(_M_MMAP_MAX, 0)) \
        and bool(mallopt(_M_TRIM_THRESHOLD, KEEP_BYTES))


def heap_free_bytes() -> int:
    """Free bytes in the C heap's chunks (glibc ``mallinfo2().fordblks``; 0 elsewhere)."""
    mallinfo2 = _libc_function("mallinfo2")
    if mallinfo2 is None:
        return 0
    mallinfo2.restype = _MallInfo2
    return int(mallinfo2().fordblks)


class HeapTrimmer:
    """Every ``TRIM_CHECK_SECS``: once the process is idle after work that touched new pages
    (its minor page faults grew during a period, then not during the next), the heap's free
    pages go back to the system, if there are many. Once per burst of work: a trimmed heap
    still counts its free bytes, only new faults tell that it was used again."""

    def __init__(self) -> None:
        self._timer: asyncio.TimerHandle | None = None
        self._faults = 0
        self._used = False  # pages were faulted in since the last trim

    def start(self) -> None:
        if keep_large_buffers():
            self._faults = _minor_faults()
            self._schedule()

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _schedule(self) -> None:
        self._timer = asyncio.get_running_loop().call_later(TRIM_CHECK_SECS, self._check)

    def _check(self) -> None:
        faults = _minor_faults()
        if faults != self._faults:  # at work: keep the pages for the next request
            self._faults, self._used = faults, True
        elif self._used:
            self._used = False
            free = heap_free_bytes()
            if free >= TRIM_ABOVE_BYTES:
                trim_heap()
                log.debug("heap trimmed (%d MiB free)", free >> 20)
            self._faults = _minor_faults()
        self._schedule()


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
