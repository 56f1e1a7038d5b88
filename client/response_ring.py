"""``ResponseRing``: a streamed request's responses written straight into the client's region.

``client.stream_infer(..., ring=ResponseRing(region, slots, slot_bytes))`` asks the server to
write each response's output tensors into the next slot of a ring in ``region`` (one of the
client's registered regions, ``client.shared_memory``) instead of sending them in the response
message (protos/response_ring.py has the layout). Zero-copy on ``local://`` (the model's
worker writes into the client's memfd) and over gRPC with a registered system region.

Lifetimes: a response's output arrays are views of its slot, valid until the stream has
yielded ``slots`` more responses (the slot is handed back when the caller asks for the next
response; the model's next send into it waits until then: a reader slower than the model
pauses the model, memory stays bounded). The stream's requests take turns on the ring: one
is sent once the previous one got its final response and the caller moved past it.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from shmserve.client.errors import invalid_argument
from shmserve.client.regions import HostRegion, array_address
from shmserve.protos import response_ring as layout
from shmserve.protos.datatypes import to_numpy_dtype


class ResponseRing:
    """``slots`` slots of ``slot_bytes`` (rounded up to 64) in ``region``, after a 64-byte
    header; thread-safe. Give it to ``stream_infer(..., ring=...)``."""

    def __init__(self, region: HostRegion, slots: int, slot_bytes: int) -> None:
        if slots <= 0 or slot_bytes <= 0:
            raise invalid_argument("a response ring needs slots > 0 and slot_bytes > 0")
        slot_bytes = (slot_bytes + layout.ALIGNMENT - 1) // layout.ALIGNMENT * layout.ALIGNMENT
        self.region = region
        self.slots = slots
        self.slot_bytes = slot_bytes
        nbytes = layout.ring_bytes(slot_bytes, slots)
        #: The ring's bytes (header and slots), taken from the region's allocator.
        self.memory = region.ndarray((nbytes,), np.uint8)
        offset = region.locate(array_address(self.memory), nbytes)
        assert offset is not None
        self.offset = offset
        self._header = self.memory[:8].view("<u8")
        self._cond = threading.Condition()
        self._busy = False        # a request of a stream uses it
        self._final_seen = False  # that request's final answer was read
        self._placed = 0          # its responses placed in slots so far
        self._released = 0        # of those, the ones the caller moved past

    def parameters(self) -> dict[str, Any]:
        """The request parameters that name the ring to the server."""
        return {layout.REGION: self.region.name, layout.OFFSET: self.offset,
                layout.SLOT_BYTES: self.slot_bytes, layout.SLOTS: self.slots}

    # --- turns of a stream's requests -------------------------------------------------------
    def start(self, timeout: float | None = None) -> bool:
        """Wait for the ring to be free, then take it for the next request; False on timeout
        or when the stream stopped (``abandon``)."""
        with self._cond:
            if not self._cond.wait_for(lambda: not self._busy, timeout):
                return False
            self._busy = True
            self._final_seen = False
            self._placed = self._released = 0
            self._header[0] = 0
            return True

    def _maybe_free(self) -> None:
        if self._final_seen and self._released == self._placed:
            self._busy = False
            self._cond.notify_all()

    def finished(self) -> None:
        """The current request's final answer was read."""
        with self._cond:
            self._final_seen = True
            self._maybe_free()

    def abandon(self) -> None:
        """The stream ended early: the ring is free again."""
        with self._cond:
            self._busy = False
            self._cond.notify_all()

    # --- responses --------------------------------------------------------------------------
    def place(self, outputs: list[tuple[str, str, list[int]]]) -> tuple[int, dict[str, Any]]:
        """The slot of the next response written into the ring and an array per output
        (name, datatype, shape, in the response's order) over its bytes there."""
        with self._cond:
            response = self._placed
            self._placed += 1
        start = layout.slot_offset(0, self.slot_bytes, self.slots, response)
        sizes = []
        for name, datatype, shape in outputs:
            if datatype == "BYTES":
                raise invalid_argument(f"output '{name}' is BYTES: it cannot come through a "
                                       f"response ring")
            sizes.append(int(np.prod(shape, dtype=np.int64)) * to_numpy_dtype(datatype).itemsize)
        offsets, _ = layout.output_offsets(sizes)
        arrays = {name: self.memory[start + at:start + at + size]
                  for (name, _, _), at, size in zip(outputs, offsets, sizes, strict=True)}
        return response % self.slots, arrays

    def release(self) -> None:
        """The caller moved past one response placed in the ring: its slot may be reused."""
        with self._cond:
            self._released += 1
            self._header[0] = self._released
            self._maybe_free()
