"""POSIX shared-memory segments: mapping client regions and owning per-instance arenas.

Segments are opened with posix_ipc and mapped with mmap -- never multiprocessing.shared_memory,
whose resource tracker may unlink a client's segment when this process exits.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import threading
from typing import Any

import posix_ipc

from shmserve.workers.lineage import process_alive

# Keys of segments the server owns. Clients may never register a key with this prefix.
ARENA_PREFIX = "/shmserve_arena_"
SHM_DIR = "/dev/shm"
ARENA_INITIAL_BYTES = 1 << 20


def normalize_key(key: str) -> str:
    return key if key.startswith("/") else "/" + key


def is_reserved_key(key: str) -> bool:
    return normalize_key(key).startswith(ARENA_PREFIX)


def arena_key(supervisor_pid: int, owner: str, generation: int) -> str:
    return f"{ARENA_PREFIX}{supervisor_pid}_{owner}_{generation}"


# Tensors at least this large are written and read with pwrite/pread on the segment's file
# descriptor instead of through the mapping: the pages then never enter this process's
# resident set (only the segment holds them), and no page faults are taken.
FILE_IO_BYTES = 1 << 20
_MAX_READ = 0x7FFFF000  # Linux transfers at most this much in one read(); beyond, the mapping


class Pieces:
    """Bytes that arrived in several buffers (an HTTP body's chunks), kept as views of them
    rather than joined: ``Segment.write`` writes them out with one pwritev, so a large tensor
    is copied once, into the arena. ``bytes(pieces)`` joins them where a copy is wanted."""

    __slots__ = ("parts", "size")

    def __init__(self, parts: list[memoryview]) -> None:
        self.parts = parts
        self.size = sum(len(part) for part in parts)

    def __len__(self) -> int:
        return self.size

    def __bytes__(self) -> bytes:
        return b"".join(self.parts)

    def slice(self, start: int, stop: int) -> memoryview | Pieces:
        """``[start:stop]``: one view when it lies within one part."""
        parts: list[memoryview] = []
        position = 0
        for part in self.parts:
            end = position + len(part)
            if end > start and position < stop:
                parts.append(part[max(start - position, 0):min(stop, end) - position])
            if end >= stop:
                break
            position = end
        if len(parts) == 1:
            return parts[0]
        return Pieces(parts)


def pwrite_pieces(fd: int, parts: list[memoryview], offset: int) -> None:
    """Write ``parts`` one after the other at ``offset`` (pwritev, IOV_MAX at a time)."""
    pending = [part.cast("B") for part in parts if len(part)]
    while pending:
        batch = pending[:_IOV_MAX]
        written = os.pwritev(fd, batch, offset)
        offset += written
        while batch and written >= len(batch[0]):  # drop what went, keep a partial rest
            written -= len(batch.pop(0))
            pending.pop(0)
        if written:
            pending[0] = pending[0][written:]


_IOV_MAX = 1024


class Segment:
    """A mapped POSIX shm segment. ``buf`` is a writable memoryview of the whole segment;
    ``fd`` (-1 unless kept) serves ``write``/``read`` of large tensors."""

    __slots__ = ("_mmap", "buf", "fd", "key", "size")

    def __init__(self, key: str, mapped: mmap.mmap, size: int, fd: int = -1) -> None:
        self.key = key
        self._mmap = mapped
        self.size = size
        self.buf = memoryview(mapped)
        self.fd = fd

    @classmethod
    def open(cls, key: str, keep_fd: bool = False) -> Segment:
        """Map an existing segment; raises OSError/posix_ipc.Error when it cannot be opened."""
        shm = posix_ipc.SharedMemory(normalize_key(key))
        try:
            size = shm.size
            if size == 0:
                raise OSError(f"shared memory segment '{key}' is empty")
            mapped = mmap.mmap(shm.fd, size)
        except BaseException:
            shm.close_fd()
            raise
        fd = shm.fd if keep_fd else -1
        if not keep_fd:
            shm.close_fd()
        return cls(key, mapped, size, fd)

    @classmethod
    def create(cls, key: str, size: int) -> Segment:
        """A new segment (mode 0600), its file descriptor kept for ``write``/``read``."""
        shm = posix_ipc.SharedMemory(normalize_key(key), posix_ipc.O_CREX, mode=0o600, size=size)
        try:
            mapped = mmap.mmap(shm.fd, size)
        except BaseException:
            shm.close_fd()
            raise
        return cls(key, mapped, size, shm.fd)

    def write(self, offset: int, data: bytes | memoryview | Pieces) -> None:
        """Copy ``data`` in at ``offset``: large tensors through the file descriptor."""
        size = len(data)
        if isinstance(data, Pieces):
            if self.fd >= 0:
                pwrite_pieces(self.fd, data.parts, offset)
                return
            data = bytes(data)
        if self.fd < 0 or size < FILE_IO_BYTES:
            self.buf[offset:offset + size] = data
            return
        view = memoryview(data).cast("B")
        done = 0
        while done < size:
            done += os.pwrite(self.fd, view[done:], offset + done)

    def read(self, offset: int, size: int) -> bytes:
        """A copy of ``size`` bytes at ``offset``: large tensors through the file descriptor."""
        if self.fd < 0 or size < FILE_IO_BYTES or size > _MAX_READ:
            return bytes(self.buf[offset:offset + size])
        data = os.pread(self.fd, size, offset)
        if len(data) != size:  # tmpfs reads whole ranges up to _MAX_READ; anything else is odd
            raise OSError(f"short read of shared memory segment '{self.key}': "
                          f"{len(data)} of {size} bytes")
        return data

    def read_into(self, offset: int, target: memoryview) -> None:
        """Copy ``len(target)`` bytes at ``offset`` into ``target``: large tensors through the
        file descriptor (the pages stay out of this process's resident set)."""
        size = len(target)
        if self.fd < 0 or size < FILE_IO_BYTES:
            target[:] = self.buf[offset:offset + size]
            return
        done = 0
        while done < size:
            count = os.preadv(self.fd, [target[done:done + _MAX_READ]], offset + done)
            if count <= 0:
                raise OSError(f"short read of shared memory segment '{self.key}': "
                              f"{done} of {size} bytes")
            done += count

    def close(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1
        self.buf.release()
        # A NumPy view a backend kept alive still exports the buffer: leave the mapping to
        # the garbage collector rather than fail.
        with contextlib.suppress(BufferError):
            self._mmap.close()

    def unlink(self) -> None:
        with contextlib.suppress(posix_ipc.ExistentialError):
            posix_ipc.unlink_shared_memory(normalize_key(self.key))


class FileReader:
    """Reads a segment through a duplicate of its descriptor: usable from another thread
    while the segment's own mapping and descriptor may be closed. ``close`` when done."""

    __slots__ = ("fd", "key")

    def __init__(self, segment: Segment) -> None:
        self.key = segment.key
        self.fd = os.dup(segment.fd)

    def read_into(self, offset: int, target: memoryview) -> None:
        size = len(target)
        done = 0
        while done < size:
            count = os.preadv(self.fd, [target[done:done + _MAX_READ]], offset + done)
            if count <= 0:
                raise OSError(f"short read of shared memory segment '{self.key}': "
                              f"{done} of {size} bytes")
            done += count

    def read(self, offset: int, size: int) -> bytes:
        data = bytearray(size)
        self.read_into(offset, memoryview(data))
        return bytes(data)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class SegmentCache:
    """Mappings of client regions, one per registration id (a re-registered key is remapped)."""

    def __init__(self) -> None:
        self._segments: dict[int, Segment] = {}
        # A decoupled model's threads write outputs while the main thread maps and releases.
        self._lock = threading.Lock()

    def get(self, region_id: int, key: str) -> Segment:
        segment = self._segments.get(region_id)
        if segment is not None:
            return segment
        with self._lock:
            segment = self._segments.get(region_id)
            if segment is None:
                if not key:  # a memfd region: mapped by ``adopt`` when its fd came
                    raise OSError(f"the memfd of region {region_id} was not passed to this "
                                  f"worker")
                segment = Segment.open(key)
                self._segments[region_id] = segment
            return segment

    def adopt(self, region_id: int, fd: int) -> None:
        """Map a memfd region from its fd (closed here; the mapping keeps the memory). The
        server checked that it is sealed against shrinking: this mapping can never SIGBUS."""
        try:
            size = os.fstat(fd).st_size
            if size == 0:
                raise OSError(f"the memfd of region {region_id} is empty")
            mapped = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        with self._lock:
            self._release(region_id)
            self._segments[region_id] = Segment(f"memfd region {region_id}", mapped, size)

    def release(self, region_id: int) -> None:
        with self._lock:
            self._release(region_id)

    def _release(self, region_id: int) -> None:
        segment = self._segments.pop(region_id, None)
        if segment is not None:
            segment.close()

    def close_all(self) -> None:
        for region_id in list(self._segments):
            self.release(region_id)

    def __len__(self) -> int:
        return len(self._segments)


class Arena:
    """A growable segment owned by one side; growth makes a new segment with a new key.

    The reader remaps when the key in a reference changes; the old segment is unlinked at once
    (mappings of it stay valid until closed).
    """

    def __init__(self, supervisor_pid: int, owner: str,
                 initial_size: int = ARENA_INITIAL_BYTES) -> None:
        self._supervisor_pid = supervisor_pid
        self._owner = owner
        self._generation = 0
        self._initial_size = initial_size
        self.segment: Segment | None = None

    def ensure(self, nbytes: int) -> Segment:
        segment = self.segment
        if segment is not None and segment.size >= nbytes:
            return segment
        size = max(self._initial_size, _next_power_of_two(nbytes))
        if segment is not None:
            segment.unlink()
            segment.close()
        self._generation += 1
        self.segment = Segment.create(
            arena_key(self._supervisor_pid, self._owner, self._generation), size)
        return self.segment

    @property
    def grown(self) -> bool:
        """The segment is larger than the initial size (a large request grew it)."""
        return self.segment is not None and self.segment.size > self._initial_size

    def shrink(self) -> bool:
        """Give a grown segment's memory back; the next ``ensure`` starts a fresh one of the
        size then needed. True if there was one to give back."""
        if not self.grown:
            return False
        self.close()
        return True

    def close(self) -> None:
        if self.segment is not None:
            self.segment.unlink()
            self.segment.close()
            self.segment = None


def trim_heap() -> None:
    """Hand the C heap's free pages back to the system (glibc ``malloc_trim``). After a large
    request, gRPC's and Python's freed buffers would otherwise stay in the resident set:
    glibc raises its mmap threshold once a large block was freed, so the next ones up to
    32 MiB come from heaps it does not shrink by itself."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


_MALLOC_TRIM: list[Any] = []


def _malloc_trim() -> Any:
    if not _MALLOC_TRIM:
        function = None
        with contextlib.suppress(OSError, AttributeError):
            function = ctypes.CDLL("libc.so.6").malloc_trim
            function.argtypes = [ctypes.c_size_t]
            function.restype = ctypes.c_int
        _MALLOC_TRIM.append(function)
    return _MALLOC_TRIM[0]


def _next_power_of_two(value: int) -> int:
    return 1 << max(0, (value - 1).bit_length())


class ReaderMapping:
    """The reader's side of a peer's arenas (one per pipeline lane): each key is mapped once;
    the oldest mapping is dropped beyond ``capacity`` (an arena that grew has a new key)."""

    def __init__(self, capacity: int = 4, keep_fd: bool = False) -> None:
        self.capacity = capacity
        self._keep_fd = keep_fd
        self._segments: dict[str, Segment] = {}

    def view(self, key: str) -> Segment:
        segment = self._segments.get(key)
        if segment is None:
            if len(self._segments) >= self.capacity:
                oldest = next(iter(self._segments))
                self._segments.pop(oldest).close()
            segment = self._segments[key] = Segment.open(key, self._keep_fd)
        return segment

    @property
    def mapped_bytes(self) -> int:
        return sum(segment.size for segment in self._segments.values())

    def close(self) -> None:
        segments, self._segments = self._segments, {}
        for segment in segments.values():
            segment.close()


def remove_arenas(supervisor_pid: int | None = None) -> list[str]:
    """Unlink arena segments of one supervisor (or of every supervisor that is gone)."""
    removed: list[str] = []
    try:
        names = os.listdir(SHM_DIR)
    except FileNotFoundError:
        return removed
    prefix = ARENA_PREFIX.lstrip("/")
    for name in names:
        if not name.startswith(prefix):
            continue
        pid_text = name[len(prefix):].split("_", 1)[0]
        if not pid_text.isdigit():
            continue
        pid = int(pid_text)
        if supervisor_pid is not None and pid != supervisor_pid:
            continue
        if supervisor_pid is None and process_alive(pid):
            continue
        with contextlib.suppress(posix_ipc.ExistentialError):
            posix_ipc.unlink_shared_memory("/" + name)
            removed.append(name)
    return removed


def remove_owner_arenas(supervisor_pid: int, owner: str) -> None:
    prefix = f"{ARENA_PREFIX.lstrip('/')}{supervisor_pid}_{owner}_"
    with contextlib.suppress(FileNotFoundError):
        for name in os.listdir(SHM_DIR):
            if name.startswith(prefix) and name[len(prefix):].isdigit():
                with contextlib.suppress(posix_ipc.ExistentialError):
                    posix_ipc.unlink_shared_memory("/" + name)
