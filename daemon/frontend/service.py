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
from shmserve.daemon.errors import (
    SERVER_EXITING,
    ServeError,
    invalid_argument,
    unavailable,
    unimplemented,
    unknown_model,
)
from shmserve.daemon.frontend.infer_grpc import parse_request, response_parts
from shmserve.daemon.frontend.wire import (
    WireError,
    parse_infer_request,
    serialize_infer_response,
    serialize_stream_response,
)
from shmserve.daemon.infer_request import config_datatype
from shmserve.daemon.models import UNAVAILABLE
from shmserve.daemon.reply import Reply
from shmserve.daemon.request import InferRequest, OutputTensor
from shmserve.daemon.settings import Settings
from shmserve.protos import shmserve_health_pb2 as health_pb
from shmserve.protos import shmserve_service_pb2 as pb

log = logging.getLogger("shmserve.frontend")

SERVICE_NAME = "inference.GRPCInferenceService"
HEALTH_SERVICE_NAME = "grpc.health.v1.Health"
SERVER_NAME = "shmserve"
SERVER_VERSION = "0.1.0"
EXTENSIONS = ["model_repository", "model_configuration", "system_shared_memory",
              "cuda_shared_memory", "binary_tensor_data", "parameters", "statistics",
              "logging", "schedule_policy"]
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


class _FutureReply(Reply):
    """A unary RPC's reply: the one response (or the error) completes the awaited future."""

    __slots__ = ("future",)

    def __init__(self, future: asyncio.Future[list[OutputTensor]]) -> None:
        self.request = None
        self.future = future

    def send(self, response: list[OutputTensor], final: bool) -> None:
        if not self.future.done():  # done: the caller gave up meanwhile
            self.future.set_result(response)

    def fail(self, error: ServeError) -> None:
        if not self.future.done():
            self.future.set_exception(error)


