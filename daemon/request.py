"""The internal request every door produces (through the core) and the scheduler runs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from shmserve.daemon.reply import Reply
from shmserve.daemon.shm_registry import Region
from shmserve.workers.shm import FileReader, Pieces

if TYPE_CHECKING:
    from shmserve.daemon.scheduler import Scheduler
    from shmserve.daemon.tracing import Trace
    from shmserve.workers.shm import Segment


@dataclass(slots=True)
class InputTensor:
    name: str
    datatype: str
    shape: list[int]                # as the backend sees it (after reshape)
    data: bytes | memoryview | Pieces | None  # payload bytes, or None when in a region
    region: Region | None = None
    offset: int = 0                 # inside the region (relative to the registration)
    nbytes: int = 0


@dataclass(slots=True)
class RequestedOutput:
    name: str
    region: Region | None = None
    offset: int = 0
    byte_size: int = 0
    # An ensemble intermediate: the worker may answer with a reference to the input the
    # model passed through instead of copying it into ``region`` (docs/pipelines.md).
    by_reference: bool = False
    # Triton's classification extension: the worker answers the top ``class_count`` entries
    # (workers/classification.py); 0: the output itself.
    class_count: int = 0


class OutputTensor:
    """One output of a response. ``data`` is its bytes, or None when it was written into a
    client region.

    An output the worker left in its output arena is *pending* until first used: a door
    that writes it straight into its own answer (``copy_into``) copies it once, from the
    arena into the answer, and the output keeps no bytes of its own then; any other use of
    ``data`` reads it into bytes. The dispatcher ``settle``s pending outputs before the
    arena may be written again.
    """

    __slots__ = ("_data", "_nbytes", "_source", "datatype", "name", "offset", "region_id",
                 "region_nbytes", "shape")

    def __init__(self, name: str, datatype: str, shape: list[int], data: bytes | None,
                 source: tuple[Segment | FileReader, int, int] | None = None, *,
                 region_nbytes: int = -1, offset: int = -1, region_id: int = -1) -> None:
        self.name = name
        self.datatype = datatype
        self.shape = shape
        # With data None (written into a client region or a response ring): how many bytes,
        # and where from the segment's start; -1 when the worker did not say.
        self.region_nbytes = region_nbytes
        self.offset = offset
        # With data None: the region it lies in (-1 when the worker did not say). Another
        # region than the one requested when the worker answered by reference.
        self.region_id = region_id
        self._data = data
        self._source = source  # (output arena, offset, nbytes) while pending
        self._nbytes = source[2] if source is not None else len(data) if data else 0

    @property
    def data(self) -> bytes | None:
        if self._source is not None:
            self.settle()
        elif self._data is _COPIED:
            raise RuntimeError(f"output '{self.name}' was copied into its answer already")
        return self._data

    @data.setter
    def data(self, value: bytes | None) -> None:
        self._data, self._source = value, None
        self._nbytes = len(value) if value else 0

    @property
    def pending(self) -> bool:
        return self._source is not None

    @property
    def nbytes(self) -> int:
        """The size of its bytes (0 for an output in a client region)."""
        return self._nbytes

    def copy_into(self, target: memoryview) -> None:
        """Write its bytes into ``target`` (``nbytes`` long). A pending output is read from
        the arena straight into it, and keeps no copy: this is its one use."""
        if self._source is not None:
            segment, offset, nbytes = self._source
            segment.read_into(offset, target[:nbytes])
            self._source, self._data = None, _COPIED
        elif self._data is not None:
            target[:len(self._data)] = self._data

    def read_through(self, readers: dict[int, FileReader]) -> None:
        """Read a pending output through a FileReader of its segment (one per segment in
        ``readers``, by id) from now on: another thread may copy it then."""
        if self._source is not None:
            segment, offset, nbytes = self._source
            if isinstance(segment, FileReader):
                return
            reader = readers.get(id(segment))
            if reader is None:
                reader = readers[id(segment)] = FileReader(segment)
            self._source = (reader, offset, nbytes)

    def settle(self) -> None:
        """Read a pending output into bytes (its arena is about to be reused)."""
        if self._source is not None:
            segment, offset, nbytes = self._source
            self._data, self._source = segment.read(offset, nbytes), None


_COPIED = b"copied"  # the data of a pending output after copy_into (see OutputTensor.data)


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
    trace: Trace | None = None        # sampled for tracing (tracing.py)
