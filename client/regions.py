"""Client-owned shared-memory regions with a bump allocator for tensors.

``HostRegion`` is the allocator over a mapping. ``SystemRegion`` is one POSIX segment,
created with posix_ipc and mapped with mmap (never ``multiprocessing.shared_memory``: its
resource tracker unlinks segments behind our back). Segments are named
``/shmserve_client_<pid>_<n>_<hex>`` so that ``shmserve shm ls`` and ``shmserve shm clean``
can tell which process created them and whether it is still alive. ``MemfdRegion``
(client/memfd_region.py) is the sealed memfd the client uses on a local channel instead.

Registration with a server is the client's business (``Client.shared_memory``); this module
only owns the memory.
"""

from __future__ import annotations

import contextlib
import itertools
import mmap
import os
import secrets
import threading
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt
import posix_ipc

from shmserve.client.errors import RegionFullError, invalid_argument
from shmserve.protos.datatypes import deserialize_bytes_tensor, serialize_bytes_tensor

SEGMENT_PREFIX = "shmserve_client_"
ALIGNMENT = 64
SHM_DIR = "/dev/shm"

_counter = itertools.count()


def segment_key() -> str:
    """A fresh segment key: ``/shmserve_client_<pid>_<n>_<8 hex digits>``."""
    return f"/{SEGMENT_PREFIX}{os.getpid()}_{next(_counter)}_{secrets.token_hex(4)}"


def _unlink(key: str, creator_pid: int) -> None:
    """Finalizer: unlink a segment the GC or interpreter exit found still open.

    Only in the creating process: a forked child that exits must not unlink its parent's
    segments.
    """
    if os.getpid() == creator_pid:
        with contextlib.suppress(posix_ipc.ExistentialError):
            posix_ipc.unlink_shared_memory(key)


def array_address(array: np.ndarray) -> int:
    return int(array.__array_interface__["data"][0])


@runtime_checkable
class Region(Protocol):
    """What the client needs of a region to send references instead of bytes.

    ``SystemRegion`` implements it for NumPy arrays in POSIX shared memory. A CUDA region
    (torch tensors / ``__cuda_array_interface__`` objects in ``cudaMalloc`` memory shared through
    ``cudaIpcGetMemHandle``) implements the same protocol: ``locate`` answers for device
    pointers, and the client registers it with ``CudaSharedMemoryRegister``.
    """

    @property
    def name(self) -> str: ...

    @property
    def kind(self) -> str: ...

    @property
    def byte_size(self) -> int: ...

    def locate(self, address: int, nbytes: int) -> int | None:
        """Offset of ``[address, address + nbytes)`` inside the region, or None."""
        ...

    def close(self) -> None:
        """Release the memory locally (the client has unregistered it already)."""
        ...


@dataclass(frozen=True, slots=True)
class BytesTensor:
    """A BYTES tensor laid out in a region (uint32 little-endian length + bytes per element).

    ``data`` is the uint8 view of the serialized elements inside the region, ``shape`` the
    tensor's shape. Pass it as an input to ``Client.infer``; ``decode()`` reads it back.
    """

    data: np.ndarray
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    def decode(self) -> np.ndarray:
        """The elements as a NumPy object array of ``bytes`` with ``shape``."""
        count = 1
        for dim in self.shape:
            count *= dim
        return deserialize_bytes_tensor(self.data.data, count).reshape(self.shape)


