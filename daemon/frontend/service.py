"""The gRPC frontend: one thin method per RPC of inference.GRPCInferenceService."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from shmserve.daemon.core import Core
from shmserve.daemon.core_access import CoreAccess
from shmserve.daemon.errors import (
    ServeError,
    internal,
    invalid_argument,
    unavailable,
    unimplemented,
)
from shmserve.daemon.frontend.infer_grpc import (
    parse_request,
    response_head,
    response_metadata,
    response_parts,
)
from shmserve.daemon.frontend.wire import (
    WireError,
    parse_infer_request,
    serialize_infer_outputs,
    serialize_infer_response,
    serialize_stream_response,
)
from shmserve.daemon.header_forward import Headers, forwarder, with_headers
from shmserve.daemon.heap import KEEP_BYTES, trim_heap
from shmserve.daemon.operations import Operations
from shmserve.daemon.reply import FutureReply, Reply
from shmserve.daemon.request import InferRequest, OutputTensor
from shmserve.daemon.restrictions import GRPC_HEADER_PREFIX, restriction_for
from shmserve.daemon.settings import Settings
from shmserve.daemon.stream_budget import StreamBudget
from shmserve.protos import shmserve_health_pb2 as health_pb
from shmserve.protos import shmserve_service_pb2 as pb

log = logging.getLogger("shmserve.frontend")

SERVICE_NAME = "inference.GRPCInferenceService"
HEALTH_SERVICE_NAME = "grpc.health.v1.Health"
HEALTH_CHECK_RPC = f"{HEALTH_SERVICE_NAME}/Check"  # its name among forwarded calls
CLIENT_ID_HEADER = "shmserve-client-id"

# RPC -> (request type, response type, streaming, protocol group)
RPCS: dict[str, tuple[Any, Any, bool, str]] = {
    "ServerLive": (pb.ServerLiveRequest, pb.ServerLiveResponse, False, "health"),
    "ServerReady": (pb.ServerReadyRequest, pb.ServerReadyResponse, False, "health"),
    "ModelReady": (pb.ModelReadyRequest, pb.ModelReadyResponse, False, "health"),
    "ServerMetadata": (pb.ServerMetadataRequest, pb.ServerMetadataResponse, False, "metadata"),
    "ModelMetadata": (pb.ModelMetadataRequest, pb.ModelMetadataResponse, False, "metadata"),
    "ModelInfer": (None, None, False, "inference"),          # wire bytes both ways (wire.py)
    "ModelStreamInfer": (None, None, True, "inference"),
    "ModelConfig": (pb.ModelConfigRequest, pb.ModelConfigResponse, False, "model-config"),
    "ModelStatistics": (pb.ModelStatisticsRequest, pb.ModelStatisticsResponse, False,
                        "statistics"),
    "RepositoryIndex": (pb.RepositoryIndexRequest, pb.RepositoryIndexResponse, False,
                        "model-repository"),
    "RepositoryModelLoad": (pb.RepositoryModelLoadRequest, pb.RepositoryModelLoadResponse,
                            False, "model-repository"),
    "RepositoryModelUnload": (pb.RepositoryModelUnloadRequest,
                              pb.RepositoryModelUnloadResponse, False, "model-repository"),
    "SystemSharedMemoryStatus": (pb.SystemSharedMemoryStatusRequest,
                                 pb.SystemSharedMemoryStatusResponse, False, "shared-memory"),
    "SystemSharedMemoryRegister": (pb.SystemSharedMemoryRegisterRequest,
                                   pb.SystemSharedMemoryRegisterResponse, False,
                                   "shared-memory"),
    "SystemSharedMemoryUnregister": (pb.SystemSharedMemoryUnregisterRequest,
                                     pb.SystemSharedMemoryUnregisterResponse, False,
                                     "shared-memory"),
    "CudaSharedMemoryStatus": (pb.CudaSharedMemoryStatusRequest,
                               pb.CudaSharedMemoryStatusResponse, False, "shared-memory"),
    "CudaSharedMemoryRegister": (pb.CudaSharedMemoryRegisterRequest,
                                 pb.CudaSharedMemoryRegisterResponse, False, "shared-memory"),
    "CudaSharedMemoryUnregister": (pb.CudaSharedMemoryUnregisterRequest,
                                   pb.CudaSharedMemoryUnregisterResponse, False,
                                   "shared-memory"),
    "TraceSetting": (pb.TraceSettingRequest, pb.TraceSettingResponse, False, "trace"),
    "LogSettings": (pb.LogSettingsRequest, pb.LogSettingsResponse, False, "logging"),
}


def _client_id(context: grpc.aio.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == CLIENT_ID_HEADER:
            # "local:" owners are the server's own local channels; nobody may pose as one.
            return "" if str(value).startswith("local:") else str(value)
    return ""


class _ForwardedContext:
    """What a forwarded call's handler reads of its gRPC context: the caller's client id."""

    def __init__(self, client_id: str) -> None:
        self._metadata = ((CLIENT_ID_HEADER, client_id),) if client_id else ()

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata


class InferenceService:
    """The gRPC door: holds the core, nothing of another door. In a frontend process
    (``--grpc-frontends``) ``core`` is the link to the core, and only inference runs here:
    every other RPC is forwarded (``generic_handlers(forward=...)``) to ``run_forwarded``
    of the core's own door."""

    def __init__(self, core: CoreAccess) -> None:
        self.core = core
        self._forward = forwarder(core.settings.grpc_header_forward_pattern)
        self._operations: Operations | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def operations(self) -> Operations:
        if self._operations is None:
            self._operations = Operations(self._core())
        return self._operations

    def _core(self) -> Core:
        if not isinstance(self.core, Core):
            raise internal("this operation runs in the core process only")
        return self.core

    async def run_forwarded(self, rpc: str, request: bytes, client_id: str) -> bytes:
        """A frontend process's non-inference call, run as if it had arrived here; the
        serialized response. Raises ServeError."""
        context = _ForwardedContext(client_id)
        if rpc == HEALTH_CHECK_RPC:
            check = _health_check(self._core())
            health = await check(health_pb.HealthCheckRequest.FromString(request), context)
            return bytes(health.SerializeToString())
        entry = RPCS.get(rpc)
        if entry is None or entry[0] is None:
            raise unimplemented(f"RPC '{rpc}' cannot be forwarded")
        response = await getattr(self, rpc)(entry[0].FromString(request), context)
        return bytes(response.SerializeToString())

    # --- health and metadata (daemon/operations.py) -----------------------------------
    async def ServerLive(self, request: pb.ServerLiveRequest,
                         context: grpc.aio.ServicerContext) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=self.operations.server_live())

    async def ServerReady(self, request: pb.ServerReadyRequest,
                          context: grpc.aio.ServicerContext) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.operations.server_ready())

    async def ModelReady(self, request: pb.ModelReadyRequest,
                         context: grpc.aio.ServicerContext) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(
            ready=self.operations.model_ready(request.name, request.version))

    async def ServerMetadata(self, request: pb.ServerMetadataRequest,
                             context: grpc.aio.ServicerContext) -> pb.ServerMetadataResponse:
        return self.operations.server_metadata()

    async def ModelMetadata(self, request: pb.ModelMetadataRequest,
                            context: grpc.aio.ServicerContext) -> pb.ModelMetadataResponse:
        return self.operations.model_metadata(request.name, request.version)

    async def ModelConfig(self, request: pb.ModelConfigRequest,
                          context: grpc.aio.ServicerContext) -> pb.ModelConfigResponse:
        return pb.ModelConfigResponse(
            config=self.operations.model_config(request.name, request.version))

    # --- inference ----------------------------------------------------------------------
    async def ModelInfer(self, requests: object, context: grpc.aio.ServicerContext) -> bytes:
        """Takes and returns wire bytes: tensor bytes are sliced, not copied (see wire.py).

        Registered as stream-unary (the wire is the same for a unary client) and read once
        with ``context.read()``: gRPC's unary handler keeps the request bytes referenced
        until the response is sent, this way they are freed once staged into the arena.
        """
        internal, reply = self._submit(await context.read(), self._headers(context))
        try:
            await reply.future
        except asyncio.CancelledError:
            self.core.cancel(internal)  # as in _outcome, without a coroutine more per request
            raise
        finally:
            reply.request = None  # see _unlink
        message, reply.message = reply.message, b""  # the request may outlive the call
        if len(message) >= KEEP_BYTES:  # its buffers (ours, gRPC's) go once it was sent
            context.add_done_callback(_trim_heap_after)
        return message

    def _headers(self, context: grpc.aio.ServicerContext) -> Headers | None:
        """The call's headers to forward as request parameters (None without a pattern)."""
        if self._forward is None:
            return None
        return self._forward.pick(context.invocation_metadata() or ())

    def _submit(self, data: bytes | object, headers: Headers | None = None
                ) -> tuple[InferRequest, _WireReply]:
        """Parse and queue one ModelInferRequest; from here on only the queued request holds
        (slices of) ``data``."""
        if not isinstance(data, bytes):  # grpc.aio.EOF: the client sent no message
            raise invalid_argument("malformed ModelInferRequest: no request message")
        if len(data) >= KEEP_BYTES:
            trim_heap()  # gRPC's receive pieces of a huge request, joined into ``data``
        request, raw = _parse_request(data)
        reply = _WireReply(self._future())
        internal = self.core.submit(request.model_name, request.model_version,
                                    lambda: with_headers(parse_request(request, raw), headers),
                                    reply)
        return internal, reply

    def _future(self) -> asyncio.Future[Any]:
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        return loop.create_future()

    def _queue(self, request: pb.ModelInferRequest, raw: list[bytes | memoryview] | None
               ) -> tuple[InferRequest, FutureReply]:
        reply = FutureReply(self._future())
        internal = self.core.submit(request.model_name, request.model_version,
                                    lambda: parse_request(request, raw), reply)
        return internal, reply

    async def _outcome(self, internal: InferRequest, reply: FutureReply
                       ) -> list[OutputTensor]:
        try:
            return await reply.future
        except asyncio.CancelledError:
            # The caller gave up (deadline, cancel): a queued request is dropped; one
            # already executing keeps its regions pinned until the worker is done.
            self.core.cancel(internal)
            raise
        finally:
            reply.request = None  # see _unlink

    async def _infer(self, parsed: tuple[pb.ModelInferRequest, list[bytes | memoryview]]) -> bytes:
        internal, outputs = await self.infer_outputs(*parsed)
        response, raw = response_parts(internal, outputs)
        return serialize_infer_response(response, raw)

    async def infer_outputs(self, request: pb.ModelInferRequest,
                            raw: list[bytes | memoryview] | None = None
                            ) -> tuple[InferRequest, list[OutputTensor]]:
        """gRPC inference: hand the request to the core, wait for its reply. Raises
        ServeError."""
        internal, reply = self._queue(request, raw)
        return internal, await self._outcome(internal, reply)

    async def ModelStreamInfer(self, requests: AsyncIterator[bytes],
                               context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        """Requests run concurrently, each answered by its responses as they come (several
        for a decoupled model, each with ``triton_final_response``); an error goes in
        ``error_message`` and the stream stays open. A stream that ends or is cancelled
        cancels its requests still open."""
        settings = self.core.settings
        stream = _Stream(StreamBudget(settings.stream_max_pending_responses,
                                      settings.stream_max_pending_bytes))
        headers = self._headers(context)

        async def read() -> None:
            try:
                async for data in requests:
                    request = pb.ModelInferRequest()
                    try:
                        request, raw = _parse_request(data)
                        stream.opened(self._submit_streamed(stream, request, raw, headers))
                    except ServeError as exc:
                        stream.put(_stream_error(request, exc.message))
                    except Exception as exc:
                        log.exception("stream request failed")
                        stream.put(_stream_error(request, f"{type(exc).__name__}: {exc}"))
            finally:
                stream.reading_done()

        reader = asyncio.create_task(read())
        try:
            while True:
                item = await stream.get()
                if item is None:
                    break
                yield item
        finally:
            reader.cancel()
            for reply in stream.close():
                if reply.request is not None:
                    self.core.cancel(reply.request)
        if stream.overflowed:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, stream.overflow_message())

    def _submit_streamed(self, stream: _Stream, request: pb.ModelInferRequest,
                         raw: list[bytes | memoryview], headers: Headers | None
                         ) -> _StreamReply:
        reply = _StreamReply(stream, _empty_final(request))
        self.core.submit(request.model_name, request.model_version,
                         lambda: with_headers(parse_request(request, raw), headers), reply,
                         streaming=True)
        return reply

    # --- statistics, repository, shared memory, logging (daemon/operations.py) ---------
    async def ModelStatistics(self, request: pb.ModelStatisticsRequest,
                              context: grpc.aio.ServicerContext) -> pb.ModelStatisticsResponse:
        return self.operations.model_statistics(request.name, request.version)

    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest,
                              context: grpc.aio.ServicerContext) -> pb.RepositoryIndexResponse:
        return self.operations.repository_index(request.ready)

    async def RepositoryModelLoad(self, request: pb.RepositoryModelLoadRequest,
                                  context: grpc.aio.ServicerContext
                                  ) -> pb.RepositoryModelLoadResponse:
        parameters = []
        for key, param in request.parameters.items():
            choice = param.WhichOneof("parameter_choice")
            parameters.append((key, getattr(param, choice) if choice else None, choice))
        await self.operations.load_model(request.model_name, parameters)
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request: pb.RepositoryModelUnloadRequest,
                                    context: grpc.aio.ServicerContext
                                    ) -> pb.RepositoryModelUnloadResponse:
        dependents = request.parameters.get("unload_dependents")
        await self.operations.unload_model(
            request.model_name, dependents is not None and dependents.bool_param)
        return pb.RepositoryModelUnloadResponse()

    async def SystemSharedMemoryStatus(self, request: pb.SystemSharedMemoryStatusRequest,
                                       context: grpc.aio.ServicerContext
                                       ) -> pb.SystemSharedMemoryStatusResponse:
        return self.operations.system_shm_status(request.name)

    async def SystemSharedMemoryRegister(self, request: pb.SystemSharedMemoryRegisterRequest,
                                         context: grpc.aio.ServicerContext
                                         ) -> pb.SystemSharedMemoryRegisterResponse:
        self.operations.system_shm_register(request.name, request.key, request.offset,
                                            request.byte_size, _client_id(context))
        return pb.SystemSharedMemoryRegisterResponse()

    async def SystemSharedMemoryUnregister(self, request: pb.SystemSharedMemoryUnregisterRequest,
                                           context: grpc.aio.ServicerContext
                                           ) -> pb.SystemSharedMemoryUnregisterResponse:
        self.operations.shm_unregister("system", request.name, _client_id(context))
        return pb.SystemSharedMemoryUnregisterResponse()

    async def CudaSharedMemoryStatus(self, request: pb.CudaSharedMemoryStatusRequest,
                                     context: grpc.aio.ServicerContext
                                     ) -> pb.CudaSharedMemoryStatusResponse:
        return self.operations.cuda_shm_status(request.name)

    async def CudaSharedMemoryRegister(self, request: pb.CudaSharedMemoryRegisterRequest,
                                       context: grpc.aio.ServicerContext
                                       ) -> pb.CudaSharedMemoryRegisterResponse:
        self.operations.cuda_shm_register(request.name, request.raw_handle, request.device_id,
                                          request.byte_size, _client_id(context))
        return pb.CudaSharedMemoryRegisterResponse()

    async def CudaSharedMemoryUnregister(self, request: pb.CudaSharedMemoryUnregisterRequest,
                                         context: grpc.aio.ServicerContext
                                         ) -> pb.CudaSharedMemoryUnregisterResponse:
        self.operations.shm_unregister("cuda", request.name, _client_id(context))
        return pb.CudaSharedMemoryUnregisterResponse()

    async def TraceSetting(self, request: pb.TraceSettingRequest,
                           context: grpc.aio.ServicerContext) -> pb.TraceSettingResponse:
        updates = {key: list(value.value) or None for key, value in request.settings.items()}
        response = pb.TraceSettingResponse()
        for key, values in self.operations.trace_setting(request.model_name, updates).items():
            response.settings[key].value.extend(values)
        return response

    async def LogSettings(self, request: pb.LogSettingsRequest,
                          context: grpc.aio.ServicerContext) -> pb.LogSettingsResponse:
        updates = []
        for key, value in request.settings.items():
            choice = value.WhichOneof("parameter_choice")
            updates.append((key, getattr(value, choice) if choice else None, choice))
        current = self.operations.update_log_settings(updates)
        response = pb.LogSettingsResponse()
        for key, setting in current.items():
            target = response.settings[key]
            if isinstance(setting, bool):
                target.bool_param = setting
            elif isinstance(setting, int):
                target.uint32_param = setting
            else:
                target.string_param = setting
        return response


