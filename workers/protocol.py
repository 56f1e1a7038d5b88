"""Every frame between the supervisor and a worker, as typed records.

Frames are msgpack arrays streamed over a Unix socketpair (msgpack is self-delimiting, so no
length prefix is needed): ``[kind, field, ...]`` in the order of the record's fields; each
record packs to and unpacks from that array (``pack``/``unpack``), like ``TensorRef``. A new
field goes at the end of its record here and nowhere else; a change of layout bumps
``PROTOCOL_VERSION``, which the worker checks against its spec and the supervisor against
READY (a mismatch fails the load with both versions named).

Tensor bytes never travel in a frame unless they are tiny; a frame names them with a
*tensor reference*:

    TensorRef = [name, datatype, shape, where, location, offset, nbytes]

``where`` is one of:
    INLINE  -- ``location`` holds the bytes themselves (tiny tensors only)
    ARENA   -- ``location`` is the POSIX shm key of a per-instance arena segment
    SYSTEM  -- ``location`` is [region_id, shm_key]: a client-registered system region
    CUDA    -- ``location`` is [region_id, raw_handle, device_id]: a client CUDA IPC region
``offset`` is absolute inside the segment/allocation and ``nbytes`` the tensor's byte size.

Frames:
    supervisor -> worker: Exec, Cancel, Release, Ping, Stop, Attach, Detach, ShareRegion, Trim,
                          EndSequences
    worker -> supervisor: Stage, Ready, InitFailed, Done, Pong, Report, Partial

``Report`` comes from the worker's reporter thread (workers/reporter.py) when what the model
says about itself changed: its own readiness (``is_ready()``) and its custom metrics.

While it initializes, the worker names each hook before running it (``Stage``), so an
initialize that overruns its timeout is reported by stage.

``Exec`` runs its requests (``ExecRequest``) as one batch, or with ``each`` one execution per
request; large outputs go to the output arena of pipeline ``lane``. ``Done`` answers it with
one *result* per request (``ok_result``, ``error_result`` or ``ANSWERED``) and one
``[request indices, input ns, infer ns, output ns]`` per execution. A request may carry a
``tag`` ``[channel id, request id]``: the worker then answers its client through the local
channel itself (see direct_answers.py) and its result is ``ANSWERED``. ``Attach`` comes with
the channel's fds on the fd socket; ``Detach`` drops them. ``ShareRegion`` comes with a memfd
region's fd on the fd socket (payload ``region_fd_tag``): SYSTEM locations of that region
have an empty key and are mapped from that fd; ``Release`` drops it.

A decoupled model answers a request with any number of responses (``Partial``: request
``index`` of frame ``batch``, an ``ok_result``/``error_result`` or None, and ``final``); its
result in ``Done`` is then ``STREAMING``: the request stays in flight until a Partial with
``final`` (which may come before or after Done). A ``Cancel`` for such a request, after it
started, marks it cancelled for the model (``is_cancelled()``). Partial outputs travel inline
or into the client's region, never through a lane's arena (the lane is free once Done).

A model of an ``iterative_sequence`` may release a request for another run
(``RESCHEDULED`` in Done, no answer): the supervisor's sequence batcher sends it again in a
later frame, with the same inputs, until a run answers it.

The per-request path builds and reads the arrays directly (``packed_exec_request``,
``packed_inline``, the ``RESULT_*`` kinds) instead of going through a record object.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import msgpack

from shmserve.workers.backend import InstanceSpec, ModelSpec

# 1: msgpack maps before typed records; 2: before ShareRegion; 3: before Trim; 4: before Stage;
# 5: before Report; 6: before Ready.concurrency; 7: before Partial; 8: before EndSequences;
# 9: before ExecRequest.ring; 10: before the by-reference flag of ExecRequest.outputs;
# 13: before an output's class count (classification)
PROTOCOL_VERSION = 14

INLINE = "i"
ARENA = "a"
SYSTEM = "s"
CUDA = "c"

# Frame kinds: the first element of every frame.
EXEC = 1
CANCEL = 2
RELEASE = 3
PING = 4
STOP = 5
ATTACH = 6
DETACH = 7
SHARE_REGION = 8
TRIM = 9     # the instance is idle: give back the memory grown arenas hold
READY = 10
INIT_FAILED = 11
DONE = 12
PONG = 13
STAGE = 14
REPORT = 15  # the model's own readiness and custom metrics changed
PARTIAL = 16  # one response of a decoupled request
END_SEQUENCES = 17  # the supervisor ended these sequences (idle): drop their implicit state
LOG_SWITCHES = 18  # the server's log settings changed (the logging API)

# Result kinds: the first element of each request's result in DONE.
RESULT_OK = 0          # [RESULT_OK, [packed TensorRef, ...]]
RESULT_ERROR = 1       # [RESULT_ERROR, grpc status code name, message]
RESULT_ANSWERED = 2    # [RESULT_ANSWERED]: answered through the local channel
RESULT_STREAMING = 3   # [RESULT_STREAMING]: answered in Partial frames (decoupled)
RESULT_RESCHEDULED = 4  # [RESULT_RESCHEDULED]: not answered; run it again (iterative_sequence)

# Frames a concurrent backend (``Backend.concurrent``) may have in flight at once.
CONCURRENT_FRAMES = 16

# Tensors at or below this size travel inside the frame: cheaper than touching shared memory.
INLINE_LIMIT = 64 * 1024


class ProtocolMismatch(Exception):
    """The two sides of a control channel speak different protocol versions."""


def check_version(theirs: Any, who: str) -> None:
    if theirs != PROTOCOL_VERSION:
        raise ProtocolMismatch(f"{who} speaks worker protocol version {theirs!r}, this side "
                               f"{PROTOCOL_VERSION}: the supervisor and its workers must come "
                               f"from the same shmserve installation")


@dataclass(slots=True)
class TensorRef:
    name: str
    datatype: str
    shape: list[int]
    where: str
    location: Any
    offset: int = 0
    nbytes: int = 0

    def pack(self) -> list[Any]:
        return [self.name, self.datatype, self.shape, self.where, self.location, self.offset,
                self.nbytes]

    @classmethod
    def unpack(cls, raw: list[Any]) -> TensorRef:
        return cls(raw[0], raw[1], list(raw[2]), raw[3], raw[4], raw[5], raw[6])


def packed_inline(name: str, datatype: str, shape: list[int], data: bytes) -> list[Any]:
    """``TensorRef(..., INLINE, data, 0, len(data)).pack()`` without building the object
    (the per-request path for small tensors)."""
    return [name, datatype, shape, INLINE, data, 0, len(data)]


# --- results ------------------------------------------------------------------------------
def ok_result(outputs: list[list[Any]]) -> list[Any]:
    """A request's outputs as packed TensorRefs."""
    return [RESULT_OK, outputs]


