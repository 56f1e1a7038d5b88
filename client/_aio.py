"""``AsyncClient``: the asyncio client (grpc.aio)."""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any

import grpc
import grpc.aio
import numpy as np

from shmserve.client._common import (
    DEFAULT_TIMEOUT,
    LOAD_TIMEOUT,
    UNARY_RPCS,
    UNREGISTER_TIMEOUT,
    RegionSet,
    RegionStatus,
    StreamBook,
    StreamRequest,
    StreamResult,
    call_metadata,
    load_request,
    method_path,
    new_client_id,
    prepare,
    target_of,
    unload_request,
)
from shmserve.client._common import channel_options as _channel_options
from shmserve.client._convert import InputValue, Outputs, ParameterValue, read_outputs
from shmserve.client._wire import decode_infer_response
from shmserve.client.errors import ShmserveError, from_rpc_error
from shmserve.client.regions import SystemRegion
from shmserve.protos import shmserve_model_config_pb2 as mc
from shmserve.protos import shmserve_service_pb2 as pb

_Unset: Any = object()
_SERVER_GONE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                grpc.StatusCode.CANCELLED)


class AsyncClient:
    """The asyncio twin of ``Client``: same arguments, same methods, awaitable.

    Create it inside a running event loop (grpc.aio binds the channel to it) and close it with
    ``await client.close()`` or ``async with AsyncClient(url) as client:``.
    """

    def __init__(self, url: str = "127.0.0.1:8001", *, timeout: float | None = DEFAULT_TIMEOUT,
                 load_timeout: float | None = LOAD_TIMEOUT,
                 headers: Mapping[str, str] | None = None,
                 channel_options: Sequence[tuple[str, Any]] | None = None,
                 credentials: grpc.ChannelCredentials | None = None,
                 interceptors: Sequence[grpc.aio.ClientInterceptor] | None = None,
                 client_id: str | None = None) -> None:
        self.url = url
        self.timeout = timeout
        self.load_timeout = load_timeout
        self.client_id = client_id or new_client_id()
        self._metadata = call_metadata(self.client_id, headers)
        target = target_of(url)
        options = _channel_options(channel_options)
        self._channel = (
            grpc.aio.secure_channel(target, credentials, options=options,
                                    interceptors=interceptors)
            if credentials is not None
            else grpc.aio.insecure_channel(target, options=options, interceptors=interceptors))
        self._unary = {
            name: self._channel.unary_unary(method_path(name),
                                            request_serializer=request.SerializeToString,
                                            response_deserializer=response.FromString,
                                            _registered_method=True)
            for name, (request, response) in UNARY_RPCS.items()}
        self._infer = self._channel.unary_unary(method_path("ModelInfer"),
                                                _registered_method=True)
        self._stream = self._channel.stream_stream(method_path("ModelStreamInfer"),
                                                   _registered_method=True)
        self._regions = RegionSet()
        self._closed = False

    # --- plumbing ---------------------------------------------------------------------------
    async def _call(self, rpc: str, request: Any, timeout: float | None = _Unset) -> Any:
        try:
            return await self._unary[rpc](request, timeout=self.timeout if timeout is _Unset
                                          else timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None

    async def close(self) -> None:
        """Release this client's remaining regions and close the channel."""
        if self._closed:
            return
        for region in list(self._regions):
            if isinstance(region, SystemRegion):
                await self._release(region, raise_errors=False)
        self._closed = True
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    # --- health and metadata ----------------------------------------------------------------
    async def is_server_live(self, timeout: float | None = _Unset) -> bool:
        return bool((await self._call("ServerLive", pb.ServerLiveRequest(), timeout)).live)

    async def is_server_ready(self, timeout: float | None = _Unset) -> bool:
        return bool((await self._call("ServerReady", pb.ServerReadyRequest(), timeout)).ready)

    async def is_model_ready(self, name: str, version: str = "",
                             timeout: float | None = _Unset) -> bool:
        request = pb.ModelReadyRequest(name=name, version=version)
        return bool((await self._call("ModelReady", request, timeout)).ready)

    async def server_metadata(self, timeout: float | None = _Unset
                              ) -> pb.ServerMetadataResponse:
        response: pb.ServerMetadataResponse = await self._call(
            "ServerMetadata", pb.ServerMetadataRequest(), timeout)
        return response

    async def model_metadata(self, name: str, version: str = "",
                             timeout: float | None = _Unset) -> pb.ModelMetadataResponse:
        response: pb.ModelMetadataResponse = await self._call(
            "ModelMetadata", pb.ModelMetadataRequest(name=name, version=version), timeout)
        return response

    async def model_config(self, name: str, version: str = "",
                           timeout: float | None = _Unset) -> mc.ModelConfig:
        response: pb.ModelConfigResponse = await self._call(
            "ModelConfig", pb.ModelConfigRequest(name=name, version=version), timeout)
        return response.config

    async def model_statistics(self, name: str = "", version: str = "",
                               timeout: float | None = _Unset) -> list[pb.ModelStatistics]:
        response: pb.ModelStatisticsResponse = await self._call(
            "ModelStatistics", pb.ModelStatisticsRequest(name=name, version=version), timeout)
        return list(response.model_stats)

    # --- repository -------------------------------------------------------------------------
    async def repository_index(self, ready: bool = False, timeout: float | None = _Unset
                               ) -> list[pb.RepositoryIndexResponse.ModelIndex]:
        response: pb.RepositoryIndexResponse = await self._call(
            "RepositoryIndex", pb.RepositoryIndexRequest(ready=ready), timeout)
        return list(response.models)

    async def load_model(self, name: str, config: str | Mapping[str, Any] | None = None,
                         files: Mapping[str, bytes] | None = None,
                         timeout: float | None = _Unset) -> None:
        await self._call("RepositoryModelLoad", load_request(name, config, files),
                         self.load_timeout if timeout is _Unset else timeout)

    async def unload_model(self, name: str, unload_dependents: bool = False,
                           timeout: float | None = _Unset) -> None:
        await self._call("RepositoryModelUnload", unload_request(name, unload_dependents),
                         self.load_timeout if timeout is _Unset else timeout)

    # --- inference --------------------------------------------------------------------------
    def serialize_infer_request(self, model: str, inputs: Mapping[str, InputValue],
                                outputs: Outputs = None, version: str = "",
                                request_id: str = "",
                                parameters: Mapping[str, ParameterValue] | None = None
                                ) -> bytes:
        """The exact ModelInferRequest bytes ``infer`` would send."""
        return prepare(model, inputs, outputs, version, request_id, parameters,
                       self._regions).payload

    async def infer(self, model: str, inputs: Mapping[str, InputValue],
                    outputs: Outputs = None, version: str = "", request_id: str = "",
                    parameters: Mapping[str, ParameterValue] | None = None,
                    timeout: float | None = _Unset) -> dict[str, np.ndarray]:
        """See ``Client.infer``."""
        prepared = prepare(model, inputs, outputs, version, request_id, parameters,
                           self._regions)
        try:
            data = await self._infer(prepared.payload, timeout=self.timeout
                                     if timeout is _Unset else timeout,
                                     metadata=self._metadata)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        header, raw = decode_infer_response(data)
        return read_outputs(header, raw, prepared.region_outputs)

    async def stream_infer(
            self, model: str,
            requests: (AsyncIterable[StreamRequest | Mapping[str, InputValue]]
                       | Iterable[StreamRequest | Mapping[str, InputValue]]),
            outputs: Outputs = None, version: str = "",
            parameters: Mapping[str, ParameterValue] | None = None,
            timeout: float | None = None) -> AsyncIterator[StreamResult]:
        """See ``Client.stream_infer``; ``requests`` may also be an async iterable."""
        book = StreamBook(model, version, outputs, parameters, self._regions)

        async def produce() -> AsyncIterator[bytes]:
            index = 0
            try:
                if isinstance(requests, AsyncIterable):
                    async for item in requests:
                        yield book.prepare(index, item)
                        index += 1
                else:
                    for item in requests:
                        yield book.prepare(index, item)
                        index += 1
            except Exception as exc:
                book.failure = exc

        call = self._stream(produce(), timeout=timeout, metadata=self._metadata)
        try:
            async for data in call:
                yield book.read(data)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        finally:
            call.cancel()
        if book.failure is not None:
            raise book.failure

    # --- shared memory ----------------------------------------------------------------------
    def shared_memory(self, byte_size: int) -> _AsyncRegionContext:
        """``async with client.shared_memory(n) as region:`` (see ``Client.shared_memory``)."""
        return _AsyncRegionContext(self, byte_size)

    def cuda_shared_memory(self, byte_size: int, device_id: int = 0) -> _AsyncRegionContext:
        """Not built yet: see ``Client.cuda_shared_memory``."""
        raise ShmserveError(grpc.StatusCode.UNIMPLEMENTED,
                            "CUDA shared-memory regions are not implemented in this client yet")

    async def _open_region(self, byte_size: int) -> SystemRegion:
        if self._closed:
            raise ShmserveError(grpc.StatusCode.CANCELLED, "the client is closed")
        region = SystemRegion(byte_size)
        try:
            await self.register_system_shared_memory(region.name, region.key, region.byte_size)
        except BaseException:
            region.close()
            raise
        self._regions.add(region)
        return region

    async def _release(self, region: SystemRegion, raise_errors: bool) -> None:
        if not self._regions.remove(region):
            region.close()
            return
        # Unlink first: nothing can leak in /dev/shm even if the unregister call is cancelled.
        region.unlink()
        try:
            await self.unregister_system_shared_memory(region.name,
                                                       timeout=UNREGISTER_TIMEOUT)
        except ShmserveError as exc:
            if raise_errors and exc.code not in _SERVER_GONE:
                raise
        finally:
            region.close()

    async def shared_memory_status(self, name: str = "", timeout: float | None = _Unset
                                   ) -> dict[str, RegionStatus]:
        response: pb.SystemSharedMemoryStatusResponse = await self._call(
            "SystemSharedMemoryStatus", pb.SystemSharedMemoryStatusRequest(name=name), timeout)
        return dict(response.regions)

    async def register_system_shared_memory(self, name: str, key: str, byte_size: int,
                                            offset: int = 0,
                                            timeout: float | None = _Unset) -> None:
        await self._call("SystemSharedMemoryRegister", pb.SystemSharedMemoryRegisterRequest(
            name=name, key=key, offset=offset, byte_size=byte_size), timeout)

    async def unregister_system_shared_memory(self, name: str = "",
                                              timeout: float | None = _Unset) -> None:
        await self._call("SystemSharedMemoryUnregister",
                         pb.SystemSharedMemoryUnregisterRequest(name=name), timeout)

    @property
    def regions(self) -> list[SystemRegion]:
        return [r for r in self._regions if isinstance(r, SystemRegion)]


class _AsyncRegionContext:
    """The async context manager ``AsyncClient.shared_memory`` returns."""

    def __init__(self, client: AsyncClient, byte_size: int) -> None:
        self._client = client
        self._byte_size = byte_size
        self._region: SystemRegion | None = None

    async def __aenter__(self) -> SystemRegion:
        self._region = await self._client._open_region(self._byte_size)
        return self._region

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        region, self._region = self._region, None
        if region is not None:
            await self._client._release(region, raise_errors=exc_type is None)