def _parse_request(data: bytes) -> tuple[pb.ModelInferRequest, list[bytes | memoryview]]:
    try:
        return parse_infer_request(data)
    except (WireError, DecodeError) as exc:
        raise invalid_argument(f"malformed ModelInferRequest: {exc}") from None


def _stream_error(request: pb.ModelInferRequest, message: str, final: bool = True) -> bytes:
    response = pb.ModelInferResponse(id=request.id, model_name=request.model_name,
                                     model_version=request.model_version)
    response.parameters[FINAL_RESPONSE].bool_param = final
    return pb.ModelStreamInferResponse(error_message=message,
                                       infer_response=response).SerializeToString()


def _empty_final(request: pb.ModelInferRequest) -> bool:
    value = request.parameters.get(EMPTY_FINAL_RESPONSE)
    return value is not None and value.bool_param


class _Stream:
    """One ModelStreamInfer call: the responses waiting to be written, and the requests
    still open (their final response not sent yet)."""

    def __init__(self, budget: StreamBudget) -> None:
        self._queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._open: set[_StreamReply] = set()
        self._reading = True
        self._closed = False
        self._budget = budget
        self.overflowed = False

    def overflow_message(self) -> str:
        return (f"the stream's client reads its responses slower than they are produced: "
                f"more than {self._budget.describe()} were waiting; "
                f"the stream was ended and its requests cancelled")

    def opened(self, reply: _StreamReply) -> None:
        if not reply.finished:
            self._open.add(reply)

    def put(self, message: bytes | None) -> None:
        if message is None or self._closed or self.overflowed:
            return
        if not self._budget.admit(len(message)):
            # A slow reader: end the stream rather than hold its responses without bound.
            self.overflowed = True
            while not self._queue.empty():  # what the client did not read is dropped
                self._queue.get_nowait()
            self._queue.put_nowait(None)
            return
        self._queue.put_nowait(message)

    def finished(self, reply: _StreamReply) -> None:
        self._open.discard(reply)
        self._maybe_end()

    def reading_done(self) -> None:
        self._reading = False
        self._maybe_end()

    def _maybe_end(self) -> None:
        if not self._reading and not self._open and not self._closed:
            self._queue.put_nowait(None)

    async def get(self) -> bytes | None:
        message = await self._queue.get()
        if message is not None and not self.overflowed:
            self._budget.released(len(message))
        return message

    def close(self) -> list[_StreamReply]:
        """The call ended: the requests still open, to cancel."""
        self._closed = True
        still_open, self._open = list(self._open), set()
        return still_open