def _client_id(context: grpc.aio.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == CLIENT_ID_HEADER:
            # "local:" owners are the server's own local channels; nobody may pose as one.
            return "" if str(value).startswith("local:") else str(value)
    return ""


class InferenceService:
    """The gRPC door: holds the core, nothing of another door."""

    def __init__(self, core: Core) -> None:
        self.core = core
        self.models = core.models
        self.registry = core.registry
        self._loop: asyncio.AbstractEventLoop | None = None

    # --- health -------------------------------------------------------------------------
    async def ServerLive(self, request: pb.ServerLiveRequest,
                         context: grpc.aio.ServicerContext) -> pb.ServerLiveResponse:
        self._check_exiting()
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest,
                          context: grpc.aio.ServicerContext) -> pb.ServerReadyResponse:
        self._check_exiting()
        ready = self.models.all_ready() if self.core.settings.strict_readiness else True
        return pb.ServerReadyResponse(ready=ready)

    async def ModelReady(self, request: pb.ModelReadyRequest,
                         context: grpc.aio.ServicerContext) -> pb.ModelReadyResponse:
        self._check_exiting()
        return pb.ModelReadyResponse(ready=self.models.is_ready(request.name, request.version))

    def _check_exiting(self) -> None:
        if self.core.exiting:
            raise unavailable(SERVER_EXITING)

    # --- metadata -----------------------------------------------------------------------
    async def ServerMetadata(self, request: pb.ServerMetadataRequest,
                             context: grpc.aio.ServicerContext) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=SERVER_VERSION,
                                         extensions=EXTENSIONS)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest,
                            context: grpc.aio.ServicerContext) -> pb.ModelMetadataResponse:
        model = self.models.resolve(request.name, request.version)
        config = model.config
        record = self.models.record(request.name)
        batch = [-1] if config.max_batch_size > 0 else []
        response = pb.ModelMetadataResponse(
            name=model.name, platform=config.platform or config.backend,
            versions=[str(v) for v in sorted(record.versions)])
        for tensor in config.input:
            response.inputs.add(name=tensor.name, datatype=config_datatype(tensor.data_type),
                                shape=batch + list(tensor.dims))
        for output in config.output:
            response.outputs.add(name=output.name, datatype=config_datatype(output.data_type),
                                 shape=batch + list(output.dims))
        return response

    async def ModelConfig(self, request: pb.ModelConfigRequest,
                          context: grpc.aio.ServicerContext) -> pb.ModelConfigResponse:
        model = self.models.resolve(request.name, request.version)
        return pb.ModelConfigResponse(config=model.config)

    # --- inference ----------------------------------------------------------------------
    async def ModelInfer(self, requests: object, context: grpc.aio.ServicerContext) -> bytes:
        """Takes and returns wire bytes: tensor bytes are sliced, not copied (see wire.py).

        Registered as stream-unary (the wire is the same for a unary client) and read once
        with ``context.read()``: gRPC's unary handler keeps the request bytes referenced
        until the response is sent, this way they are freed once staged into the arena.
        """
        internal, reply = self._submit(await context.read())
        try:
            outputs = await reply.future
        except asyncio.CancelledError:
            self.core.cancel(internal)  # as in _outcome, without a coroutine more per request
            raise
        response, raw = response_parts(internal, outputs)
        message = serialize_infer_response(response, raw)
        del raw
        outputs.clear()  # the reply's future holds this list: let the output bytes go now
        return message

    def _submit(self, data: bytes | object) -> tuple[InferRequest, _FutureReply]:
        """Parse and queue one ModelInferRequest; from here on only the queued request holds
        (slices of) ``data``."""
        if not isinstance(data, bytes):  # grpc.aio.EOF: the client sent no message
            raise invalid_argument("malformed ModelInferRequest: no request message")
        return self._queue(*_parse_request(data))

    def _queue(self, request: pb.ModelInferRequest, raw: list[memoryview] | None
               ) -> tuple[InferRequest, _FutureReply]:
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        reply = _FutureReply(loop.create_future())
        internal = self.core.submit(request.model_name, request.model_version,
                                    lambda: parse_request(request, raw), reply)
        return internal, reply

    async def _outcome(self, internal: InferRequest, reply: _FutureReply
                       ) -> list[OutputTensor]:
        try:
            return await reply.future
        except asyncio.CancelledError:
            # The caller gave up (deadline, cancel): a queued request is dropped; one
            # already executing keeps its regions pinned until the worker is done.
            self.core.cancel(internal)
            raise

    async def _infer(self, parsed: tuple[pb.ModelInferRequest, list[memoryview]]) -> bytes:
        internal, outputs = await self.infer_outputs(*parsed)
        response, raw = response_parts(internal, outputs)
        return serialize_infer_response(response, raw)

    async def infer_outputs(self, request: pb.ModelInferRequest,
                            raw: list[memoryview] | None = None
                            ) -> tuple[InferRequest, list[OutputTensor]]:
        """gRPC inference: hand the request to the core, wait for its reply. Raises
        ServeError."""
        internal, reply = self._queue(request, raw)
        return internal, await self._outcome(internal, reply)

    async def ModelStreamInfer(self, requests: AsyncIterator[bytes],
                               context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        """Requests run concurrently; each answer (or error) is sent as it completes."""
        answers: asyncio.Queue[bytes | None] = asyncio.Queue()
        pending: set[asyncio.Task[None]] = set()

        async def answer(data: bytes) -> None:
            request = pb.ModelInferRequest()
            try:
                parsed = _parse_request(data)
                request = parsed[0]
                await answers.put(serialize_stream_response(await self._infer(parsed)))
            except ServeError as exc:
                await answers.put(_stream_error(request, exc.message))
            except Exception as exc:
                log.exception("stream request failed")
                await answers.put(_stream_error(request, f"{type(exc).__name__}: {exc}"))

        async def read() -> None:
            async for request in requests:
                task = asyncio.create_task(answer(request))
                pending.add(task)
                task.add_done_callback(pending.discard)
            while pending:
                await asyncio.gather(*list(pending))
            await answers.put(None)

        reader = asyncio.create_task(read())
        try:
            while True:
                item = await answers.get()
                if item is None:
                    break
                yield item
        finally:
            reader.cancel()
            for task in list(pending):
                task.cancel()

    # --- statistics ---------------------------------------------------------------------
    async def ModelStatistics(self, request: pb.ModelStatisticsRequest,
                              context: grpc.aio.ServicerContext) -> pb.ModelStatisticsResponse:
        response = pb.ModelStatisticsResponse()
        records = self.models.records()
        if request.name:
            record = self.models.record(request.name)
            if not record.versions:
                raise unknown_model(request.name)
            records = [record]
        for record in records:
            for version, model in sorted(record.versions.items()):
                if request.version and request.version != str(version):
                    continue
                _fill_statistics(response.model_stats.add(), model.name, version,
                                 model.scheduler.stats)
        if request.name and not response.model_stats:
            raise invalid_argument(f"requested model version is not available for model "
                                   f"'{request.name}'")
        return response

    # --- repository ---------------------------------------------------------------------
    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest,
                              context: grpc.aio.ServicerContext) -> pb.RepositoryIndexResponse:
        response = pb.RepositoryIndexResponse()
        known = {record.name: record for record in self.models.records()}
        for name in sorted(set(known) | set(self.models.repository_models())):
            record = known.get(name)
            if record is None:
                if not request.ready:
                    response.models.add(name=name)
                continue
            if record.versions:
                for version, model in sorted(record.versions.items()):
                    if request.ready and not model.ready:
                        continue
                    response.models.add(name=name, version=str(version), state=model.state,
                                        reason=model.reason)
            elif not request.ready:
                response.models.add(name=name, state=record.state or UNAVAILABLE,
                                    reason=record.reason)
        return response

    async def RepositoryModelLoad(self, request: pb.RepositoryModelLoadRequest,
                                  context: grpc.aio.ServicerContext
                                  ) -> pb.RepositoryModelLoadResponse:
        self._check_explicit()
        config_json: str | None = None
        files: dict[str, bytes] = {}
        for key, param in request.parameters.items():
            choice = param.WhichOneof("parameter_choice")
            if key == "config" and choice == "string_param":
                config_json = param.string_param
            elif key.startswith("file:") and choice == "bytes_param":
                files[key[len("file:"):]] = param.bytes_param
            else:
                raise invalid_argument(f"Unrecognized load parameter '{key}' with type "
                                       f"'{choice}'")
        await self.models.load(request.model_name, config_json, files or None)
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request: pb.RepositoryModelUnloadRequest,
                                    context: grpc.aio.ServicerContext
                                    ) -> pb.RepositoryModelUnloadResponse:
        self._check_explicit()
        await self.models.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()

    def _check_explicit(self) -> None:
        mode = self.core.settings.model_control_mode
        if mode == "poll":
            raise unavailable("explicit model load / unload is not allowed if polling is "
                              "enabled")
        if mode != "explicit":
            raise unavailable("explicit model load / unload is not allowed in model control "
                              "mode 'none'; start with --model-control-mode=explicit")

    # --- shared memory ------------------------------------------------------------------
    async def SystemSharedMemoryStatus(self, request: pb.SystemSharedMemoryStatusRequest,
                                       context: grpc.aio.ServicerContext
                                       ) -> pb.SystemSharedMemoryStatusResponse:
        response = pb.SystemSharedMemoryStatusResponse()
        for region in self.registry.status("system", request.name):
            response.regions[region.name].CopyFrom(
                pb.SystemSharedMemoryStatusResponse.RegionStatus(
                    name=region.name, key=region.key, offset=region.offset,
                    byte_size=region.byte_size))
        return response

    async def SystemSharedMemoryRegister(self, request: pb.SystemSharedMemoryRegisterRequest,
                                         context: grpc.aio.ServicerContext
                                         ) -> pb.SystemSharedMemoryRegisterResponse:
        self.registry.register_system(request.name, request.key, request.offset,
                                      request.byte_size, _client_id(context))
        return pb.SystemSharedMemoryRegisterResponse()

    async def SystemSharedMemoryUnregister(self, request: pb.SystemSharedMemoryUnregisterRequest,
                                           context: grpc.aio.ServicerContext
                                           ) -> pb.SystemSharedMemoryUnregisterResponse:
        self.registry.unregister("system", request.name, _client_id(context))
        return pb.SystemSharedMemoryUnregisterResponse()

    async def CudaSharedMemoryStatus(self, request: pb.CudaSharedMemoryStatusRequest,
                                     context: grpc.aio.ServicerContext
                                     ) -> pb.CudaSharedMemoryStatusResponse:
        response = pb.CudaSharedMemoryStatusResponse()
        for region in self.registry.status("cuda", request.name):
            response.regions[region.name].CopyFrom(
                pb.CudaSharedMemoryStatusResponse.RegionStatus(
                    name=region.name, device_id=region.device_id, byte_size=region.byte_size))
        return response

    async def CudaSharedMemoryRegister(self, request: pb.CudaSharedMemoryRegisterRequest,
                                       context: grpc.aio.ServicerContext
                                       ) -> pb.CudaSharedMemoryRegisterResponse:
        self.registry.register_cuda(request.name, request.raw_handle, request.device_id,
                                    request.byte_size, _client_id(context))
        return pb.CudaSharedMemoryRegisterResponse()

    async def CudaSharedMemoryUnregister(self, request: pb.CudaSharedMemoryUnregisterRequest,
                                         context: grpc.aio.ServicerContext
                                         ) -> pb.CudaSharedMemoryUnregisterResponse:
        self.registry.unregister("cuda", request.name, _client_id(context))
        return pb.CudaSharedMemoryUnregisterResponse()

    # --- trace and logging --------------------------------------------------------------
    async def TraceSetting(self, request: pb.TraceSettingRequest,
                           context: grpc.aio.ServicerContext) -> pb.TraceSettingResponse:
        raise unimplemented("tracing is not supported by shmserve")

    async def LogSettings(self, request: pb.LogSettingsRequest,
                          context: grpc.aio.ServicerContext) -> pb.LogSettingsResponse:
        settings = self.core.settings
        for key, value in request.settings.items():
            choice = value.WhichOneof("parameter_choice")
            if key == "log_verbose_level" and choice == "uint32_param":
                settings.log_verbose = value.uint32_param
                logging.getLogger("shmserve").setLevel(
                    logging.DEBUG if settings.log_verbose else logging.INFO)
            else:
                raise invalid_argument(f"unsupported log setting '{key}'")
        response = pb.LogSettingsResponse()
        response.settings["log_verbose_level"].uint32_param = settings.log_verbose
        for key in ("log_info", "log_warning", "log_error"):
            response.settings[key].bool_param = True
        response.settings["log_format"].string_param = "default"
        response.settings["log_file"].string_param = ""
        return response


