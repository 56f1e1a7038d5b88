"""The typed records a frontend process and the core exchange over the frontend's channel.

They ride in the local channel's rings (protos/local_messages.py) as the payload of three
operations only a frontend's channel accepts:

    items   ``FrontendInfer``: an inference request the frontend parsed (``RequestItems``);
            answered like a local-channel "infer" (by the worker directly when it can)
    rpc     ``RpcCall``: a non-inference gRPC call (health, metadata, statistics, the
            repository, shared-memory registration, ...) run by the core's own gRPC door,
            answered ``{"id", "res": serialized response}`` or an error reply
    ready   ``FrontendReady``: the frontend serves its port
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from shmserve.daemon.errors import ServeError
from shmserve.daemon.infer_request import OutputIn, RequestItems, TensorIn
from shmserve.daemon.request import InferRequest, OutputTensor
from shmserve.workers.shm import Pieces

OP_ITEMS = "items"
OP_RPC = "rpc"
OP_READY = "ready"


def ring_place(request: InferRequest, output: OutputTensor) -> list[int] | None:
    """Where an answered output lies in its request's response ring, as the gRPC response
    names it: [offset from the ring region's start, bytes]; None for any other output.
    The core sends it after an answer's output entry (the frontend has no region offsets)."""
    ring = request.ring
    if ring is None or output.offset < 0 or output.pending or output.data is not None:
        return None
    return [output.offset - ring.region.offset, output.region_nbytes]


def answer_output(name: str, datatype: str, shape: list[int], data: Any,
                  place: list[int] | None) -> OutputTensor:
    """The frontend's end of ``ring_place``: an answer's output entry as an OutputTensor."""
    if place is None:
        return OutputTensor(name, datatype, shape, data)
    offset, nbytes = place
    if type(offset) is not int or type(nbytes) is not int:
        raise TypeError("malformed response ring place")
    return OutputTensor(name, datatype, shape, data, region_nbytes=nbytes, offset=offset)


def _error(error: ServeError | None) -> list[str] | None:
    return None if error is None else [error.code.name, error.message]


def _fault(raw: list[str] | None) -> ServeError | None:
    return None if raw is None else ServeError.from_tuple(raw)


def _shm(raw: list[Any] | None) -> tuple[str, int, int] | None:
    if raw is None:
        return None
    region, offset, byte_size = raw
    if type(region) is not str or type(offset) is not int or type(byte_size) is not int:
        raise TypeError("bad region reference")
    return region, offset, byte_size


def pack_items(items: RequestItems) -> list[Any]:
    """``RequestItems`` as msgpack-ready lists (tensor bytes stay zero-copy views)."""
    return [
        [[t.name, t.datatype, t.shape, bytes(t.data) if isinstance(t.data, Pieces) else t.data,
          t.shm, _error(t.fault)] for t in items.inputs],
        [[o.name, o.shm, _error(o.fault), o.class_count] for o in items.outputs],
        items.parameters, items.request_id, _error(items.late_fault)]


def unpack_items(fields: list[Any], owner: str) -> RequestItems:
    """The core's end of ``pack_items``; raises TypeError/ValueError on a malformed record.
    ``owner`` is the frontend's channel: it sees the gRPC regions (named globally) and its
    own private ones (spill.py)."""
    inputs_raw, outputs_raw, parameters, request_id, late_fault = fields
    inputs = []
    for name, datatype, shape, data, shm, fault in inputs_raw:
        if type(name) is not str or type(datatype) is not str or type(shape) is not list \
                or not (data is None or type(data) is bytes):
            raise TypeError(f"malformed input {name!r}")
        inputs.append(TensorIn(name, datatype, shape, data, _shm(shm), _fault(fault)))
    outputs = []
    for name, shm, fault, class_count in outputs_raw:
        if type(class_count) is not int:
            raise TypeError(f"malformed output {name!r}")
        outputs.append(OutputIn(name, _shm(shm), _fault(fault), class_count=class_count))
    if type(parameters) is not dict or type(request_id) is not str:
        raise TypeError("malformed parameters or request id")
    return RequestItems(inputs, outputs, parameters, request_id, owner, _fault(late_fault))


@dataclass(frozen=True, slots=True)
class FrontendInfer:
    """One inference request, parsed by the frontend. ``parse_error`` is what parsing
    raised: the core raises it after resolving the model, as the in-process door does."""

    model: str
    version: str
    streaming: bool
    items: RequestItems | None
    parse_error: ServeError | None = None
    spill: tuple[int, int] | None = None  # (fd tag, bytes): its large inputs' memfd

    @staticmethod
    def spill_name(tag: int) -> str:
        """The private region name (on the frontend's channel) of a request's spilled inputs."""
        return f"~in{tag}"

    def message(self) -> dict[str, Any]:
        return {"op": OP_ITEMS, "model": self.model, "version": self.version,
                "s": self.streaming,
                "items": None if self.items is None else pack_items(self.items),
                "perr": _error(self.parse_error), "spill": self.spill}

    @classmethod
    def from_message(cls, message: dict[str, Any], owner: str) -> FrontendInfer:
        model, version, items = message["model"], message["version"], message["items"]
        if type(model) is not str or type(version) is not str:
            raise TypeError("model and version must be strings")
        spill = message["spill"]
        if spill is not None:
            tag, size = spill
            if type(tag) is not int or type(size) is not int:
                raise TypeError("malformed spill")
            spill = (tag, size)
        return cls(model, version, message["s"] is True,
                   None if items is None else unpack_items(items, owner),
                   _fault(message["perr"]), spill)


@dataclass(frozen=True, slots=True)
class RpcCall:
    """A non-inference RPC: its name (``RPCS`` of frontend/service.py, or the health
    service's Check), the serialized request, the caller's ``shmserve-client-id`` (its region
    scope), and how many inference answers the frontend had received: the core runs the call
    once it has accounted for as many (a worker's direct answer is counted when its Done frame
    is read, a moment later), so statistics read after an answer include it."""

    rpc: str
    request: bytes
    client_id: str
    answered: int = 0

    def message(self) -> dict[str, Any]:
        return {"op": OP_RPC, "call": [self.rpc, self.request, self.client_id, self.answered]}

    @classmethod
    def from_message(cls, message: dict[str, Any]) -> RpcCall:
        rpc, request, client_id, answered = message["call"]
        if type(rpc) is not str or type(request) is not bytes or type(client_id) is not str \
                or type(answered) is not int:
            raise TypeError("malformed rpc call")
        return cls(rpc, request, client_id, answered)


@dataclass(frozen=True, slots=True)
class RpcAnswer:
    """The serialized response of an ``RpcCall`` (errors travel as error replies)."""

    response: bytes

    def message(self, request_id: int) -> dict[str, Any]:
        return {"id": request_id, "res": self.response}

    @classmethod
    def from_reply(cls, reply: dict[str, Any]) -> RpcAnswer:
        response = reply["res"]
        if type(response) is not bytes:
            raise TypeError("malformed rpc answer")
        return cls(response)


@dataclass(frozen=True, slots=True)
class FrontendReady:
    """The frontend serves its port (sent once, after its gRPC server started)."""

    index: int
    pid: int

    def message(self) -> dict[str, Any]:
        return {"op": OP_READY, "ready": [self.index, self.pid]}

    @classmethod
    def from_message(cls, message: dict[str, Any]) -> FrontendReady:
        index, pid = message["ready"]
        if type(index) is not int or type(pid) is not int:
            raise TypeError("malformed ready")
        return cls(index, pid)