class HostRegion:
    """Host memory mapped into this process, with a 64-byte bump allocator.

    ``ndarray(shape, dtype)`` hands out C-contiguous arrays that live in the region; when such
    an array (or a C-contiguous view of it) is an input to ``Client.infer``, the request carries
    a reference to the region instead of the tensor's bytes. Allocations are never freed one by
    one: ``reset()`` starts over at offset 0 (arrays handed out earlier then alias new ones).

    Subclasses say where the memory comes from: ``SystemRegion`` (a named POSIX segment) and
    ``MemfdRegion`` (a sealed memfd passed to the server over the local channel).
    """

    kind = "system"
    name: str
    key: str

    def __init__(self, byte_size: int) -> None:
        if byte_size <= 0:
            raise invalid_argument(f"a shared-memory region needs a positive size, got "
                                   f"{byte_size}")
        self.byte_size = int(byte_size)
        self._lock = threading.Lock()
        self._next = 0
        self._closed = False
        self._mmap: mmap.mmap | None = None
        self._bytes: np.ndarray | None = None
        self.address = 0

    def _use_mapping(self, mapped: mmap.mmap) -> None:
        self._mmap = mapped
        self._bytes = np.frombuffer(mapped, dtype=np.uint8)
        self.address = array_address(self._bytes)

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{self._next}/{self.byte_size} bytes used"
        return f"<{type(self).__name__} {self.name} {state}>"

    # --- allocation -------------------------------------------------------------------------
    @property
    def used(self) -> int:
        return self._next

    @property
    def free(self) -> int:
        return max(0, self.byte_size - self._next)

    @property
    def closed(self) -> bool:
        return self._closed

    def _allocate(self, nbytes: int) -> np.ndarray:
        with self._lock:
            if self._bytes is None:
                raise invalid_argument(f"shared-memory region '{self.name}' is closed")
            start = -(-self._next // ALIGNMENT) * ALIGNMENT
            if start + nbytes > self.byte_size:
                raise RegionFullError(
                    f"shared-memory region '{self.name}' is full: {nbytes} bytes requested, "
                    f"{max(0, self.byte_size - start)} of {self.byte_size} left")
            self._next = start + nbytes
            return self._bytes[start:start + nbytes]

    def ndarray(self, shape: int | Sequence[int], dtype: npt.DTypeLike) -> np.ndarray:
        """A new C-contiguous array in the region (contents undefined, zero when fresh)."""
        dims = (int(shape),) if isinstance(shape, int | np.integer) else tuple(
            int(d) for d in shape)
        dt = np.dtype(dtype)
        if dt.hasobject:
            raise invalid_argument("object arrays cannot live in shared memory; use "
                                   "region.bytes_tensor(...) for BYTES tensors")
        if any(d < 0 for d in dims):
            raise invalid_argument(f"negative dimension in shape {dims}")
        count = 1
        for dim in dims:
            count *= dim
        return self._allocate(count * dt.itemsize).view(dt).reshape(dims)

    def copy(self, array: npt.ArrayLike) -> np.ndarray:
        """A copy of ``array`` allocated in the region (same shape and dtype)."""
        source = np.asarray(array)
        target = self.ndarray(source.shape, source.dtype)
        target[...] = source
        return target

    def bytes_tensor(self, values: Iterable[bytes | str] | np.ndarray,
                     shape: Sequence[int] | None = None) -> BytesTensor:
        """A BYTES tensor of ``values`` in the region, in the length-prefixed layout.

        ``str`` elements are encoded as UTF-8. ``shape`` defaults to the array's shape, or
        ``(len(values),)``.
        """
        array = values if isinstance(values, np.ndarray) else np.array(
            list(values), dtype=object)
        dims = tuple(int(d) for d in shape) if shape is not None else tuple(array.shape)
        count = 1
        for dim in dims:
            count *= dim
        if count != array.size:
            raise invalid_argument(f"{array.size} values do not fill shape {dims}")
        encoded = serialize_bytes_tensor(array)
        data = self._allocate(len(encoded))
        data[:] = np.frombuffer(encoded, dtype=np.uint8)
        return BytesTensor(data, dims)

    def reset(self) -> None:
        """Forget every allocation: the next ``ndarray`` starts at offset 0 again."""
        with self._lock:
            self._next = 0

    # --- lookup -----------------------------------------------------------------------------
    def locate(self, address: int, nbytes: int) -> int | None:
        offset = address - self.address
        if self._closed or offset < 0 or offset + nbytes > self.byte_size:
            return None
        return offset

    def contains(self, array: np.ndarray) -> bool:
        """Whether ``array``'s memory lies inside this (open) region."""
        return self.locate(array_address(array), array.nbytes) is not None

    # --- teardown ---------------------------------------------------------------------------
    def unlink(self) -> None:
        """Remove the region's name from the system, if it has one (the mapping stays usable)."""

    def _release_memory(self) -> None:
        """Give back what holds the memory besides the mapping (called once, by ``close``)."""

    def close(self) -> None:
        """Unlink the region (if it has a name), release it and unmap it.

        Arrays handed out earlier keep the mapping alive until they are garbage collected, so
        they never point at unmapped memory; the client just stops treating them as region
        tensors.
        """
        if self._closed:
            return
        self._closed = True
        self.unlink()
        with self._lock:
            self._bytes = None
        mapped, self._mmap = self._mmap, None
        if mapped is not None:
            with contextlib.suppress(BufferError):
                mapped.close()
        self._release_memory()

    def __getstate__(self) -> Any:
        raise TypeError(f"a {type(self).__name__} belongs to the process that created it; pass "
                        f"arrays instead")


class SystemRegion(HostRegion):
    """A POSIX shared-memory segment mapped into this process (see ``HostRegion``).

    Its ``key`` names it in /dev/shm until it is closed; ``Client.shared_memory`` makes these
    for gRPC (and for a local channel whose server cannot take sealed memfds).
    """

    def __init__(self, byte_size: int) -> None:
        super().__init__(byte_size)
        self.key = segment_key()
        self.name = self.key[1:]
        shm = posix_ipc.SharedMemory(self.key, posix_ipc.O_CREX, mode=0o600,
                                     size=self.byte_size)
        try:
            mapped = mmap.mmap(shm.fd, self.byte_size)
        except BaseException:
            shm.close_fd()
            posix_ipc.unlink_shared_memory(self.key)
            raise
        shm.close_fd()
        self._finalizer = weakref.finalize(self, _unlink, self.key, os.getpid())
        self._use_mapping(mapped)

    def unlink(self) -> None:
        """Remove the segment's name from /dev/shm (the mapping stays usable)."""
        self._finalizer.detach()
        with contextlib.suppress(posix_ipc.ExistentialError):
            posix_ipc.unlink_shared_memory(self.key)

    def __getstate__(self) -> Any:
        raise TypeError("a SystemRegion belongs to the process that created it; pass arrays "
                        "or the region's key instead")
