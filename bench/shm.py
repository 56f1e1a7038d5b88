"""Client-side shared memory for the bench: POSIX segments (posix_ipc + mmap) and CUDA buffers.

Segments are never created with ``multiprocessing.shared_memory`` (its resource tracker may
unlink segments it does not own). Every segment this module creates is unlinked when it is
closed, and at interpreter exit at the latest.
"""

from __future__ import annotations

import atexit
import contextlib
import mmap
import os
import weakref
from typing import Any

import numpy as np
import posix_ipc

KEY_PREFIX = "/shmserve_bench_"
_live: weakref.WeakSet[SystemRegion] = weakref.WeakSet()


class SystemRegion:
    """A POSIX shared-memory segment created (and later unlinked) by the bench."""

    def __init__(self, tag: str, byte_size: int) -> None:
        self.key = f"{KEY_PREFIX}{os.getpid()}_{tag}"
        self.byte_size = byte_size
        with contextlib.suppress(posix_ipc.ExistentialError):
            posix_ipc.unlink_shared_memory(self.key)
        shm = posix_ipc.SharedMemory(self.key, posix_ipc.O_CREX, mode=0o600, size=byte_size)
        try:
            self._mmap: mmap.mmap | None = mmap.mmap(shm.fd, byte_size)
        except BaseException:
            posix_ipc.unlink_shared_memory(self.key)
            raise
        finally:
            shm.close_fd()
        self._closed = False
        _live.add(self)

    def array(self, dtype: Any, count: int, offset: int = 0) -> np.ndarray:
        assert self._mmap is not None
        return np.frombuffer(self._mmap, dtype=dtype, count=count, offset=offset)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(posix_ipc.ExistentialError):
            posix_ipc.unlink_shared_memory(self.key)
        if self._mmap is not None:
            with contextlib.suppress(BufferError):  # a live NumPy view: the GC unmaps later
                self._mmap.close()
            self._mmap = None

    def __enter__(self) -> SystemRegion:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()



def has_gpu() -> bool:
    """Whether the NVIDIA driver lists a GPU on this host (nothing CUDA is loaded to ask)."""
    gpus = "/proc/driver/nvidia/gpus"
    return os.path.isdir(gpus) and bool(os.listdir(gpus))

def leftover_segments() -> list[str]:
    """Segments of this process still in /dev/shm (should be none after close)."""
    prefix = f"{KEY_PREFIX}{os.getpid()}_".lstrip("/")
    with contextlib.suppress(OSError):
        return sorted(name for name in os.listdir("/dev/shm") if name.startswith(prefix))
    return []


@atexit.register
def _close_all() -> None:
    for region in list(_live):
        region.close()


# --- CUDA (only on a GPU host with cuda-python) ---------------------------------------------
def cuda_runtime() -> Any:
    """The cuda-python runtime module, or raise RuntimeError saying why there is none."""
    if not os.path.isdir("/proc/driver/nvidia/gpus") or not os.listdir("/proc/driver/nvidia/gpus"):
        raise RuntimeError("no NVIDIA GPU on this host")
    try:
        from cuda.bindings import runtime
    except ImportError:
        try:
            from cuda import cudart as runtime  # older cuda-python layout
        except ImportError:
            raise RuntimeError("cuda-python is not installed") from None
    return runtime


def check_cuda(result: Any) -> Any:
    err = result[0] if isinstance(result, tuple) else result
    if int(err) != 0:
        raise RuntimeError(f"CUDA error {err}")
    if isinstance(result, tuple):
        return result[1] if len(result) == 2 else result[1:]
    return None


class CudaBuffer:
    """A device allocation with its 64-byte IPC handle (for CudaSharedMemoryRegister)."""

    def __init__(self, byte_size: int, device_id: int = 0) -> None:
        self.rt = cuda_runtime()
        self.byte_size = byte_size
        self.device_id = device_id
        check_cuda(self.rt.cudaSetDevice(device_id))
        self.ptr = check_cuda(self.rt.cudaMalloc(byte_size))
        handle = check_cuda(self.rt.cudaIpcGetMemHandle(self.ptr))
        self.raw_handle = bytes(handle.reserved)

    def upload(self, data: np.ndarray) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        check_cuda(self.rt.cudaMemcpy(self.ptr, data.ctypes.data, data.nbytes, kind))

    def download(self, dtype: Any, count: int) -> np.ndarray:
        out = np.empty(count, dtype=dtype)
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        check_cuda(self.rt.cudaMemcpy(out.ctypes.data, self.ptr, out.nbytes, kind))
        return out

    def fill_zero(self) -> None:
        check_cuda(self.rt.cudaMemset(self.ptr, 0, self.byte_size))

    def close(self) -> None:
        if self.ptr is not None:
            check_cuda(self.rt.cudaFree(self.ptr))
            self.ptr = None