# _unlink: a request and its reply point at each other. Once the door is done with the
# answer it drops its side, so reference counting frees the request (tensors, outputs,
# views of the wire bytes) at once instead of leaving a cycle per request to the garbage
# collector (tests/test_door_cycles.py).


def _trim_heap_after(context: object) -> None:
    trim_heap()


class _WireReply(Reply):
    """ModelInfer's reply: the answer is serialized as it comes, while a pending output can
    still be read straight from the worker's output arena into it (one copy); the future
    completes once ``message`` holds it."""

    __slots__ = ("future", "message")

    def __init__(self, future: asyncio.Future[None]) -> None:
        self.request = None
        self.future = future
        self.message = b""

    def prepare(self, response: list[OutputTensor]) -> None:
        """(On a thread, for large outputs) the message, built ahead of ``send``."""
        request = self.request
        if request is not None:
            self.message = serialize_infer_outputs(response_head(request, response),
                                                   response)

    def send(self, response: list[OutputTensor], final: bool) -> None:
        request = self.request
        if self.future.done() or request is None:  # the caller gave up meanwhile
            self.message = b""
            return
        try:
            if not self.message:
                self.message = serialize_infer_outputs(response_head(request, response),
                                                       response)
        except Exception as exc:
            log.exception("serializing a response failed")
            self.future.set_exception(internal(f"{type(exc).__name__}: {exc}"))
            return
        self.future.set_result(None)

    def fail(self, error: ServeError) -> None:
        if not self.future.done():
            self.future.set_exception(error)


