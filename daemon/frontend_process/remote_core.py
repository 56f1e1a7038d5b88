"""The core as a frontend process sees it: a privileged local channel to the supervisor.

``RemoteCore`` has the ``submit``/``cancel`` of daemon/core.py (``CoreAccess``), so the gRPC
door's inference code runs here unchanged: ``submit`` sends the parsed request
(``FrontendInfer``) through the channel's ring and answers the door's reply when the answer
comes, usually straight from the worker that executed it (a direct ring).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, cast

from shmserve.client.errors import ShmserveError
from shmserve.client.local_channel import AsyncLocalChannel
from shmserve.daemon.errors import ServeError, resource_exhausted
from shmserve.daemon.frontend_process.records import (
    FrontendInfer,
    RpcAnswer,
    RpcCall,
    answer_output,
)
from shmserve.daemon.frontend_process.spill import (
    SMALL_TENSOR_BYTES,
    SPILL_BYTES,
    map_memfd,
    write_memfd,
)
from shmserve.daemon.infer_request import (  # the inline BYTES checks, for spilled inputs
    BYTES_CHECKED_ON_LOOP,
    RequestItems,
    TensorIn,
    _check_bytes_tensor,
)
from shmserve.daemon.reply import Reply
from shmserve.daemon.request import InferRequest, OutputTensor, RequestedOutput, ResponseRing
from shmserve.daemon.settings import Settings
from shmserve.daemon.shm_registry import Region
from shmserve.protos.datatypes import element_count
from shmserve.protos.local_ring import MessageTooLarge
from shmserve.protos.response_ring import REGION as RING_REGION

log = logging.getLogger("shmserve.frontend")


@dataclass(slots=True)
class RemoteRequest(InferRequest):
    """What the door keeps of a request it sent to the core: enough to render the answer
    (model, version once answered, request id, the names of output regions)."""

    channel_request: int = 0


def _serve_error(error: BaseException) -> ServeError:
    if isinstance(error, ServeError):
        return error
    if isinstance(error, ShmserveError):
        return ServeError(error.code, error.message)
    return ServeError.from_tuple(["INTERNAL", f"{type(error).__name__}: {error}"])


def _outputs(answer: dict[str, Any], channel: AsyncLocalChannel) -> list[OutputTensor]:
    raw: list[list[Any]] = answer["out"]
    tag = answer.get("spill")
    if tag is None:  # a response ring's outputs have their place in it after their data
        return [OutputTensor(entry[0], entry[1], entry[2], entry[3]) if len(entry) == 4
                else answer_output(*entry) for entry in raw]
    if channel.fd_door is None:
        raise ServeError.from_tuple(["INTERNAL", "an answer in a memfd, and no fd door"])
    memory = map_memfd(channel.fd_door.receive_fd(tag))
    # Slices of the mapping: the door copies them once, into the gRPC response.
    return [answer_output(name, datatype, shape, None if place is None else
                          cast(bytes, memory[place[0]:place[0] + place[1]]), ring)
            for name, datatype, shape, place, ring in raw]


def _spilled(tensor: TensorIn) -> bool:
    if tensor.data is None or tensor.shm is not None:
        return False
    if tensor.datatype == "BYTES":
        # Only those the core checks in O(1) anyway (smaller ones it parses on its loop).
        return len(tensor.data) > BYTES_CHECKED_ON_LOOP
    return len(tensor.data) > SMALL_TENSOR_BYTES


def _spill_inputs(model: str, items: RequestItems, channel: AsyncLocalChannel
                  ) -> tuple[int, int] | None:
    """Large inputs into one sealed memfd, passed over the fd door (spill.py); the inputs
    then name it as a region. None when the request is small (or there is no door)."""
    total = sum(len(t.data) for t in items.inputs if t.data is not None)
    if total <= SPILL_BYTES or channel.fd_door is None:
        return None
    large = [t for t in items.inputs if _spilled(t)]
    if not large:
        return None
    for tensor in large:
        if tensor.datatype == "BYTES" and tensor.fault is None and tensor.data is not None:
            try:  # the checks the core makes of inline BYTES data, not of a region's
                _check_bytes_tensor(tensor.name, model, tensor.data,
                                    element_count(tensor.shape))
            except ServeError as exc:
                tensor.fault = exc
    parts = [t.data for t in large if t.data is not None]
    fd, offsets = write_memfd("shmserve-frontend-in", parts)
    try:
        tag = channel.fd_door.pass_fd(fd)
    finally:
        os.close(fd)
    name = f"@{channel.channel_id}:{FrontendInfer.spill_name(tag)}"
    for tensor, offset in zip(large, offsets, strict=True):
        assert tensor.data is not None
        tensor.shm = (name, offset, len(tensor.data))
        tensor.data = None  # the request's bytes can go as soon as gRPC lets them
    return tag, sum(len(part) for part in parts)


def _region(name: str) -> Region:
    # Only the region's name is read back (the response names it); the core holds the rest.
    return Region(name, "system", "", 0, 0, "")


def _requested(items: RequestItems | None) -> list[RequestedOutput]:
    if items is None:
        return []
    return [RequestedOutput(o.name, None if o.shm is None else _region(o.shm[0]))
            for o in items.outputs]


def _ring(items: RequestItems | None) -> ResponseRing | None:
    """The response ring the request names, as far as its responses name it: the core
    validates it and sends each output's place relative to the region (ring_place)."""
    if items is None or not items.parameters:
        return None
    name = items.parameters.get(RING_REGION)
    return ResponseRing(_region(name), 0, 0, 0) if type(name) is str else None


