"""Single-producer single-consumer message rings in shared memory (the local channel).

One memfd holds two rings: requests (client -> server) and responses (server -> client).
Each ring is ``[head u64][tail u64][capacity u64][pad][data...]``; ``head`` is advanced by the
consumer, ``tail`` by the producer, both as running byte counts. A message is a u32 length
followed by its bytes, padded to 8; a length of WRAP means "continue at offset 0".

Every publish is followed by a doorbell byte on the Unix socket and every drain starts after
reading one: the two syscalls order the memory accesses on any CPU, so no atomics are needed.
"""

from __future__ import annotations

import mmap
import struct

HEADER = 64
WRAP = 0xFFFFFFFF
_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")
DEFAULT_RING_BYTES = 8 << 20


class RingFull(Exception):
    """The consumer is behind: retry after it drains (backpressure, nothing is lost)."""


class MessageTooLarge(ValueError):
    pass


def _padded(size: int) -> int:
    return (4 + size + 7) & ~7


class Ring:
    def __init__(self, buffer: mmap.mmap | memoryview, base: int, capacity: int) -> None:
        self._buf = memoryview(buffer)
        self._base = base
        self._data = base + HEADER
        self.capacity = capacity

    @classmethod
    def initialize(cls, buffer: mmap.mmap, base: int, capacity: int) -> Ring:
        ring = cls(buffer, base, capacity)
        _U64.pack_into(ring._buf, base, 0)
        _U64.pack_into(ring._buf, base + 8, 0)
        _U64.pack_into(ring._buf, base + 16, capacity)
        return ring

    @classmethod
    def attach(cls, buffer: mmap.mmap, base: int) -> Ring:
        (capacity,) = _U64.unpack_from(buffer, base + 16)
        return cls(buffer, base, capacity)

    def _head(self) -> int:
        return int(_U64.unpack_from(self._buf, self._base)[0])

    def _tail(self) -> int:
        return int(_U64.unpack_from(self._buf, self._base + 8)[0])

    def put(self, message: bytes) -> None:
        """Publish one message or raise RingFull / MessageTooLarge."""
        need = _padded(len(message))
        if need > self.capacity // 2:
            raise MessageTooLarge(f"message of {len(message)} bytes exceeds the ring's limit "
                                  f"of {self.capacity // 2 - 4} bytes")
        head, tail = self._head(), self._tail()
        position = tail % self.capacity
        room_to_end = self.capacity - position
        wrap = room_to_end < need
        total = need + (room_to_end if wrap else 0)
        if self.capacity - (tail - head) < total:
            raise RingFull()
        if wrap:
            if room_to_end >= 4:
                _U32.pack_into(self._buf, self._data + position, WRAP)
            position = 0
        start = self._data + position
        _U32.pack_into(self._buf, start, len(message))
        self._buf[start + 4:start + 4 + len(message)] = message
        _U64.pack_into(self._buf, self._base + 8, tail + total)

    def get_all(self) -> list[bytes]:
        """Take every published message (copies: the producer may reuse the space at once)."""
        head, tail = self._head(), self._tail()
        messages: list[bytes] = []
        while head < tail:
            position = head % self.capacity
            room_to_end = self.capacity - position
            if room_to_end < 4:
                head += room_to_end
                continue
            (length,) = _U32.unpack_from(self._buf, self._data + position)
            if length == WRAP:
                head += room_to_end
                continue
            start = self._data + position + 4
            messages.append(bytes(self._buf[start:start + length]))
            head += _padded(length)
        _U64.pack_into(self._buf, self._base, head)
        return messages

    def release(self) -> None:
        self._buf.release()


def ring_capacity(ring_bytes: int) -> int:
    return (ring_bytes + 4095) & ~4095


def layout(ring_bytes: int) -> tuple[int, int, int]:
    """(total size, request ring base, response ring base) for two rings of ring_bytes."""
    ring_bytes = (ring_bytes + 4095) & ~4095
    return 2 * (HEADER + ring_bytes), 0, HEADER + ring_bytes