def error_result(code: str, message: str) -> list[Any]:
    """A failed request: ``code`` is a gRPC status code name such as INVALID_ARGUMENT."""
    return [RESULT_ERROR, code, message]


ANSWERED: list[Any] = [RESULT_ANSWERED]
STREAMING: list[Any] = [RESULT_STREAMING]
RESCHEDULED: list[Any] = [RESULT_RESCHEDULED]


# --- frames -------------------------------------------------------------------------------
@dataclass(slots=True)
class ExecRequest:
    """One request of an Exec frame."""

    request_id: str
    inputs: list[list[Any]]                 # packed TensorRefs
    # [name, packed destination TensorRef or None] or, for an output that may pass by
    # reference (an ensemble intermediate), [name, destination, True]: the worker answers
    # it as a SYSTEM reference to the input memory the model returned, if it is that, and
    # inline if it is small (INLINE_LIMIT). [name, destination, by reference, k]: answer
    # its top k entries (classification).
    outputs: list[list[Any]]
    parameters: dict[str, Any]
    correlation_id: int | str = 0
    tag: list[int] | None = None            # [channel id, request id]: answer it directly
    # A decoupled request's response ring: [packed TensorRef of the ring (its region,
    # offset and size), slot bytes, slots]; None for the usual request.
    ring: list[Any] | None = None

    def pack(self) -> list[Any]:
        return [self.request_id, self.inputs, self.outputs, self.parameters,
                self.correlation_id, self.tag, self.ring]

    @classmethod
    def unpack(cls, raw: list[Any]) -> ExecRequest:
        return cls(raw[0], raw[1], raw[2], raw[3], raw[4], raw[5], raw[6])


def packed_exec_request(request_id: str, inputs: list[list[Any]], outputs: list[list[Any]],
                        parameters: dict[str, Any], correlation_id: int | str,
                        tag: list[int] | None, ring: list[Any] | None = None) -> list[Any]:
    """``ExecRequest(...).pack()`` without building the object (the per-request path)."""
    return [request_id, inputs, outputs, parameters, correlation_id, tag, ring]


