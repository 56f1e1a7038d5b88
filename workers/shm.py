"""POSIX shared-memory segments: mapping client regions and owning per-instance arenas.

Segments are opened with posix_ipc and mapped with mmap -- never multiprocessing.shared_memory,
whose resource tracker may unlink a client's segment when this process exits.
"""

from __future__ import annotations

import contextlib
import mmap
import os

import posix_ipc

# Keys of segments the server owns. Clients may never register a key with this prefix.
ARENA_PREFIX = "/shmserve_arena_"
SHM_DIR = "/dev/shm"


def normalize_key(key: str) -> str:
    return key if key.startswith("/") else "/" + key


def is_reserved_key(key: str) -> bool:
    return normalize_key(key).startswith(ARENA_PREFIX)


def arena_key(supervisor_pid: int, owner: str, generation: int) -> str:
    return f"{ARENA_PREFIX}{supervisor_pid}_{owner}_{generation}"


class Segment:
    """A mapped POSIX shm segment. ``buf`` is a writable memoryview of the whole segment."""

    __slots__ = ("_mmap", "buf", "key", "size")

    def __init__(self, key: str, mapped: mmap.mmap, size: int) -> None:
        self.key = key
        self._mmap = mapped
        self.size = size
        self.buf = memoryview(mapped)

    @classmethod
    def open(cls, key: str) -> Segment:
        """Map an existing segment; raises OSError/posix_ipc.Error when it cannot be opened."""
        shm = posix_ipc.SharedMemory(normalize_key(key))
        try:
            size = shm.size
            if size == 0:
                raise OSError(f"shared memory segment '{key}' is empty")
            mapped = mmap.mmap(shm.fd, size)
        finally:
            shm.close_fd()
        return cls(key, mapped, size)

    @classmethod
    def create(cls, key: str, size: int) -> Segment:
        shm = posix_ipc.SharedMemory(normalize_key(key), posix_ipc.O_CREX, mode=0o600, size=size)
        try:
            mapped = mmap.mmap(shm.fd, size)
        finally:
            shm.close_fd()
        return cls(key, mapped, size)

    def close(self) -> None:
        self.buf.release()
        # A NumPy view a backend kept alive still exports the buffer: leave the mapping to
        # the garbage collector rather than fail.
        with contextlib.suppress(BufferError):
            self._mmap.close()

    def unlink(self) -> None:
        with contextlib.suppress(posix_ipc.ExistentialError):
            posix_ipc.unlink_shared_memory(normalize_key(self.key))


class SegmentCache:
    """Mappings of client regions, one per registration id (a re-registered key is remapped)."""

    def __init__(self) -> None:
        self._segments: dict[int, Segment] = {}

    def get(self, region_id: int, key: str) -> Segment:
        segment = self._segments.get(region_id)
        if segment is None:
            if not key:  # a memfd region: mapped by ``adopt`` when its fd came
                raise OSError(f"the memfd of region {region_id} was not passed to this worker")
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
        self.release(region_id)
        self._segments[region_id] = Segment(f"memfd region {region_id}", mapped, size)

    def release(self, region_id: int) -> None:
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

    def __init__(self, supervisor_pid: int, owner: str, initial_size: int = 1 << 20) -> None:
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

    def close(self) -> None:
        if self.segment is not None:
            self.segment.unlink()
            self.segment.close()
            self.segment = None


def _next_power_of_two(value: int) -> int:
    return 1 << max(0, (value - 1).bit_length())


class ReaderMapping:
    """The reader's side of a peer's arenas (one per pipeline lane): each key is mapped once;
    the oldest mapping is dropped beyond ``capacity`` (an arena that grew has a new key)."""

    def __init__(self, capacity: int = 4) -> None:
        self.capacity = capacity
        self._segments: dict[str, Segment] = {}

    def view(self, key: str) -> Segment:
        segment = self._segments.get(key)
        if segment is None:
            if len(self._segments) >= self.capacity:
                oldest = next(iter(self._segments))
                self._segments.pop(oldest).close()
            segment = self._segments[key] = Segment.open(key)
        return segment

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
        if supervisor_pid is None and _process_alive(pid):
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


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
