"""Physical ceilings measured in the same run: one host memcpy and (on a GPU) one D2D copy."""

from __future__ import annotations

import statistics
import time
from typing import Any

import numpy as np

from bench.shm import check_cuda, cuda_runtime


def _repeats(nbytes: int, budget_s: float) -> int:
    # Roughly: 1 GB/s worst case, at least 5 and at most 2000 repetitions.
    estimate = max(nbytes / 1e9, 2e-6)
    return int(min(2000, max(5, budget_s / estimate)))


def memcpy(nbytes: int, budget_s: float = 0.5) -> dict[str, Any]:
    """Median time of one NumPy copy of ``nbytes`` between two pre-faulted buffers."""
    count = max(1, nbytes // 4)
    src = np.arange(count, dtype=np.float32)
    dst = np.zeros_like(src)
    np.copyto(dst, src)   # fault in the destination pages
    times: list[float] = []
    for _ in range(_repeats(nbytes, budget_s)):
        started = time.perf_counter_ns()
        np.copyto(dst, src)
        times.append(time.perf_counter_ns() - started)
    if not np.array_equal(dst, src):
        raise AssertionError("memcpy ceiling copied the wrong bytes")
    median_ns = statistics.median(times)
    return {"bytes": nbytes, "p50_ms": median_ns / 1e6, "min_ms": min(times) / 1e6,
            "gb_per_s": nbytes / median_ns if median_ns else float("nan"),
            "repeats": len(times)}


def gpu_copy(nbytes: int, budget_s: float = 0.5) -> dict[str, Any]:
    """Median time of one device-to-device copy (cudaMemcpy), or a skip reason."""
    try:
        rt = cuda_runtime()
    except RuntimeError as exc:
        return {"bytes": nbytes, "skipped": str(exc)}
    src = dst = None
    try:
        check_cuda(rt.cudaSetDevice(0))
        src = check_cuda(rt.cudaMalloc(nbytes))
        dst = check_cuda(rt.cudaMalloc(nbytes))
        check_cuda(rt.cudaMemset(src, 7, nbytes))
        kind = rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice
        check_cuda(rt.cudaMemcpy(dst, src, nbytes, kind))
        check_cuda(rt.cudaDeviceSynchronize())
        times: list[float] = []
        for _ in range(_repeats(nbytes // 50, budget_s)):
            started = time.perf_counter_ns()
            check_cuda(rt.cudaMemcpy(dst, src, nbytes, kind))
            check_cuda(rt.cudaDeviceSynchronize())
            times.append(time.perf_counter_ns() - started)
        median_ns = statistics.median(times)
        return {"bytes": nbytes, "p50_ms": median_ns / 1e6, "min_ms": min(times) / 1e6,
                "gb_per_s": nbytes / median_ns, "repeats": len(times)}
    except Exception as exc:
        return {"bytes": nbytes, "skipped": f"CUDA copy failed: {exc}"}
    finally:
        for pointer in (src, dst):
            if pointer is not None:
                rt.cudaFree(pointer)