@dataclass(slots=True)
class Exec:
    KIND: ClassVar[int] = EXEC
    batch: int
    requests: list[list[Any]]               # packed ExecRequests
    lane: int
    each: bool

    def pack(self) -> list[Any]:
        return [EXEC, self.batch, self.requests, self.lane, self.each]

    @classmethod
    def unpack(cls, raw: list[Any]) -> Exec:
        return cls(raw[1], raw[2], raw[3], raw[4])


@dataclass(slots=True)
class Cancel:
    """Skip request ``index`` of frame ``batch`` if it has not started."""

    KIND: ClassVar[int] = CANCEL
    batch: int
    index: int

    def pack(self) -> list[Any]:
        return [CANCEL, self.batch, self.index]

    @classmethod
    def unpack(cls, raw: list[Any]) -> Cancel:
        return cls(raw[1], raw[2])


@dataclass(slots=True)
class Release:
    """Unmap these client regions (they were unregistered and no request uses them)."""

    KIND: ClassVar[int] = RELEASE
    region_ids: list[int]

    def pack(self) -> list[Any]:
        return [RELEASE, self.region_ids]

    @classmethod
    def unpack(cls, raw: list[Any]) -> Release:
        return cls(raw[1])


@dataclass(slots=True)
class LogSwitches:
    """The log settings a worker follows: --log-info/--log-warning/--log-error, the verbose
    level and ISO 8601 timestamps (in its spec at start, then as the logging API changes
    them)."""

    KIND: ClassVar[int] = LOG_SWITCHES
    info: bool = True
    warning: bool = True
    error: bool = True
    verbose: int = 0
    iso8601: bool = False

    def pack(self) -> list[Any]:
        return [LOG_SWITCHES, self.info, self.warning, self.error, self.verbose, self.iso8601]

    @classmethod
    def unpack(cls, raw: list[Any]) -> LogSwitches:
        return cls(bool(raw[1]), bool(raw[2]), bool(raw[3]), int(raw[4]), bool(raw[5]))


@dataclass(slots=True)
class EndSequences:
    """These sequences (correlation ids) were ended by the supervisor (idle past
    ``max_sequence_idle_microseconds``): drop their implicit state."""

    KIND: ClassVar[int] = END_SEQUENCES
    correlation_ids: list[int | str]

    def pack(self) -> list[Any]:
        return [END_SEQUENCES, self.correlation_ids]

    @classmethod
    def unpack(cls, raw: list[Any]) -> EndSequences:
        return cls(list(raw[1]))


@dataclass(slots=True)
class Attach:
    """Answer channel ``channel`` directly into the ring at ``base`` (fds on the fd socket)."""

    KIND: ClassVar[int] = ATTACH
    channel: int
    base: int
    capacity: int

    def pack(self) -> list[Any]:
        return [ATTACH, self.channel, self.base, self.capacity]

    @classmethod
    def unpack(cls, raw: list[Any]) -> Attach:
        return cls(raw[1], raw[2], raw[3])


@dataclass(slots=True)
class Detach:
    KIND: ClassVar[int] = DETACH
    channel: int

    def pack(self) -> list[Any]:
        return [DETACH, self.channel]

    @classmethod
    def unpack(cls, raw: list[Any]) -> Detach:
        return cls(raw[1])


@dataclass(slots=True)
class ShareRegion:
    """Map memfd region ``region_id`` from the fd that came with this frame on the fd socket
    (payload ``region_fd_tag(region_id)``)."""

    KIND: ClassVar[int] = SHARE_REGION
    region_id: int

    def pack(self) -> list[Any]:
        return [SHARE_REGION, self.region_id]

    @classmethod
    def unpack(cls, raw: list[Any]) -> ShareRegion:
        return cls(raw[1])


def region_fd_tag(region_id: int) -> bytes:
    """The fd socket payload that comes with ``ShareRegion(region_id)``."""
    return b"region:%d" % region_id


