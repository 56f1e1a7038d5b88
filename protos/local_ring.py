"""Single-producer single-consumer message rings in shared memory (the local channel).

One memfd holds two rings, requests (client -> server) and responses (server -> client), then
a few *direct* response rings: a worker process answers a channel's requests it executed
straight into one of those (one producer per ring), skipping a hop through the supervisor.
Each ring is ``[head u64][tail u64][capacity u64][pad][data...]``; ``head`` is advanced by the
consumer, ``tail`` by the producer, both as running byte counts. A message is a u32 length
followed by its bytes, padded to 8; a length of WRAP means "continue at offset 0".

Every publish is followed by a doorbell byte on the Unix socket and every drain starts after
reading one: the two syscalls order the memory accesses on any CPU, so no atomics are needed.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass

HEADER = 64
WRAP = 0xFFFFFFFF
_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")
_HEAD_TAIL = struct.Struct("<QQ")
DEFAULT_RING_BYTES = 8 << 20


class RingFull(Exception):
    """The consumer is behind: retry after it drains (backpressure, nothing is lost)."""


class MessageTooLarge(ValueError):
    pass


class Ring:
    def __init__(self, buffer: mmap.mmap | memoryview, base: int, capacity: int) -> None:
        self._buf = memoryview(buffer)
        self._base = base
        self._data = base + HEADER
        self.capacity = capacity
        self._limit = capacity // 2  # the largest padded message

    @classmethod
    def initialize(cls, buffer: mmap.mmap, base: int, capacity: int) -> Ring:
        ring = cls(buffer, base, capacity)
        _HEAD_TAIL.pack_into(ring._buf, base, 0, 0)
        _U64.pack_into(ring._buf, base + 16, capacity)
        return ring

    @classmethod
    def attach(cls, buffer: mmap.mmap, base: int) -> Ring:
        (capacity,) = _U64.unpack_from(buffer, base + 16)
        return cls(buffer, base, capacity)

    def put(self, message: bytes) -> None:
        """Publish one message or raise RingFull / MessageTooLarge."""
        size = len(message)
        need = (4 + size + 7) & ~7  # the length word and the message, padded to 8
        if need > self._limit:
            raise MessageTooLarge(f"message of {size} bytes exceeds the ring's limit "
                                  f"of {self._limit - 4} bytes")
        buf, capacity = self._buf, self.capacity
        head, tail = _HEAD_TAIL.unpack_from(buf, self._base)
        position = tail % capacity
        room_to_end = capacity - position
        total = need if room_to_end >= need else need + room_to_end
        if capacity - (tail - head) < total:
            raise RingFull()
        if total != need:  # no room before the end: wrap to offset 0
            if room_to_end >= 4:
                _U32.pack_into(buf, self._data + position, WRAP)
            position = 0
        start = self._data + position
        _U32.pack_into(buf, start, size)
        buf[start + 4:start + 4 + size] = message
        _U64.pack_into(buf, self._base + 8, tail + total)

    def get_all(self) -> list[bytes]:
        """Take every published message (copies: the producer may reuse the space at once)."""
        buf, capacity, data = self._buf, self.capacity, self._data
        head, tail = _HEAD_TAIL.unpack_from(buf, self._base)
        messages: list[bytes] = []
        if head == tail:
            return messages
        while head < tail:
            position = head % capacity
            room_to_end = capacity - position
            if room_to_end < 4:
                head += room_to_end
                continue
            (length,) = _U32.unpack_from(buf, data + position)
            if length == WRAP:
                head += room_to_end
                continue
            start = data + position + 4
            messages.append(buf[start:start + length].tobytes())
            head += (4 + length + 7) & ~7
        _U64.pack_into(buf, self._base, head)
        return messages

    def release(self) -> None:
        self._buf.release()


def ring_capacity(ring_bytes: int) -> int:
    return (ring_bytes + 4095) & ~4095


@dataclass(frozen=True, slots=True)
class ChannelLayout:
    """Where a channel's rings lie in its memfd."""

    total: int
    request_base: int
    response_base: int
    direct_bases: tuple[int, ...]
    direct_capacity: int


def layout(ring_bytes: int, direct_rings: int = 0, direct_bytes: int = 0) -> ChannelLayout:
    """Two rings of ``ring_bytes`` and ``direct_rings`` rings of ``direct_bytes``."""
    main = HEADER + ring_capacity(ring_bytes)
    direct = HEADER + ring_capacity(direct_bytes)
    bases = tuple(2 * main + i * direct for i in range(direct_rings))
    return ChannelLayout(2 * main + direct_rings * direct, 0, main, bases,
                         ring_capacity(direct_bytes))
