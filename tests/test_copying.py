"""workers/copying.py: large copies split across cores land byte for byte, on real threads."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

import numpy as np
import pytest

from shmserve.workers import copying


def _copy_threads() -> set[str]:
    return {thread.name for thread in threading.enumerate()
            if thread.name.startswith("shmserve-copy")}


@pytest.mark.parametrize("nbytes", [0, 1, copying.MIN_CHUNK - 1, 2 * copying.MIN_CHUNK,
                                    4 * copying.MIN_CHUNK + 4099, 9 * copying.MIN_CHUNK + 1])
def test_every_byte_lands_where_it_belongs(nbytes: int) -> None:
    source = np.random.default_rng(nbytes).integers(0, 256, nbytes, dtype=np.uint8)
    target = bytearray(nbytes + 2)  # guard bytes on both sides stay untouched
    target[0] = target[-1] = 0xA5
    copying.copy_bytes(memoryview(target)[1:nbytes + 1], source.tobytes())
    assert target[0] == 0xA5 and target[-1] == 0xA5
    assert bytes(target[1:nbytes + 1]) == source.tobytes()


def _in_fresh_process(body: Callable[[], bool]) -> bool:
    """``body``'s verdict, run in a forked child: no copy pool from earlier tests."""
    pid = os.fork()
    if pid == 0:
        verdict = False
        try:
            verdict = body()
        finally:
            os._exit(0 if verdict else 1)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) == 0


def _copies_on_several_threads(cores: set[int]) -> bool:
    os.sched_setaffinity(0, cores)
    source = np.arange(copying.MIN_CHUNK, dtype=np.float32)  # 4 chunks
    target = np.zeros_like(source)
    copying.copy_bytes(target.data, source.data)
    return bool(np.array_equal(target, source)) and bool(_copy_threads())


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores")
def test_large_copy_uses_a_second_thread_on_two_cores() -> None:
    two = set(sorted(os.sched_getaffinity(0))[:2])
    assert _in_fresh_process(lambda: _copies_on_several_threads(two))


def test_one_core_copies_on_the_calling_thread_only() -> None:
    one = {min(os.sched_getaffinity(0))}
    assert _in_fresh_process(lambda: not _copies_on_several_threads(one))


def test_sizes_must_match() -> None:
    with pytest.raises(ValueError, match="copy of 8 bytes into 4"):
        copying.copy_bytes(memoryview(bytearray(4)), b"\0" * 8)
