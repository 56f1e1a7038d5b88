"""``AsyncClient``: the asyncio client (grpc.aio), a shell over ``ClientCore`` that awaits its
I/O."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Mapping
from types import TracebackType
from typing import Any, TypeVar

import grpc
import grpc.aio
import numpy as np

from shmserve.client import _unary as rpc
from shmserve.client._common import (
    UNREGISTER_TIMEOUT,
    RegionStatus,
    StreamBook,
    StreamRequest,
    StreamResult,
    prepare,
)
from shmserve.client._convert import (
    InputValue,
    Outputs,
    ParameterValue,
    read_outputs,
    read_reply_outputs,
)
from shmserve.client._core import (
    SERVER_GONE,
    UNSET,
    ClientCore,
    RegionContext,
    Stubs,
    stubs_on,
)
from shmserve.client._local import (
    AsyncLocalLink,
    StreamState,
    channel_gone,
    infer_message,
    register_message,
    status_from_reply,
    status_message,
    stream_result,
    too_large,
    unregister_message,
    with_ring,
)
from shmserve.client._unary import Unary
from shmserve.client._wire import decode_infer_response
from shmserve.client.errors import ShmserveError, from_rpc_error
from shmserve.client.local_channel import AsyncLocalChannel, MessageTooLarge
from shmserve.client.memfd_region import MemfdRegion, with_passed_fd
from shmserve.client.regions import HostRegion
from shmserve.client.response_ring import ResponseRing
from shmserve.client.sequence import AsyncSequence
from shmserve.protos import shmserve_model_config_pb2 as mc
from shmserve.protos import shmserve_service_pb2 as pb

T = TypeVar("T")
AnyIterable = AsyncIterable[T] | Iterable[T]


class AsyncClient(ClientCore[AsyncLocalLink, grpc.aio.Channel]):
    """The asyncio twin of ``Client``: same arguments, same methods, awaitable.

    Create it inside a running event loop (grpc.aio binds the channel to it) and close it with
    ``await client.close()`` or ``async with AsyncClient(url) as client:``.
    """

    _link_type = AsyncLocalLink

    def _connect_grpc(self, target: str) -> Stubs[grpc.aio.Channel]:
        options, interceptors = self._options, self._interceptors
        channel = (
            grpc.aio.secure_channel(target, self._credentials, options=options,
                                    interceptors=interceptors)
            if self._credentials is not None
            else grpc.aio.insecure_channel(target, options=options, interceptors=interceptors))
        return stubs_on(target, channel, channel)

    async def _stubs(self) -> Stubs[grpc.aio.Channel]:
        stubs = self._grpc_stubs
        link = self._link
        if stubs is not None and (link is None or stubs.target == link.known_target):
            return stubs
        assert link is not None
        stubs, old = self._swap_stubs(await link.grpc_target())
        if old is not None:
            await old.channel.close()
        return stubs

    async def _local(self) -> AsyncLocalChannel | None:
        link = self._link
        return await link.channel() if link is not None else None

    async def _unary(self, call: Unary[T], timeout: float | None) -> T:
        try:
            stubs = await self._stubs()
            response = await stubs.unary[call.rpc](
                call.request, timeout=self._deadline(timeout, call.loads),
                metadata=self._metadata)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        return call.read(response)

    async def close(self) -> None:
        """Release this client's remaining regions and close the channel."""
        if self._closed:
            return
        for region in self.regions:
            await self._release(region, raise_errors=False)
        stubs = self._shut()
        if stubs is not None:
            await stubs.channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    # --- health and metadata ----------------------------------------------------------------
    async def is_server_live(self, timeout: float | None = UNSET) -> bool:
        return await self._unary(rpc.server_live(), timeout)

    async def is_server_ready(self, timeout: float | None = UNSET) -> bool:
        return await self._unary(rpc.server_ready(), timeout)

    async def is_model_ready(self, name: str, version: str = "",
                             timeout: float | None = UNSET) -> bool:
        return await self._unary(rpc.model_ready(name, version), timeout)

    async def server_metadata(self, timeout: float | None = UNSET
                              ) -> pb.ServerMetadataResponse:
        return await self._unary(rpc.server_metadata(), timeout)

    async def model_metadata(self, name: str, version: str = "",
                             timeout: float | None = UNSET) -> pb.ModelMetadataResponse:
        return await self._unary(rpc.model_metadata(name, version), timeout)

    async def model_config(self, name: str, version: str = "",
                           timeout: float | None = UNSET) -> mc.ModelConfig:
        return await self._unary(rpc.model_config(name, version), timeout)

    async def model_statistics(self, name: str = "", version: str = "",
                               timeout: float | None = UNSET) -> list[pb.ModelStatistics]:
        return await self._unary(rpc.model_statistics(name, version), timeout)

    # --- repository -------------------------------------------------------------------------
    async def repository_index(self, ready: bool = False, timeout: float | None = UNSET
                               ) -> list[pb.RepositoryIndexResponse.ModelIndex]:
        return await self._unary(rpc.repository_index(ready), timeout)

    async def load_model(self, name: str, config: str | Mapping[str, Any] | None = None,
                         files: Mapping[str, bytes] | None = None,
                         timeout: float | None = UNSET) -> None:
        await self._unary(rpc.load_model(name, config, files), timeout)

    async def unload_model(self, name: str, unload_dependents: bool = False,
                           timeout: float | None = UNSET) -> None:
        await self._unary(rpc.unload_model(name, unload_dependents), timeout)

    # --- inference --------------------------------------------------------------------------
    def sequence(self, model: str, sequence_id: int | str | None = None,
                 version: str = "") -> AsyncSequence:
        """See ``Client.sequence``; its ``infer`` is awaited."""
        return AsyncSequence(self, model, sequence_id, version)

    async def infer(self, model: str, inputs: Mapping[str, InputValue],
                    outputs: Outputs = None, version: str = "", request_id: str = "",
                    parameters: Mapping[str, ParameterValue] | None = None,
                    timeout: float | None = UNSET) -> dict[str, np.ndarray]:
        """See ``Client.infer``."""
        call_timeout = self.timeout if timeout is UNSET else timeout
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
            self._past_channel(request, channel.max_message)
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
            self, model: str, requests: AnyIterable[StreamRequest | Mapping[str, InputValue]],
            outputs: Outputs = None, version: str = "",
            parameters: Mapping[str, ParameterValue] | None = None,
            timeout: float | None = None, ring: ResponseRing | None = None
    ) -> AsyncIterator[StreamResult]:
        """See ``Client.stream_infer``; ``requests`` may also be an async iterable."""
        channel = await self._local()
        if channel is not None:
            async for result in self._stream_local(channel, model, requests, outputs, version,
                                                   parameters, timeout, ring):
                yield result
            return
        book = StreamBook(model, version, outputs, parameters, self._regions, ring)

        async def produce() -> AsyncIterator[bytes]:
            try:
                async for index, item in _enumerate(requests):
                    if ring is not None:
                        await _ring_turn(ring)
                    yield book.prepare(index, item)
            except Exception as exc:
                book.failure = exc

        stubs = await self._stubs()
        call = stubs.stream(produce(), timeout=timeout, metadata=self._metadata)
        try:
            async for data in call:
                answer = book.read(data)
                if answer is None:
                    continue
                yield answer
                if ring is not None and answer.ring_slot >= 0:
                    ring.release()  # the caller moved past it: its slot may be reused
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        finally:
            call.cancel()
            if ring is not None:
                ring.abandon()
        book.finish()

    async def _stream_local(
            self, channel: AsyncLocalChannel, model: str,
            requests: AnyIterable[StreamRequest | Mapping[str, InputValue]],
            outputs: Outputs, version: str, parameters: Mapping[str, ParameterValue] | None,
            timeout: float | None, ring: ResponseRing | None = None
    ) -> AsyncIterator[StreamResult]:
        """``stream_infer`` through the local channel: a task sends the requests as the
        iterable yields them, this generator yields the answers in completion order."""
        deadline = None if timeout is None else time.monotonic() + timeout
        queue: asyncio.Queue[StreamResult | None] = asyncio.Queue()
        stream = StreamState()

        def answer(index: int, request_id: str, region_outputs: dict[str, np.ndarray]
                   ) -> Callable[[asyncio.Future[dict[str, Any]]], None]:
            def done(future: asyncio.Future[dict[str, Any]]) -> None:
                stream.outstanding -= 1
                if future.cancelled():
                    queue.put_nowait(None)
                    return
                error = future.exception()
                if error is not None:
                    stream.broken = error
                    queue.put_nowait(None)
                    return
                # None (a final flag alone) still wakes the reader: the request is done.
                queue.put_nowait(stream_result(index, request_id, model, future.result(),
                                               region_outputs, ring))
            return done

        def partial(index: int, request_id: str, region_outputs: dict[str, np.ndarray]
                    ) -> Callable[[dict[str, Any]], None]:
            def more(reply: dict[str, Any]) -> None:
                result = stream_result(index, request_id, model, reply, region_outputs, ring)
                if result is not None:
                    queue.put_nowait(result)
            return more

        async def produce() -> None:
            try:
                async for index, item in _enumerate(requests):
                    if ring is not None:
                        await _ring_turn(ring)
                    request_id, request = self._stream_request(
                        model, index, with_ring(item, parameters, ring), outputs, version,
                        parameters, deadline, channel.max_message)
                    request.message["s"] = True  # may have several replies (decoupled)
                    try:
                        sent_id, future = await channel.send(
                            request.message, deadline,
                            partial(index, request_id, request.region_outputs))
                    except MessageTooLarge:
                        raise too_large(request.payload_bytes, channel.max_message,
                                        False) from None
                    stream.ids.append(sent_id)
                    stream.outstanding += 1
                    future.add_done_callback(answer(index, request_id, request.region_outputs))
            except Exception as exc:
                stream.failure = exc
            finally:
                stream.producing = False
                queue.put_nowait(None)

        producer = asyncio.get_running_loop().create_task(produce())
        try:
            while True:
                if stream.broken is not None:
                    raise stream.broken
                if not stream.producing and stream.outstanding == 0 and queue.empty():
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
                    if ring is not None and item.ring_slot >= 0:
                        ring.release()  # the caller moved past it: its slot may be reused
        finally:
            producer.cancel()
            for sent_id in stream.ids:
                channel.cancel(sent_id)  # a request still open: cancelled
            if ring is not None:
                ring.abandon()
        if stream.failure is not None:
            raise stream.failure

    # --- shared memory ----------------------------------------------------------------------
    def shared_memory(self, byte_size: int) -> _AsyncRegionContext:
        """``async with client.shared_memory(n) as region:`` (see ``Client.shared_memory``)."""
        return _AsyncRegionContext(self, byte_size)

    def cuda_shared_memory(self, byte_size: int, device_id: int = 0) -> _AsyncRegionContext:
        """Not built yet: see ``Client.cuda_shared_memory``."""
        raise ShmserveError(grpc.StatusCode.UNIMPLEMENTED,
                            "CUDA shared-memory regions are not implemented in this client yet")

    async def _open_region(self, byte_size: int) -> HostRegion:
        channel = await self._local()
        region = self._new_region(byte_size, channel)
        try:
            if isinstance(region, MemfdRegion):
                assert channel is not None
                message, recorded = self._record_memfd(region)
                try:
                    await channel.call(with_passed_fd(channel.fd_door, message), self.timeout)
                except ShmserveError:
                    self._unrecord(region.name, recorded)
                    raise
            else:
                await self.register_system_shared_memory(region.name, region.key,
                                                         region.byte_size)
        except BaseException:
            region.close()
            raise
        self._regions.add(region)
        return region

    async def _release(self, region: HostRegion, raise_errors: bool) -> None:
        if not self._leaving(region):
            return
        try:
            await self.unregister_system_shared_memory(region.name,
                                                       timeout=UNREGISTER_TIMEOUT)
        except ShmserveError as exc:
            if raise_errors and exc.code not in SERVER_GONE:
                raise
        finally:
            region.close()

    async def shared_memory_status(self, name: str = "", timeout: float | None = UNSET
                                   ) -> dict[str, RegionStatus]:
        """See ``Client.shared_memory_status``."""
        channel = await self._local()
        if channel is None:
            return await self._unary(rpc.shm_status(name), timeout)
        return status_from_reply(await channel.call(status_message(name),
                                                    self._deadline(timeout)))

    async def register_system_shared_memory(self, name: str, key: str, byte_size: int,
                                            offset: int = 0,
                                            timeout: float | None = UNSET) -> None:
        channel = await self._local()
        if channel is None:
            await self._unary(rpc.shm_register(name, key, offset, byte_size), timeout)
            return
        recorded = self._record(name, key, offset, byte_size)
        try:
            await channel.call(register_message(name, key, offset, byte_size),
                               self._deadline(timeout))
        except ShmserveError:
            self._unrecord(name, recorded)
            raise

    async def unregister_system_shared_memory(self, name: str = "",
                                              timeout: float | None = UNSET) -> None:
        if self.transport == "grpc":
            await self._unary(rpc.shm_unregister(name), timeout)
            return
        assert self._link is not None
        channel = self._link.forget(name)
        if channel is not None:
            try:
                await channel.call(unregister_message(name), self._deadline(timeout))
            except ShmserveError as exc:
                if not channel_gone(exc):
                    raise


async def _enumerate(items: AnyIterable[T]) -> AsyncIterator[tuple[int, T]]:
    """``enumerate`` over a plain or an async iterable."""
    index = 0
    if isinstance(items, AsyncIterable):
        async for item in items:
            yield index, item
            index += 1
    else:
        for item in items:
            yield index, item
            index += 1


class _AsyncRegionContext(RegionContext[AsyncClient]):
    """The async context manager ``AsyncClient.shared_memory`` returns."""

    async def __aenter__(self) -> HostRegion:
        self._region = await self._client._open_region(self._byte_size)
        return self._region

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        region = self._taken()
        if region is not None:
            await self._client._release(region, raise_errors=exc_type is None)


async def _ring_turn(ring: ResponseRing) -> None:
    """Wait, without blocking the loop, until the stream's ring is free for a request."""
    while not ring.start(0):
        await asyncio.sleep(0.001)