class _StreamReply(Reply):
    """A streamed request's reply: each response is serialized and queued on its stream."""

    __slots__ = ("_prepared", "_stream", "empty_final", "finished")

    def __init__(self, stream: _Stream, empty_final: bool) -> None:
        self.request = None
        self._stream = stream
        self.empty_final = empty_final
        self.finished = False
        self._prepared = b""

    def prepare(self, response: list[OutputTensor]) -> None:
        """(On a thread, for large outputs of a model that answers once) the final
        response's message, built ahead of ``send``."""
        self._prepared = self._message(response, True)

    def send(self, response: list[OutputTensor], final: bool) -> None:
        prepared, self._prepared = self._prepared, b""
        self._stream.put(prepared if prepared and final else self._message(response, final))
        if final:
            self._end()

    def _message(self, response: list[OutputTensor], final: bool) -> bytes:
        request = self.request
        assert request is not None
        message = response_metadata(request, response)
        message.parameters[FINAL_RESPONSE].bool_param = final
        return serialize_infer_outputs(message, response, stream=True)

    def end(self) -> None:
        """The final flag alone: an empty final response if the request asked for one."""
        request = self.request
        assert request is not None
        if self.empty_final:
            message = pb.ModelInferResponse(model_name=request.model, id=request.request_id,
                                            model_version=str(request.version))
            message.parameters[FINAL_RESPONSE].bool_param = True
            self._stream.put(serialize_stream_response(message.SerializeToString()))
        self._end()

    def send_error(self, error: ServeError, final: bool) -> None:
        request = self.request
        assert request is not None
        message = pb.ModelInferRequest(id=request.request_id, model_name=request.model,
                                       model_version=str(request.version))
        self._stream.put(_stream_error(message, error.message, final))
        if final:
            self._end()

    def fail(self, error: ServeError) -> None:
        self.send_error(error, True)

    def _end(self) -> None:
        self.finished = True
        self._stream.finished(self)
        self.request = None  # see _unlink


