"""``Client``: the synchronous client (grpc's blocking channel)."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Generator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import grpc
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
from shmserve.client._common import (
    channel_options as _channel_options,
)
from shmserve.client._convert import (
    InputValue,
    Outputs,
    ParameterValue,
    read_outputs,
    read_reply_outputs,
)
from shmserve.client._local import (
    LocalLink,
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
from shmserve.client.local_channel import LocalChannel, MessageTooLarge
from shmserve.client.regions import SystemRegion
from shmserve.protos import shmserve_model_config_pb2 as mc
from shmserve.protos import shmserve_service_pb2 as pb

_Unset: Any = object()
# Unregister failures that mean "the server is gone": the region is released locally anyway.
_SERVER_GONE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                grpc.StatusCode.CANCELLED)


@dataclass(slots=True)
class _Stubs:
    target: str
    channel: grpc.Channel
    unary: dict[str, Any]
    infer: Any
    stream: Any


class Client:
    """A blocking client for shmserve (or any KServe-v2 gRPC server such as Triton).

    ``url`` is ``host:port`` (``grpc://`` accepted), ``unix:/path``, or ``local:///path`` for
    shmserve's local shared-memory channel. ``transport="shm"`` with a gRPC url uses the local
    channel of that server (found at ``local_socket`` or the server's default socket path),
    falling back to gRPC with one log line when it cannot be opened; see docs/client.md.
    Before sending anything there, the client checks who serves the socket: its own user,
    root, the owner of a directory only that owner can write, or ``server_uid``.
    ``timeout`` is the default deadline in seconds of every call but load/unload
    (``load_timeout``); ``None`` means no deadline. ``headers`` are sent with every gRPC call,
    as is the ``shmserve-client-id`` header that scopes "unregister all" to this client's
    regions. ``channel_options`` override the defaults (message size INT32_MAX, keepalive)
    key by key. Thread-safe.
    """

    def __init__(self, url: str = "127.0.0.1:8001", *, timeout: float | None = DEFAULT_TIMEOUT,
                 load_timeout: float | None = LOAD_TIMEOUT,
                 headers: Mapping[str, str] | None = None,
                 channel_options: Sequence[tuple[str, Any]] | None = None,
                 credentials: grpc.ChannelCredentials | None = None,
                 interceptors: Sequence[Any] | None = None,
                 client_id: str | None = None, transport: str | None = None,
                 local_socket: str | None = None, server_uid: int | None = None) -> None:
        self.url = url
        self.timeout = timeout
        self.load_timeout = load_timeout
        self.client_id = client_id or new_client_id()
        self._metadata = call_metadata(self.client_id, headers)
        plan = plan_transport(url, transport, local_socket, server_uid)
        self._link = LocalLink(plan) if plan is not None else None
        self._options = _channel_options(channel_options)
        self._credentials = credentials
        self._interceptors = interceptors
        self._stubs_lock = threading.Lock()
        self._grpc_stubs: _Stubs | None = None
        if plan is None:
            self._grpc_stubs = self._connect_grpc(target_of(url))
        elif plan.grpc_target is not None:
            self._grpc_stubs = self._connect_grpc(plan.grpc_target)
        self._regions = RegionSet()
        self._closed = False

    def _connect_grpc(self, target: str) -> _Stubs:
        options = self._options
        raw = (grpc.secure_channel(target, self._credentials, options=options)
               if self._credentials is not None
               else grpc.insecure_channel(target, options=options))
        channel: grpc.Channel = raw
        if self._interceptors:
            channel = grpc.intercept_channel(raw, *self._interceptors)
        unary = {
            name: channel.unary_unary(method_path(name),
                                      request_serializer=request.SerializeToString,
                                      response_deserializer=response.FromString,
                                      _registered_method=True)
            for name, (request, response) in UNARY_RPCS.items()}
        # Inference requests and answers travel as bytes (see _wire.py).
        return _Stubs(target, raw, unary,
                      channel.unary_unary(method_path("ModelInfer"), _registered_method=True),
                      channel.stream_stream(method_path("ModelStreamInfer"),
                                            _registered_method=True))

    def _stubs(self) -> _Stubs:
        stubs = self._grpc_stubs
        link = self._link
        if stubs is not None and (link is None or stubs.target == link.known_target):
            return stubs
        assert link is not None
        target = link.grpc_target()  # a local: url: the server names it (it may move)
        with self._stubs_lock:
            stubs = self._grpc_stubs
            if stubs is None or stubs.target != target:
                if self._closed:
                    raise ShmserveError(grpc.StatusCode.CANCELLED, "the client is closed")
                old, stubs = stubs, self._connect_grpc(target)
                self._grpc_stubs = stubs
                if old is not None:
                    old.channel.close()
            return stubs

    def _local(self) -> LocalChannel | None:
        """The local channel to use, or None for gRPC."""
        link = self._link
        return link.channel() if link is not None else None

    @property
    def transport(self) -> str:
        """``"shm"`` while this client uses the local channel, else ``"grpc"``."""
        return "shm" if self._link is not None and not self._link.fell_back else "grpc"

    # --- plumbing ---------------------------------------------------------------------------
    def _call(self, rpc: str, request: Any, timeout: float | None = _Unset) -> Any:
        try:
            return self._stubs().unary[rpc](request, timeout=self.timeout if timeout is _Unset
                                            else timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None

    def close(self) -> None:
        """Release this client's remaining regions and close the channel."""
        if self._closed:
            return
        for region in list(self._regions):
            if isinstance(region, SystemRegion):
                self._release(region, raise_errors=False)
        self._closed = True
        if self._link is not None:
            self._link.close()
        with self._stubs_lock:
            stubs = self._grpc_stubs
        if stubs is not None:
            stubs.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # --- health and metadata ----------------------------------------------------------------
    def is_server_live(self, timeout: float | None = _Unset) -> bool:
        return bool(self._call("ServerLive", pb.ServerLiveRequest(), timeout).live)

    def is_server_ready(self, timeout: float | None = _Unset) -> bool:
        return bool(self._call("ServerReady", pb.ServerReadyRequest(), timeout).ready)

    def is_model_ready(self, name: str, version: str = "",
                       timeout: float | None = _Unset) -> bool:
        request = pb.ModelReadyRequest(name=name, version=version)
        return bool(self._call("ModelReady", request, timeout).ready)

    def server_metadata(self, timeout: float | None = _Unset) -> pb.ServerMetadataResponse:
        response: pb.ServerMetadataResponse = self._call(
            "ServerMetadata", pb.ServerMetadataRequest(), timeout)
        return response

    def model_metadata(self, name: str, version: str = "",
                       timeout: float | None = _Unset) -> pb.ModelMetadataResponse:
        response: pb.ModelMetadataResponse = self._call(
            "ModelMetadata", pb.ModelMetadataRequest(name=name, version=version), timeout)
        return response

    def model_config(self, name: str, version: str = "",
                     timeout: float | None = _Unset) -> mc.ModelConfig:
        response: pb.ModelConfigResponse = self._call(
            "ModelConfig", pb.ModelConfigRequest(name=name, version=version), timeout)
        return response.config

    def model_statistics(self, name: str = "", version: str = "",
                         timeout: float | None = _Unset) -> list[pb.ModelStatistics]:
        """Statistics of one model (all its versions unless ``version``), or of all models."""
        response: pb.ModelStatisticsResponse = self._call(
            "ModelStatistics", pb.ModelStatisticsRequest(name=name, version=version), timeout)
        return list(response.model_stats)

    # --- repository -------------------------------------------------------------------------
    def repository_index(self, ready: bool = False, timeout: float | None = _Unset
                         ) -> list[pb.RepositoryIndexResponse.ModelIndex]:
        response: pb.RepositoryIndexResponse = self._call(
            "RepositoryIndex", pb.RepositoryIndexRequest(ready=ready), timeout)
        return list(response.models)

    def load_model(self, name: str, config: str | Mapping[str, Any] | None = None,
                   files: Mapping[str, bytes] | None = None,
                   timeout: float | None = _Unset) -> None:
        """Load or reload a model; ``config`` (JSON text or dict) overrides config.pbtxt and
        ``files`` maps paths such as ``"1/model.py"`` to their content (needs ``config``)."""
        self._call("RepositoryModelLoad", load_request(name, config, files),
                   self.load_timeout if timeout is _Unset else timeout)

    def unload_model(self, name: str, unload_dependents: bool = False,
                     timeout: float | None = _Unset) -> None:
        self._call("RepositoryModelUnload", unload_request(name, unload_dependents),
                   self.load_timeout if timeout is _Unset else timeout)

    # --- inference --------------------------------------------------------------------------
    def serialize_infer_request(self, model: str, inputs: Mapping[str, InputValue],
                                outputs: Outputs = None, version: str = "",
                                request_id: str = "",
                                parameters: Mapping[str, ParameterValue] | None = None
                                ) -> bytes:
        """The exact ModelInferRequest bytes ``infer`` would send (for inspection and tests)."""
        return prepare(model, inputs, outputs, version, request_id, parameters,
                       self._regions).payload

    def infer(self, model: str, inputs: Mapping[str, InputValue], outputs: Outputs = None,
              version: str = "", request_id: str = "",
              parameters: Mapping[str, ParameterValue] | None = None,
              timeout: float | None = _Unset) -> dict[str, np.ndarray]:
        """Run one inference; returns the outputs by name as NumPy arrays.

        Inputs that are C-contiguous views into one of this client's regions travel as region
        references, every other input as bytes. ``outputs``: None (all outputs, as bytes), a
        list of names, or a dict of name -> array in a region (the server writes the output
        there and that very array, or a view of its memory with the output's shape, is
        returned) or None (that output as bytes). Outputs returned from bytes are read-only
        views of the response.
        """
        call_timeout = self.timeout if timeout is _Unset else timeout
        link = self._link
        channel = link.channel() if link is not None else None
        if channel is not None:
            request = infer_message(model, inputs, outputs, version, request_id, parameters,
                                    self._regions.locate if len(self._regions) else None,
                                    call_timeout)
            if request.payload_bytes <= channel.max_message:
                try:
                    reply = channel.call(request.message, call_timeout)
                except MessageTooLarge:
                    pass
                else:
                    return read_reply_outputs(reply["out"], request.region_outputs)
            if request.references:
                raise too_large(request.payload_bytes, channel.max_message)
            # Too large for the channel and no region in it: gRPC carries it.
        prepared = prepare(model, inputs, outputs, version, request_id, parameters,
                           self._regions)
        try:
            data = self._stubs().infer(prepared.payload, timeout=call_timeout,
                                       metadata=self._metadata)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        header, raw = decode_infer_response(data)
        return read_outputs(header, raw, prepared.region_outputs)

    def stream_infer(self, model: str,
                     requests: Iterable[StreamRequest | Mapping[str, InputValue]],
                     outputs: Outputs = None, version: str = "",
                     parameters: Mapping[str, ParameterValue] | None = None,
                     timeout: float | None = None) -> Generator[StreamResult, None, None]:
        """Send ``requests`` on one ModelStreamInfer stream; yield answers as they complete.

        Each request is a ``{name: array}`` mapping or a ``StreamRequest``; per-request
        failures come back as a ``StreamResult`` with ``error`` set (the stream goes on). The
        stream has no deadline unless ``timeout`` is given. Closing the generator early
        cancels the stream.
        """
        channel = self._local()
        if channel is not None:
            yield from self._stream_local(channel, model, requests, outputs, version,
                                          parameters, timeout)
            return
        book = StreamBook(model, version, outputs, parameters, self._regions)

        def produce() -> Iterator[bytes]:
            try:
                for index, item in enumerate(requests):
                    yield book.prepare(index, item)
            except Exception as exc:
                book.failure = exc

        call = self._stubs().stream(produce(), timeout=timeout, metadata=self._metadata)
        try:
            for data in call:
                yield book.read(data)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        finally:
            call.cancel()
        if book.failure is not None:
            raise book.failure

    def _stream_local(self, channel: LocalChannel, model: str,
                      requests: Iterable[StreamRequest | Mapping[str, InputValue]],
                      outputs: Outputs, version: str,
                      parameters: Mapping[str, ParameterValue] | None,
                      timeout: float | None) -> Generator[StreamResult, None, None]:
        """``stream_infer`` through the local channel: a thread sends the requests as the
        iterable yields them, this generator reads the answers in completion order."""
        deadline = None if timeout is None else time.monotonic() + timeout
        stream = _LocalStream()

        def answer(index: int, request_id: str, region_outputs: dict[str, np.ndarray]
                   ) -> Any:
            def done(reply: dict[str, Any] | None, error: ShmserveError | None) -> None:
                with stream.lock:
                    stream.outstanding -= 1
                    if reply is None:
                        stream.broken = error
                        return
                    result = StreamResult(index, request_id, model,
                                          "" if "err" in reply else reply["model_version"])
                    if "err" in reply:
                        result.error = stream_error(reply["err"])
                    else:
                        try:
                            result.outputs = read_reply_outputs(reply["out"], region_outputs)
                        except ShmserveError as exc:
                            result.error = exc
                    stream.results.append(result)
            return done

        def produce() -> None:
            try:
                for index, item in enumerate(requests):
                    if stream.stop:
                        return
                    one = stream_item(item)
                    request_id = one.request_id or f"{index}"
                    request = infer_message(
                        model, one.inputs, one.outputs if one.outputs is not None else outputs,
                        version, request_id,
                        one.parameters if one.parameters is not None else parameters,
                        self._regions.locate if len(self._regions) else None,
                        None if deadline is None else max(0.0, deadline - time.monotonic()))
                    if not request.fits(channel.max_message):
                        raise too_large(request.payload_bytes, channel.max_message, False)
                    with stream.lock:
                        stream.outstanding += 1
                    try:
                        stream.ids.append(channel.submit(
                            request.message, answer(index, request_id, request.region_outputs),
                            deadline))
                    except BaseException:
                        with stream.lock:
                            stream.outstanding -= 1
                        raise
            except MessageTooLarge:
                stream.failure = too_large(request.payload_bytes, channel.max_message, False)
            except Exception as exc:
                stream.failure = exc
            finally:
                stream.producing = False
                channel.notify()

        producer = threading.Thread(target=produce, name="shmserve-local-stream", daemon=True)
        producer.start()
        try:
            while True:
                while stream.results:
                    yield stream.results.popleft()
                if stream.broken is not None:
                    raise stream.broken
                if stream.finished():
                    break
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    raise ShmserveError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
                step = now + _STREAM_POLL_S
                channel.wait(stream.ready, step if deadline is None else min(step, deadline))
        finally:
            stream.stop = True
            for request_id in stream.ids:
                channel.forget(request_id)
        if stream.failure is not None:
            raise stream.failure

    # --- shared memory ----------------------------------------------------------------------
    def shared_memory(self, byte_size: int) -> _RegionContext:
        """``with client.shared_memory(n) as region:`` a registered region of ``n`` bytes.

        On exit (also on an exception) the region is unregistered, unlinked and unmapped.
        """
        return _RegionContext(self, byte_size)

    def cuda_shared_memory(self, byte_size: int, device_id: int = 0) -> _RegionContext:
        """CUDA regions (torch tensors in ``cudaMalloc`` memory) are not built yet.

        They plug in through the ``Region`` protocol in ``shmserve.client.regions``; see
        docs/client.md, "CUDA regions".
        """
        raise ShmserveError(grpc.StatusCode.UNIMPLEMENTED,
                            "CUDA shared-memory regions are not implemented in this client yet")

    def _open_region(self, byte_size: int) -> SystemRegion:
        if self._closed:
            raise ShmserveError(grpc.StatusCode.CANCELLED, "the client is closed")
        region = SystemRegion(byte_size)
        try:
            self.register_system_shared_memory(region.name, region.key, region.byte_size)
        except BaseException:
            region.close()
            raise
        self._regions.add(region)
        return region

    def _release(self, region: SystemRegion, raise_errors: bool) -> None:
        """Unregister (best effort when the server is gone), then unlink and unmap."""
        if not self._regions.remove(region):
            region.close()
            return
        # Unlink first: nothing can leak in /dev/shm even if the unregister call is interrupted.
        region.unlink()
        try:
            self.unregister_system_shared_memory(region.name, timeout=UNREGISTER_TIMEOUT)
        except ShmserveError as exc:
            if raise_errors and exc.code not in _SERVER_GONE:
                raise
        finally:
            region.close()

    def shared_memory_status(self, name: str = "", timeout: float | None = _Unset
                             ) -> dict[str, RegionStatus]:
        """The server's system regions (all of them, or ``name``) by registration name.

        Through the local channel: the regions this client registered on it (the only ones
        it can use), by the names it gave them.
        """
        channel = self._local()
        if channel is None:
            response: pb.SystemSharedMemoryStatusResponse = self._call(
                "SystemSharedMemoryStatus", pb.SystemSharedMemoryStatusRequest(name=name),
                timeout)
            return dict(response.regions)
        deadline = self.timeout if timeout is _Unset else timeout
        return status_from_reply(channel.call(status_message(name), deadline))

    def register_system_shared_memory(self, name: str, key: str, byte_size: int,
                                      offset: int = 0, timeout: float | None = _Unset) -> None:
        """Register a segment created elsewhere (``shared_memory()`` does this for you)."""
        channel = self._local()
        if channel is None:
            self._call("SystemSharedMemoryRegister", pb.SystemSharedMemoryRegisterRequest(
                name=name, key=key, offset=offset, byte_size=byte_size), timeout)
            return
        assert self._link is not None
        registrations = self._link.registrations
        recorded = registrations.add(name, key, offset, byte_size)
        try:
            channel.call(register_message(name, key, offset, byte_size),
                         self.timeout if timeout is _Unset else timeout)
        except ShmserveError:
            if recorded:
                registrations.discard(name)
            raise

    def unregister_system_shared_memory(self, name: str = "",
                                        timeout: float | None = _Unset) -> None:
        """Unregister ``name``, or with no name every region this client registered."""
        link = self._link
        if link is None or link.fell_back:
            self._call("SystemSharedMemoryUnregister",
                       pb.SystemSharedMemoryUnregisterRequest(name=name), timeout)
            return
        link.registrations.discard(name)
        channel = link.current()
        if channel is None:
            return  # no channel, so nothing registered on it: its regions went with it
        try:
            channel.call({"op": "unregister", "name": name},
                         self.timeout if timeout is _Unset else timeout)
        except ShmserveError as exc:
            if exc.code != grpc.StatusCode.UNAVAILABLE:
                raise  # a closed channel took its regions with it

    @property
    def regions(self) -> list[SystemRegion]:
        """This client's open regions."""
        return [r for r in self._regions if isinstance(r, SystemRegion)]


class _RegionContext:
    """The context manager ``Client.shared_memory`` returns."""

    def __init__(self, client: Client, byte_size: int) -> None:
        self._client = client
        self._byte_size = byte_size
        self._region: SystemRegion | None = None

    def __enter__(self) -> SystemRegion:
        self._region = self._client._open_region(self._byte_size)
        return self._region

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        region, self._region = self._region, None
        if region is not None:
            self._client._release(region, raise_errors=exc_type is None)


_STREAM_POLL_S = 0.05


class _LocalStream:
    """State shared by a local stream's sending thread and its reading generator."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.results: deque[StreamResult] = deque()
        self.ids: list[int] = []
        self.outstanding = 0
        self.producing = True
        self.stop = False
        self.broken: ShmserveError | None = None
        self.failure: BaseException | None = None

    def finished(self) -> bool:
        return not self.producing and self.outstanding == 0 and not self.results

    def ready(self) -> bool:
        return bool(self.results) or self.broken is not None or self.finished()