class RemoteCore:
    def __init__(self, channel: AsyncLocalChannel, settings: Settings) -> None:
        self.channel = channel
        self._settings = settings
        self.answered = 0  # final answers received for inference requests (RpcCall.answered)

    @property
    def settings(self) -> Settings:
        return self._settings

    def submit(self, model_name: str, version: str, parse: Callable[[], RequestItems],
               reply: Reply, streaming: bool = False) -> InferRequest:
        items: RequestItems | None = None
        parse_error: ServeError | None = None
        try:
            items = parse()
        except ServeError as exc:  # the core raises it once the model is known
            parse_error = exc
        request = RemoteRequest(model_name, 0, "" if items is None else items.request_id, [],
                                _requested(items), 0, reply)
        request.ring = _ring(items)
        reply.request = request
        try:
            spill = None if items is None else _spill_inputs(model_name, items, self.channel)
            message = FrontendInfer(model_name, version, streaming, items, parse_error,
                                    spill).message()
            # Answered from the channel's reader itself (no future: no extra loop iteration).
            request.channel_request = self.channel.send_nowait(
                message, partial(_answered, self, request),
                partial(_partial, request, self.channel) if streaming else None)
        except MessageTooLarge as exc:
            raise resource_exhausted(
                f"request too large for a frontend process's channel to the core ({exc}); "
                f"send large tensors in shared-memory regions or raise --local-ring-bytes"
            ) from None
        except ShmserveError as exc:
            raise ServeError(exc.code, exc.message) from None
        return request

    def cancel(self, request: InferRequest) -> None:
        if not request.done and isinstance(request, RemoteRequest):
            request.done = True
            self.channel.cancel(request.channel_request)
            self.channel.forget(request.channel_request)

    async def call(self, call: RpcCall) -> bytes:
        """A forwarded non-inference RPC: its serialized response. Raises ServeError."""
        try:
            reply = await self.channel.call(replace(call, answered=self.answered).message())
        except ShmserveError as exc:
            raise ServeError(exc.code, exc.message) from None
        return RpcAnswer.from_reply(reply).response


def _answered(core: RemoteCore, request: RemoteRequest,
              answer: dict[str, Any] | None, error: ShmserveError | None) -> None:
    """Called by the channel's reader: an exception here would end the channel (every
    request of this frontend), so none leaves."""
    if answer is not None:
        core.answered += 1
    if request.done:
        return
    request.done = True
    try:
        _deliver(request, core.channel, answer, error)
    except Exception:
        log.exception("answering a request failed")


def _deliver(request: RemoteRequest, channel: AsyncLocalChannel,
             answer: dict[str, Any] | None, error: ShmserveError | None) -> None:
    reply = request.reply
    if answer is None:
        reply.fail(_serve_error(error or RuntimeError("no answer")))
        return
    if "model_version" in answer:
        request.version = int(answer["model_version"])
    if "err" in answer:
        reply.fail(ServeError.from_tuple(answer["err"]))
    elif answer.get("end"):
        reply.end()
    else:
        try:
            outputs = _outputs(answer, channel)
        except (ServeError, ShmserveError, OSError) as exc:
            reply.fail(_serve_error(exc))
            return
        reply.send(outputs, True)


def _partial(request: RemoteRequest, channel: AsyncLocalChannel, answer: dict[str, Any]
             ) -> None:
    """A streamed request's response that more follow."""
    if request.done:
        return
    try:
        _deliver_partial(request, channel, answer)
    except Exception:
        log.exception("answering a streamed request failed")


def _deliver_partial(request: RemoteRequest, channel: AsyncLocalChannel,
                     answer: dict[str, Any]) -> None:
    if "model_version" in answer:
        request.version = int(answer["model_version"])
    if "err" in answer:
        request.reply.send_error(ServeError.from_tuple(answer["err"]), False)
    else:
        try:
            outputs = _outputs(answer, channel)
        except (ServeError, ShmserveError, OSError) as exc:
            request.reply.send_error(_serve_error(exc), False)
            return
        request.reply.send(outputs, False)
