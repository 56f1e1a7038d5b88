"""``AsyncClient``: the asyncio client (grpc.aio)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
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
from shmserve.client._convert import (
    InputValue,
    Outputs,
    ParameterValue,
    read_outputs,
    read_reply_outputs,
)
from shmserve.client._local import (
    AsyncLocalLink,
    infer_message,
    plan_transport,
    register_message,
    status_from_reply,
    status_message,
    stream_error,
    stream_item,
    too_large,
)
from shmserve.client._wire import decode_infer_response
from shmserve.client.errors import ShmserveError, from_rpc_error
from shmserve.client.local_channel import AsyncLocalChannel, MessageTooLarge
from shmserve.client.regions import SystemRegion
from shmserve.protos import shmserve_model_config_pb2 as mc
from shmserve.protos import shmserve_service_pb2 as pb

_Unset: Any = object()
_SERVER_GONE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                grpc.StatusCode.CANCELLED)


@dataclass(slots=True)
class _Stubs:
    target: str
    channel: grpc.aio.Channel
    unary: dict[str, Any]
    infer: Any
    stream: Any


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
                 client_id: str | None = None, transport: str | None = None,
                 local_socket: str | None = None, server_uid: int | None = None) -> None:
        self.url = url
        self.timeout = timeout
        self.load_timeout = load_timeout
        self.client_id = client_id or new_client_id()
        self._metadata = call_metadata(self.client_id, headers)
        plan = plan_transport(url, transport, local_socket, server_uid)
        self._link = AsyncLocalLink(plan) if plan is not None else None
        self._options = _channel_options(channel_options)
        self._credentials = credentials
        self._interceptors = interceptors
        self._grpc_stubs: _Stubs | None = None
        if plan is None:
            self._grpc_stubs = self._connect_grpc(target_of(url))
        elif plan.grpc_target is not None:
            self._grpc_stubs = self._connect_grpc(plan.grpc_target)
        self._regions = RegionSet()
        self._closed = False

    def _connect_grpc(self, target: str) -> _Stubs:
        options, interceptors = self._options, self._interceptors
        channel = (
            grpc.aio.secure_channel(target, self._credentials, options=options,
                                    interceptors=interceptors)
            if self._credentials is not None
            else grpc.aio.insecure_channel(target, options=options, interceptors=interceptors))
        unary = {
            name: channel.unary_unary(method_path(name),
                                      request_serializer=request.SerializeToString,
                                      response_deserializer=response.FromString,
                                      _registered_method=True)
            for name, (request, response) in UNARY_RPCS.items()}
        return _Stubs(target, channel, unary,
                      channel.unary_unary(method_path("ModelInfer"), _registered_method=True),
                      channel.stream_stream(method_path("ModelStreamInfer"),
                                            _registered_method=True))

    async def _stubs(self) -> _Stubs:
        stubs = self._grpc_stubs
        link = self._link
        if stubs is not None and (link is None or stubs.target == link.known_target):
            return stubs
        assert link is not None
        target = await link.grpc_target()  # a local: url: the server names it (it may move)
        stubs = self._grpc_stubs
        if stubs is None or stubs.target != target:
            if self._closed:
                raise ShmserveError(grpc.StatusCode.CANCELLED, "the client is closed")
            old, stubs = stubs, self._connect_grpc(target)
            self._grpc_stubs = stubs
            if old is not None:
                await old.channel.close()
        return stubs

    async def _local(self) -> AsyncLocalChannel | None:
        link = self._link
        return await link.channel() if link is not None else None

    @property
    def transport(self) -> str:
        """``"shm"`` while this client uses the local channel, else ``"grpc"``."""
        return "shm" if self._link is not None and not self._link.fell_back else "grpc"

    # --- plumbing ---------------------------------------------------------------------------
    async def _call(self, rpc: str, request: Any, timeout: float | None = _Unset) -> Any:
        try:
            stubs = await self._stubs()
            return await stubs.unary[rpc](request, timeout=self.timeout if timeout is _Unset
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
        if self._link is not None:
            self._link.close()
        if self._grpc_stubs is not None:
            await self._grpc_stubs.channel.close()

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
        call_timeout = self.timeout if timeout is _Unset else timeout
        link = self._link
        channel = None if link is None else (link.current() or await link.channel())
        if channel is not None:
            request = infer_message(model, inputs, outputs, version, request_id, parameters,
                                    self._regions.locate if len(self._regions) else None,
                                    call_timeout)
            if request.payload_bytes <= channel.max_message:
                try:
                    reply = await channel.call(request.message, call_timeout)
                except MessageTooLarge:
                    pass
                else:
                    return read_reply_outputs(reply["out"], request.region_outputs)
            if request.references:
                raise too_large(request.payload_bytes, channel.max_message)
            # Too large for the channel and no region in it: gRPC carries it.
        prepared = prepare(model, inputs, outputs, version, request_id, parameters,
                           self._regions)
        stubs = await self._stubs()
        try:
            data = await stubs.infer(prepared.payload, timeout=call_timeout,
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
        channel = await self._local()
        if channel is not None:
            async for result in self._stream_local(channel, model, requests, outputs, version,
                                                   parameters, timeout):
                yield result
            return
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

        stubs = await self._stubs()
        call = stubs.stream(produce(), timeout=timeout, metadata=self._metadata)
        try:
            async for data in call:
                yield book.read(data)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        finally:
            call.cancel()
        if book.failure is not None:
            raise book.failure

    async def _stream_local(
            self, channel: AsyncLocalChannel, model: str,
            requests: (AsyncIterable[StreamRequest | Mapping[str, InputValue]]
                       | Iterable[StreamRequest | Mapping[str, InputValue]]),
            outputs: Outputs, version: str, parameters: Mapping[str, ParameterValue] | None,
            timeout: float | None) -> AsyncIterator[StreamResult]:
        """``stream_infer`` through the local channel: a task sends the requests as the
        iterable yields them, this generator yields the answers in completion order."""
        deadline = None if timeout is None else time.monotonic() + timeout
        queue: asyncio.Queue[StreamResult | None] = asyncio.Queue()
        ids: list[int] = []
        state: dict[str, Any] = {"outstanding": 0, "producing": True, "broken": None,
                                 "failure": None}

        def answer(index: int, request_id: str, region_outputs: dict[str, np.ndarray]
                   ) -> Callable[[asyncio.Future[dict[str, Any]]], None]:
            def done(future: asyncio.Future[dict[str, Any]]) -> None:
                state["outstanding"] -= 1
                if future.cancelled():
                    queue.put_nowait(None)
                    return
                error = future.exception()
                if error is not None:
                    state["broken"] = error
                    queue.put_nowait(None)
                    return
                reply = future.result()
                result = StreamResult(index, request_id, model,
                                      "" if "err" in reply else reply["model_version"])
                if "err" in reply:
                    result.error = stream_error(reply["err"])
                else:
                    try:
                        result.outputs = read_reply_outputs(reply["out"], region_outputs)
                    except ShmserveError as exc:
                        result.error = exc
                queue.put_nowait(result)
            return done

        async def send(index: int, item: StreamRequest | Mapping[str, InputValue]) -> None:
            one = stream_item(item)
            request_id = one.request_id or f"{index}"
            request = infer_message(
                model, one.inputs, one.outputs if one.outputs is not None else outputs,
                version, request_id, one.parameters if one.parameters is not None
                else parameters, self._regions.locate if len(self._regions) else None,
                None if deadline is None else max(0.0, deadline - time.monotonic()))
            if not request.fits(channel.max_message):
                raise too_large(request.payload_bytes, channel.max_message, False)
            request_id_, future = await channel.send(request.message, deadline)
            ids.append(request_id_)
            state["outstanding"] += 1
            future.add_done_callback(answer(index, request_id, request.region_outputs))

        async def produce() -> None:
            try:
                index = 0
                if isinstance(requests, AsyncIterable):
                    async for item in requests:
                        await send(index, item)
                        index += 1
                else:
                    for item in requests:
                        await send(index, item)
                        index += 1
            except MessageTooLarge as exc:
                state["failure"] = ShmserveError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"{exc}: put the large inputs of stream requests in a region "
                    f"(client.shared_memory)")
            except Exception as exc:
                state["failure"] = exc
            finally:
                state["producing"] = False
                queue.put_nowait(None)

        producer = asyncio.get_running_loop().create_task(produce())
        try:
            while True:
                if state["broken"] is not None:
                    raise state["broken"]
                if not state["producing"] and state["outstanding"] == 0 and queue.empty():
                    break
                try:
                    async with asyncio.timeout(None if deadline is None
                                               else deadline - time.monotonic()):
                        item = await queue.get()
                except TimeoutError:
                    raise ShmserveError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                        "Deadline Exceeded") from None
                if item is not None:
                    yield item
        finally:
            producer.cancel()
            for request_id_ in ids:
                channel.forget(request_id_)
        if state["failure"] is not None:
            raise state["failure"]

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
        """See ``Client.shared_memory_status``."""
        channel = await self._local()
        if channel is None:
            response: pb.SystemSharedMemoryStatusResponse = await self._call(
                "SystemSharedMemoryStatus", pb.SystemSharedMemoryStatusRequest(name=name),
                timeout)
            return dict(response.regions)
        return status_from_reply(await channel.call(status_message(name),
                                                    self.timeout if timeout is _Unset else timeout))

    async def register_system_shared_memory(self, name: str, key: str, byte_size: int,
                                            offset: int = 0,
                                            timeout: float | None = _Unset) -> None:
        channel = await self._local()
        if channel is None:
            await self._call("SystemSharedMemoryRegister",
                             pb.SystemSharedMemoryRegisterRequest(
                                 name=name, key=key, offset=offset, byte_size=byte_size),
                             timeout)
            return
        assert self._link is not None
        registrations = self._link.registrations
        recorded = registrations.add(name, key, offset, byte_size)
        try:
            await channel.call(register_message(name, key, offset, byte_size),
                               self.timeout if timeout is _Unset else timeout)
        except ShmserveError:
            if recorded:
                registrations.discard(name)
            raise

    async def unregister_system_shared_memory(self, name: str = "",
                                              timeout: float | None = _Unset) -> None:
        link = self._link
        if link is None or link.fell_back:
            await self._call("SystemSharedMemoryUnregister",
                             pb.SystemSharedMemoryUnregisterRequest(name=name), timeout)
            return
        link.registrations.discard(name)
        channel = link.current()
        if channel is None:
            return  # no channel, so nothing registered on it: its regions went with it
        try:
            await channel.call({"op": "unregister", "name": name},
                               self.timeout if timeout is _Unset else timeout)
        except ShmserveError as exc:
            if exc.code != grpc.StatusCode.UNAVAILABLE:
                raise  # a closed channel took its regions with it

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