FINAL_RESPONSE = "triton_final_response"
EMPTY_FINAL_RESPONSE = "triton_enable_empty_final_response"


# --- wiring ---------------------------------------------------------------------------------
# Unary RPCs whose handler reads the one request itself (see ModelInfer).
_READ_ONCE = frozenset({"ModelInfer"})
Handler = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]


def _restriction_check(settings: Settings, group: str
                       ) -> Callable[[grpc.aio.ServicerContext], None] | None:
    restriction = restriction_for(settings.restricted_protocols, group, GRPC_HEADER_PREFIX)
    if restriction is None:
        return None
    message = f"This protocol is restricted, expecting header '{restriction.header}'"

    def check(context: grpc.aio.ServicerContext) -> None:
        if not restriction.allows(dict(context.invocation_metadata() or ()).get):
            raise unavailable(message)

    return check


def _unary(method: Handler, check: Callable[[grpc.aio.ServicerContext], None] | None) -> Handler:
    async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            if check is not None:
                check(context)
            return await method(request, context)
        except ServeError as exc:
            await context.abort(exc.code, exc.message)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:
            log.exception("RPC failed")
            await context.abort(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}")

    return handle


def _stream(method: Callable[..., AsyncIterator[Any]],
            check: Callable[[grpc.aio.ServicerContext], None] | None
            ) -> Callable[..., AsyncIterator[Any]]:
    async def handle(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
                     ) -> AsyncIterator[Any]:
        if check is not None:
            try:
                check(context)
            except ServeError as exc:
                await context.abort(exc.code, exc.message)
        async for item in method(requests, context):
            yield item

    return handle


