"""``Client``: the synchronous client (grpc's blocking channel)."""

from __future__ import annotations

from collections.abc import Generator, Iterable, Iterator, Mapping, Sequence
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
from shmserve.client._convert import InputValue, Outputs, ParameterValue, read_outputs
from shmserve.client._wire import decode_infer_response
from shmserve.client.errors import ShmserveError, from_rpc_error
from shmserve.client.regions import SystemRegion
from shmserve.protos import shmserve_model_config_pb2 as mc
from shmserve.protos import shmserve_service_pb2 as pb

_Unset: Any = object()
# Unregister failures that mean "the server is gone": the region is released locally anyway.
_SERVER_GONE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                grpc.StatusCode.CANCELLED)


class Client:
    """A blocking client for shmserve (or any KServe-v2 gRPC server such as Triton).

    ``url`` is ``host:port`` (``grpc://`` accepted) or ``unix:/path``. ``timeout`` is the
    default deadline in seconds of every call but load/unload (``load_timeout``); ``None``
    means no deadline. ``headers`` are sent with every call, as is the ``shmserve-client-id``
    header that scopes "unregister all" to this client's regions. ``channel_options``
    override the defaults (message size INT32_MAX, keepalive) key by key. Thread-safe.
    """

    def __init__(self, url: str = "127.0.0.1:8001", *, timeout: float | None = DEFAULT_TIMEOUT,
                 load_timeout: float | None = LOAD_TIMEOUT,
                 headers: Mapping[str, str] | None = None,
                 channel_options: Sequence[tuple[str, Any]] | None = None,
                 credentials: grpc.ChannelCredentials | None = None,
                 interceptors: Sequence[Any] | None = None,
                 client_id: str | None = None) -> None:
        self.url = url
        self.timeout = timeout
        self.load_timeout = load_timeout
        self.client_id = client_id or new_client_id()
        self._metadata = call_metadata(self.client_id, headers)
        target = target_of(url)
        options = _channel_options(channel_options)
        self._channel = (grpc.secure_channel(target, credentials, options=options)
                         if credentials is not None
                         else grpc.insecure_channel(target, options=options))
        channel: grpc.Channel = self._channel
        if interceptors:
            channel = grpc.intercept_channel(self._channel, *interceptors)
        self._unary = {
            name: channel.unary_unary(method_path(name),
                                      request_serializer=request.SerializeToString,
                                      response_deserializer=response.FromString,
                                      _registered_method=True)
            for name, (request, response) in UNARY_RPCS.items()}
        # Inference requests and answers travel as bytes (see _wire.py).
        self._infer = channel.unary_unary(method_path("ModelInfer"), _registered_method=True)
        self._stream = channel.stream_stream(method_path("ModelStreamInfer"),
                                             _registered_method=True)
        self._regions = RegionSet()
        self._closed = False

    # --- plumbing ---------------------------------------------------------------------------
    def _call(self, rpc: str, request: Any, timeout: float | None = _Unset) -> Any:
        try:
            return self._unary[rpc](request, timeout=self.timeout if timeout is _Unset
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
        self._channel.close()

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
        prepared = prepare(model, inputs, outputs, version, request_id, parameters,
                           self._regions)
        try:
            data = self._infer(prepared.payload, timeout=self.timeout if timeout is _Unset
                               else timeout, metadata=self._metadata)
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
        book = StreamBook(model, version, outputs, parameters, self._regions)

        def produce() -> Iterator[bytes]:
            try:
                for index, item in enumerate(requests):
                    yield book.prepare(index, item)
            except Exception as exc:
                book.failure = exc

        call = self._stream(produce(), timeout=timeout, metadata=self._metadata)
        try:
            for data in call:
                yield book.read(data)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        finally:
            call.cancel()
        if book.failure is not None:
            raise book.failure

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
        """The server's system regions (all of them, or ``name``) by registration name."""
        response: pb.SystemSharedMemoryStatusResponse = self._call(
            "SystemSharedMemoryStatus", pb.SystemSharedMemoryStatusRequest(name=name), timeout)
        return dict(response.regions)

    def register_system_shared_memory(self, name: str, key: str, byte_size: int,
                                      offset: int = 0, timeout: float | None = _Unset) -> None:
        """Register a segment created elsewhere (``shared_memory()`` does this for you)."""
        self._call("SystemSharedMemoryRegister", pb.SystemSharedMemoryRegisterRequest(
            name=name, key=key, offset=offset, byte_size=byte_size), timeout)

    def unregister_system_shared_memory(self, name: str = "",
                                        timeout: float | None = _Unset) -> None:
        """Unregister ``name``, or with no name every region this client registered."""
        self._call("SystemSharedMemoryUnregister",
                   pb.SystemSharedMemoryUnregisterRequest(name=name), timeout)

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