def _parse_request(data: bytes) -> tuple[pb.ModelInferRequest, list[memoryview]]:
    try:
        return parse_infer_request(data)
    except (WireError, DecodeError) as exc:
        raise invalid_argument(f"malformed ModelInferRequest: {exc}") from None


def _stream_error(request: pb.ModelInferRequest, message: str) -> bytes:
    return pb.ModelStreamInferResponse(
        error_message=message,
        infer_response=pb.ModelInferResponse(id=request.id, model_name=request.model_name)
    ).SerializeToString()


def _fill_statistics(target: pb.ModelStatistics, name: str, version: int, stats: Any) -> None:
    target.name = name
    target.version = str(version)
    target.last_inference = stats.last_inference_ms
    target.inference_count = stats.inference_count
    target.execution_count = stats.execution_count
    inference = target.inference_stats
    for field in ("success", "fail", "queue", "compute_input", "compute_infer",
                  "compute_output"):
        source = getattr(stats, field)
        getattr(inference, field).count = source.count
        getattr(inference, field).ns = source.ns
    for size, batch in sorted(stats.batches.items()):
        entry = target.batch_stats.add(batch_size=size)
        for field in ("compute_input", "compute_infer", "compute_output"):
            source = getattr(batch, field)
            getattr(entry, field).count = source.count
            getattr(entry, field).ns = source.ns


# --- wiring ---------------------------------------------------------------------------------
# Unary RPCs whose handler reads the one request itself (see ModelInfer).
_READ_ONCE = frozenset({"ModelInfer"})
Handler = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]


def _restriction_check(settings: Settings, group: str
                       ) -> Callable[[grpc.aio.ServicerContext], None] | None:
    rules = [(key, value) for groups, key, value in settings.restricted_protocols
             if group in groups]
    if not rules:
        return None
    key, value = rules[0]
    header = f"triton-grpc-protocol-{key}"

    def check(context: grpc.aio.ServicerContext) -> None:
        metadata = dict(context.invocation_metadata() or ())
        if metadata.get(header) != value:
            raise unavailable(f"This protocol is restricted, expecting header '{header}'")

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


def generic_handlers(service: InferenceService) -> list[grpc.GenericRpcHandler]:
    settings = service.core.settings
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    for name, (request_type, response_type, streaming, group) in RPCS.items():
        check = _restriction_check(settings, group)
        method = getattr(service, name)
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
    health = _unary(_health_check(service.core), _restriction_check(settings, "health"))
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