def _deserializer(message_type: Any) -> Callable[[bytes], Any] | None:
    return None if message_type is None else message_type.FromString


def _serializer(message_type: Any) -> Callable[[Any], bytes] | None:
    return None if message_type is None else message_type.SerializeToString


def generic_handlers(service: InferenceService,
                     forward: Callable[[str], Handler] | None = None
                     ) -> list[grpc.GenericRpcHandler]:
    """The service's handlers; with ``forward`` (a frontend process), every RPC but the
    inference ones is ``forward(rpc name)`` instead (daemon/frontend_process)."""
    settings = service.core.settings
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    for name, (request_type, response_type, streaming, group) in RPCS.items():
        check = _restriction_check(settings, group)
        method: Any = getattr(service, name) if forward is None or request_type is None \
            else forward(name)
        if name in _READ_ONCE:
            handlers[name] = grpc.stream_unary_rpc_method_handler(
                _unary(method, check), response_serializer=_serializer(response_type))
        elif streaming:
            handlers[name] = grpc.stream_stream_rpc_method_handler(
                _stream(method, check), request_deserializer=_deserializer(request_type),
                response_serializer=_serializer(response_type))
        else:
            handlers[name] = grpc.unary_unary_rpc_method_handler(
                _unary(method, check), request_deserializer=_deserializer(request_type),
                response_serializer=_serializer(response_type))
    health = _unary(_health_check(service._core()) if forward is None
                    else forward(HEALTH_CHECK_RPC), _restriction_check(settings, "health"))
    return [
        grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),
        grpc.method_handlers_generic_handler(HEALTH_SERVICE_NAME, {
            "Check": grpc.unary_unary_rpc_method_handler(
                health, request_deserializer=health_pb.HealthCheckRequest.FromString,
                response_serializer=health_pb.HealthCheckResponse.SerializeToString),
        }),
    ]


def _health_check(core: Core) -> Handler:
    async def check(request: health_pb.HealthCheckRequest,
                    context: grpc.aio.ServicerContext) -> health_pb.HealthCheckResponse:
        status = health_pb.HealthCheckResponse
        if request.service not in ("", SERVICE_NAME, "inference"):
            raise ServeError(grpc.StatusCode.NOT_FOUND, f"unknown service '{request.service}'")
        serving = not core.exiting
        with contextlib.suppress(Exception):
            serving = serving and core.models.all_ready()
        return status(status=status.SERVING if serving else status.NOT_SERVING)

    return check
