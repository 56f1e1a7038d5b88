"""The internal request every door produces (through the core) and the scheduler runs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from shmserve.daemon.reply import Reply
from shmserve.daemon.shm_registry import Region

if TYPE_CHECKING:
    from shmserve.daemon.scheduler import Scheduler


@dataclass(slots=True)
class InputTensor:
    name: str
    datatype: str
    shape: list[int]                # as the backend sees it (after reshape)
    data: bytes | memoryview | None  # payload bytes, or None when in a region
    region: Region | None = None
    offset: int = 0                 # inside the region (relative to the registration)
    nbytes: int = 0


@dataclass(slots=True)
class RequestedOutput:
    name: str
    region: Region | None = None
    offset: int = 0
    byte_size: int = 0


@dataclass(slots=True, frozen=True)
class ResponseRing:
    """Where a streamed request's responses go (docs/streaming.md, "Response rings"): a
    header of ``RING_HEADER_BYTES`` (the client's count of responses it is done with) at
    ``offset`` in ``region``, then ``slots`` slots of ``slot_bytes``; response k's outputs are
    written into slot k % slots, once the client is done with response k - slots."""

    region: Region
    offset: int
    slot_bytes: int
    slots: int


@dataclass(slots=True)
class OutputTensor:
    name: str
    datatype: str
    shape: list[int]
    data: bytes | None              # None when written into a client region
    nbytes: int = -1                # with data None: the bytes written into the region
    offset: int = -1                # with data None: where, from the segment's start


@dataclass(slots=True)
class InferRequest:
    """A validated request on its way: door builds -> core validates -> batcher ->
    dispatcher -> worker -> ``reply``."""

    model: str
    version: int
    request_id: str
    inputs: list[InputTensor]
    outputs: list[RequestedOutput]
    batch_size: int
    reply: Reply
    parameters: dict[str, Any] = field(default_factory=dict)
    correlation_id: int | str = 0
    received_ns: int = 0
    regions: list[Region] = field(default_factory=list)
    cancelled: bool = False          # its caller gave up: nobody is answered
    done: bool = False               # completed (answered, failed or dropped)
    scheduler: Scheduler | None = None  # the one it was queued with
    # Once sent to a worker: (worker, frame id, index in the frame), to withdraw it there.
    sent: tuple[Any, int, int] | None = None
    ring: ResponseRing | None = None  # a streamed request's responses go there
