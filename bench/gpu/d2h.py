"""Device-to-host copy of 64 MiB into fresh pageable, reused pageable, reused pinned
(cudaHostRegister) and reused mmap'ed host memory, next to a host memcpy: medians of 20, in ms.

Run on a GPU host with torch and cuda-python: ``python3 bench/gpu/d2h.py``.
"""

from __future__ import annotations

import mmap
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from cuda.bindings import runtime as rt

NBYTES = 64 << 20


def median_ms(fn: Callable[[], None], reps: int = 20) -> float:
    fn()
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def main() -> None:
    source = torch.full((NBYTES,), 7, dtype=torch.uint8, device="cuda")
    pointer = source.data_ptr()
    kind = rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
    reused = np.empty(NBYTES, np.uint8)
    pinned = np.empty(NBYTES, np.uint8)
    start = time.perf_counter()
    print("cudaHostRegister", rt.cudaHostRegister(pinned.ctypes.data, NBYTES, 0),
          f"{(time.perf_counter() - start) * 1e3:.1f} ms")
    mapped = np.frombuffer(mmap.mmap(-1, NBYTES), np.uint8)

    def into(target: np.ndarray | None) -> Callable[[], None]:
        def copy() -> None:
            host = np.empty(NBYTES, np.uint8) if target is None else target
            rt.cudaMemcpy(host.ctypes.data, pointer, NBYTES, kind)
        return copy

    cases: list[tuple[str, Callable[[], None]]] = [
        ("fresh pageable", into(None)), ("reused pageable", into(reused)),
        ("reused pinned", into(pinned)), ("reused mmap", into(mapped)),
        ("numpy host memcpy", lambda: np.copyto(reused, pinned))]
    for name, fn in cases:
        ms = median_ms(fn)
        print(f"{name:20s} {ms:8.3f} ms  {NBYTES / ms / 1e6:6.1f} GB/s")


if __name__ == "__main__":
    main()
