"""Response rings: where a streamed request's responses are written (client, core, worker).

A client names a ring with four request parameters (any door: gRPC, the local channel, HTTP):
a registered system region and, in it, at ``offset`` a header of ``HEADER_BYTES`` followed by
``slots`` slots of ``slot_bytes`` each. The worker writes response k's output tensors into
slot k % slots, one after the other in the response's order, each at a 64-byte aligned
position (``output_offsets``), so the response message carries only their names, datatypes
and shapes. The header's first 8 bytes (little-endian) are the client's count of responses it
is done with: the worker writes response k only once that count is above k - slots, so a slot
is never reused before the client read it (the model's ``send`` waits meanwhile; a cancelled
request stops waiting).
"""

from __future__ import annotations

from collections.abc import Iterable

REGION = "shmserve_response_ring_region"
OFFSET = "shmserve_response_ring_offset"
SLOT_BYTES = "shmserve_response_ring_slot_bytes"
SLOTS = "shmserve_response_ring_slots"
HEADER_BYTES = 64
ALIGNMENT = 64


def ring_bytes(slot_bytes: int, slots: int) -> int:
    """The bytes a ring spans from its offset."""
    return HEADER_BYTES + slot_bytes * slots


def slot_offset(offset: int, slot_bytes: int, slots: int, response: int) -> int:
    """Where response ``response`` (counted from 0) starts, from the region's start."""
    return offset + HEADER_BYTES + (response % slots) * slot_bytes


def output_offsets(sizes: Iterable[int]) -> tuple[list[int], int]:
    """Each output's offset inside its slot, and the bytes the slot needs for them all."""
    offsets = []
    position = 0
    for size in sizes:
        offsets.append(position)
        position += (size + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT
    return offsets, position