@dataclass(slots=True)
class Ready:
    """The worker's initialize hooks ran: it serves, speaking ``version``. ``concurrency``
    frames may be in flight to it at once (more than the pipeline depth: its backend runs
    executions concurrently, e.g. ``async def execute``)."""

    KIND: ClassVar[int] = READY
    version: int
    pid: int
    concurrency: int = 1

    def pack(self) -> list[Any]:
        return [READY, self.version, self.pid, self.concurrency]

    @classmethod
    def unpack(cls, raw: list[Any]) -> Ready:
        return cls(raw[1], raw[2], raw[3])


@dataclass(slots=True)
class Stage:
    """The worker starts the initialize hook ``name`` (e.g. model_initialize)."""

    KIND: ClassVar[int] = STAGE
    name: str

    def pack(self) -> list[Any]:
        return [STAGE, self.name]

    @classmethod
    def unpack(cls, raw: list[Any]) -> Stage:
        return cls(raw[1])


@dataclass(slots=True)
class InitFailed:
    KIND: ClassVar[int] = INIT_FAILED
    version: int
    code: str
    message: str

    def pack(self) -> list[Any]:
        return [INIT_FAILED, self.version, self.code, self.message]

    @classmethod
    def unpack(cls, raw: list[Any]) -> InitFailed:
        return cls(raw[1], raw[2], raw[3])


@dataclass(slots=True)
class Done:
    KIND: ClassVar[int] = DONE
    batch: int
    results: list[list[Any]]                # one result per request (ok/error/ANSWERED)
    executions: list[list[Any]]             # [request indices, input ns, infer ns, output ns]

    def pack(self) -> list[Any]:
        return [DONE, self.batch, self.results, self.executions]

    @classmethod
    def unpack(cls, raw: list[Any]) -> Done:
        return cls(raw[1], raw[2], raw[3])


@dataclass(slots=True)
class Partial:
    """One response of request ``index`` of frame ``batch`` (a decoupled model): ``result``
    is an ok_result, an error_result, or None (only the final flag)."""

    KIND: ClassVar[int] = PARTIAL
    batch: int
    index: int
    result: list[Any] | None
    final: bool

    def pack(self) -> list[Any]:
        return [PARTIAL, self.batch, self.index, self.result, self.final]

    @classmethod
    def unpack(cls, raw: list[Any]) -> Partial:
        return cls(raw[1], raw[2], raw[3], raw[4])


# Frames without fields.
PING_FRAME: list[Any] = [PING]
STOP_FRAME: list[Any] = [STOP]
#: ``Report.ready``: the model defines no ``is_ready()``, or what it last answered.
READY_UNDEFINED = -1


@dataclass(slots=True)
class Report:
    """What the model says about itself: ``ready`` (READY_UNDEFINED, 0 or 1) and its custom
    metric families, each ``[name, description, kind, [[labels, value], ...]]`` where labels
    is ``[[key, value], ...]`` and a histogram's value is ``[bounds, counts, sum, count]``."""

    KIND: ClassVar[int] = REPORT
    ready: int
    metrics: list[Any]

    def pack(self) -> list[Any]:
        return [REPORT, self.ready, self.metrics]

    @classmethod
    def unpack(cls, raw: list[Any]) -> Report:
        return cls(int(raw[1]), list(raw[2]))


PONG_FRAME: list[Any] = [PONG]
TRIM_FRAME: list[Any] = [TRIM]


# --- the worker's spec --------------------------------------------------------------------
@dataclass(slots=True)
class WorkerSpec:
    """Everything a worker process is started with (passed once, at start)."""

    model: ModelSpec
    instance: InstanceSpec
    backend: str
    supervisor_pid: int
    arena_owner: str                        # names this worker's arenas
    lanes: int = 1                          # pipeline lanes: one output arena each
    heartbeat_secs: float = 5.0
    busy_poll_us: int = 0
    log_level: int = 30                     # logging.WARNING
    cuda_visible_devices: str | None = None  # set for KIND_GPU instances
    cpus: list[int] | None = None           # CPU affinity, if pinned
    backend_config: dict[str, Any] = field(default_factory=dict)
    protocol_version: int = PROTOCOL_VERSION
    instance_count: int = 1                 # instances of the model (BLS self-call check)
    log_switches: list[Any] | None = None   # packed LogSwitches; None: all on


def encode(frame: list[Any]) -> bytes:
    return msgpack.packb(frame, use_bin_type=True)


def new_unpacker() -> msgpack.Unpacker:
    # Large tensors never travel inline, but a batch of tiny ones may add up.
    return msgpack.Unpacker(raw=False, max_buffer_size=1 << 31)
