"""``Client``: the synchronous client (grpc's blocking channel), a shell over ``ClientCore``
that does the blocking I/O."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Generator, Iterable, Iterator, Mapping
from types import TracebackType
from typing import Any, TypeVar

import grpc
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
    LocalLink,
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
from shmserve.client.local_channel import Callback, LocalChannel, MessageTooLarge
from shmserve.client.memfd_region import MemfdRegion, with_passed_fd
from shmserve.client.regions import HostRegion
from shmserve.client.response_ring import ResponseRing
from shmserve.client.sequence import Sequence
from shmserve.protos import shmserve_model_config_pb2 as mc
from shmserve.protos import shmserve_service_pb2 as pb

T = TypeVar("T")


class Client(ClientCore[LocalLink, grpc.Channel]):
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

    _link_type = LocalLink

    def _connect_grpc(self, target: str) -> Stubs[grpc.Channel]:
        options = self._options
        raw = (grpc.secure_channel(target, self._credentials, options=options)
               if self._credentials is not None
               else grpc.insecure_channel(target, options=options))
        channel: grpc.Channel = raw
        if self._interceptors:
            channel = grpc.intercept_channel(raw, *self._interceptors)
        return stubs_on(target, raw, channel)

    def _stubs(self) -> Stubs[grpc.Channel]:
        stubs = self._grpc_stubs
        link = self._link
        if stubs is not None and (link is None or stubs.target == link.known_target):
            return stubs
        assert link is not None
        stubs, old = self._swap_stubs(link.grpc_target())
        if old is not None:
            old.channel.close()
        return stubs

    def _local(self) -> LocalChannel | None:
        """The local channel to use, or None for gRPC."""
        link = self._link
        return link.channel() if link is not None else None

    def _unary(self, call: Unary[T], timeout: float | None) -> T:
        try:
            response = self._stubs().unary[call.rpc](
                call.request, timeout=self._deadline(timeout, call.loads),
                metadata=self._metadata)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        return call.read(response)

    def close(self) -> None:
        """Release this client's remaining regions and close the channel."""
        if self._closed:
            return
        for region in self.regions:
            self._release(region, raise_errors=False)
        stubs = self._shut()
        if stubs is not None:
            stubs.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # --- health and metadata ----------------------------------------------------------------
    def is_server_live(self, timeout: float | None = UNSET) -> bool:
        return self._unary(rpc.server_live(), timeout)

    def is_server_ready(self, timeout: float | None = UNSET) -> bool:
        return self._unary(rpc.server_ready(), timeout)

    def is_model_ready(self, name: str, version: str = "",
                       timeout: float | None = UNSET) -> bool:
        return self._unary(rpc.model_ready(name, version), timeout)

    def server_metadata(self, timeout: float | None = UNSET) -> pb.ServerMetadataResponse:
        return self._unary(rpc.server_metadata(), timeout)

    def model_metadata(self, name: str, version: str = "",
                       timeout: float | None = UNSET) -> pb.ModelMetadataResponse:
        return self._unary(rpc.model_metadata(name, version), timeout)

    def model_config(self, name: str, version: str = "",
                     timeout: float | None = UNSET) -> mc.ModelConfig:
        return self._unary(rpc.model_config(name, version), timeout)

    def model_statistics(self, name: str = "", version: str = "",
                         timeout: float | None = UNSET) -> list[pb.ModelStatistics]:
        """Statistics of one model (all its versions unless ``version``), or of all models."""
        return self._unary(rpc.model_statistics(name, version), timeout)

    # --- repository -------------------------------------------------------------------------
    def repository_index(self, ready: bool = False, timeout: float | None = UNSET
                         ) -> list[pb.RepositoryIndexResponse.ModelIndex]:
        return self._unary(rpc.repository_index(ready), timeout)

    def load_model(self, name: str, config: str | Mapping[str, Any] | None = None,
                   files: Mapping[str, bytes] | None = None,
                   timeout: float | None = UNSET) -> None:
        """Load or reload a model; ``config`` (JSON text or dict) overrides config.pbtxt and
        ``files`` maps paths such as ``"1/model.py"`` to their content (needs ``config``)."""
        self._unary(rpc.load_model(name, config, files), timeout)

    def unload_model(self, name: str, unload_dependents: bool = False,
                     timeout: float | None = UNSET) -> None:
        self._unary(rpc.unload_model(name, unload_dependents), timeout)

    # --- inference --------------------------------------------------------------------------
    def infer(self, model: str, inputs: Mapping[str, InputValue], outputs: Outputs = None,
              version: str = "", request_id: str = "",
              parameters: Mapping[str, ParameterValue] | None = None,
              timeout: float | None = UNSET) -> dict[str, np.ndarray]:
        """Run one inference; returns the outputs by name as NumPy arrays.

        Inputs that are C-contiguous views into one of this client's regions travel as region
        references, every other input as bytes. ``outputs``: None (all outputs, as bytes), a
        list of names, or a dict of name -> array in a region (the server writes the output
        there and that very array, or a view of its memory with the output's shape, is
        returned) or None (that output as bytes). Outputs returned from bytes are read-only
        views of the response.
        """
        call_timeout = self.timeout if timeout is UNSET else timeout
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
            self._past_channel(request, channel.max_message)
        prepared = prepare(model, inputs, outputs, version, request_id, parameters,
                           self._regions)
        try:
            data = self._stubs().infer(prepared.payload, timeout=call_timeout,
                                       metadata=self._metadata)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        header, raw = decode_infer_response(data)
        return read_outputs(header, raw, prepared.region_outputs)

    def sequence(self, model: str, sequence_id: int | str | None = None,
                 version: str = "") -> Sequence:
        """The requests of one sequence of a stateful model (``sequence_id`` None: a random
        uint64): the first is sent with ``sequence_start``, ``infer(..., end=True)`` ends it."""
        return Sequence(self, model, sequence_id, version)

    def stream_infer(self, model: str,
                     requests: Iterable[StreamRequest | Mapping[str, InputValue]],
                     outputs: Outputs = None, version: str = "",
                     parameters: Mapping[str, ParameterValue] | None = None,
                     timeout: float | None = None, ring: ResponseRing | None = None
                     ) -> Generator[StreamResult, None, None]:
        """Send ``requests`` on one ModelStreamInfer stream; yield answers as they complete.

        Each request is a ``{name: array}`` mapping or a ``StreamRequest``; per-request
        failures come back as a ``StreamResult`` with ``error`` set (the stream goes on). The
        stream has no deadline unless ``timeout`` is given. Closing the generator early
        cancels the stream. ``ring``: the responses' outputs are written into this
        ``ResponseRing`` in one of the client's regions (client/response_ring.py); its
        requests then take turns.
        """
        channel = self._local()
        if channel is not None:
            yield from self._stream_local(channel, model, requests, outputs, version,
                                          parameters, timeout, ring)
            return
        book = StreamBook(model, version, outputs, parameters, self._regions, ring)

        def produce() -> Iterator[bytes]:
            try:
                for index, item in enumerate(requests):
                    if ring is not None and not ring.start():
                        return
                    yield book.prepare(index, item)
            except Exception as exc:
                book.failure = exc

        call = self._stubs().stream(produce(), timeout=timeout, metadata=self._metadata)
        try:
            for data in call:
                result = book.read(data)
                if result is None:
                    continue
                yield result
                if ring is not None and result.ring_slot >= 0:
                    ring.release()  # the caller moved past it: its slot may be reused
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        finally:
            call.cancel()
            if ring is not None:
                ring.abandon()
        book.finish()

    def _stream_local(self, channel: LocalChannel, model: str,
                      requests: Iterable[StreamRequest | Mapping[str, InputValue]],
                      outputs: Outputs, version: str,
                      parameters: Mapping[str, ParameterValue] | None,
                      timeout: float | None, ring: ResponseRing | None = None
                      ) -> Generator[StreamResult, None, None]:
        """``stream_infer`` through the local channel: a thread sends the requests as the
        iterable yields them, this generator reads the answers in completion order."""
        deadline = None if timeout is None else time.monotonic() + timeout
        stream = _LocalStream()

        def answer(index: int, request_id: str, region_outputs: dict[str, np.ndarray]
                   ) -> Callback:
            def done(reply: dict[str, Any] | None, error: ShmserveError | None) -> None:
                with stream.lock:
                    if reply is None:
                        stream.outstanding -= 1
                        stream.broken = error
                        return
                    if "more" not in reply:
                        stream.outstanding -= 1
                    result = stream_result(index, request_id, model, reply, region_outputs,
                                           ring)
                    if result is not None:
                        stream.results.append(result)
            return done

        def produce() -> None:
            try:
                for index, item in enumerate(requests):
                    if stream.stop:
                        return
                    if ring is not None:
                        while not ring.start(_STREAM_POLL_S):  # the previous one's turn
                            if stream.stop:
                                return
                        if stream.stop:
                            return
                    request_id, request = self._stream_request(
                        model, index, with_ring(item, parameters, ring), outputs, version,
                        parameters, deadline, channel.max_message)
                    request.message["s"] = True  # may have several replies (decoupled)
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
                    result = stream.results.popleft()
                    yield result
                    if ring is not None and result.ring_slot >= 0:
                        ring.release()  # the caller moved past it: its slot may be reused
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
                channel.cancel(request_id)  # a request still open: cancelled
            if ring is not None:
                ring.abandon()
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

    def _open_region(self, byte_size: int) -> HostRegion:
        channel = self._local()
        region = self._new_region(byte_size, channel)
        try:
            if isinstance(region, MemfdRegion):
                assert channel is not None
                message, recorded = self._record_memfd(region)
                try:
                    channel.call(with_passed_fd(channel.fd_door, message), self.timeout)
                except ShmserveError:
                    self._unrecord(region.name, recorded)
                    raise
            else:
                self.register_system_shared_memory(region.name, region.key, region.byte_size)
        except BaseException:
            region.close()
            raise
        self._regions.add(region)
        return region

    def _release(self, region: HostRegion, raise_errors: bool) -> None:
        """Unregister (best effort when the server is gone), then unlink and unmap."""
        if not self._leaving(region):
            return
        try:
            self.unregister_system_shared_memory(region.name, timeout=UNREGISTER_TIMEOUT)
        except ShmserveError as exc:
            if raise_errors and exc.code not in SERVER_GONE:
                raise
        finally:
            region.close()

    def shared_memory_status(self, name: str = "", timeout: float | None = UNSET
                             ) -> dict[str, RegionStatus]:
        """The server's system regions (all of them, or ``name``) by registration name.

        Through the local channel: the regions this client registered on it (the only ones
        it can use), by the names it gave them.
        """
        channel = self._local()
        if channel is None:
            return self._unary(rpc.shm_status(name), timeout)
        return status_from_reply(channel.call(status_message(name), self._deadline(timeout)))

    def register_system_shared_memory(self, name: str, key: str, byte_size: int,
                                      offset: int = 0, timeout: float | None = UNSET) -> None:
        """Register a segment created elsewhere (``shared_memory()`` does this for you)."""
        channel = self._local()
        if channel is None:
            self._unary(rpc.shm_register(name, key, offset, byte_size), timeout)
            return
        recorded = self._record(name, key, offset, byte_size)
        try:
            channel.call(register_message(name, key, offset, byte_size),
                         self._deadline(timeout))
        except ShmserveError:
            self._unrecord(name, recorded)
            raise

    def unregister_system_shared_memory(self, name: str = "",
                                        timeout: float | None = UNSET) -> None:
        """Unregister ``name``, or with no name every region this client registered."""
        if self.transport == "grpc":
            self._unary(rpc.shm_unregister(name), timeout)
            return
        assert self._link is not None
        channel = self._link.forget(name)
        if channel is not None:
            try:
                channel.call(unregister_message(name), self._deadline(timeout))
            except ShmserveError as exc:
                if not channel_gone(exc):
                    raise


class _RegionContext(RegionContext[Client]):
    """The context manager ``Client.shared_memory`` returns."""

    def __enter__(self) -> HostRegion:
        self._region = self._client._open_region(self._byte_size)
        return self._region

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        region = self._taken()
        if region is not None:
            self._client._release(region, raise_errors=exc_type is None)


_STREAM_POLL_S = 0.05


class _LocalStream(StreamState):
    """A local stream's state, shared by its sending thread and its reading generator."""

    def __init__(self) -> None:
        super().__init__()
        self.lock = threading.Lock()
        self.results: deque[StreamResult] = deque()
        self.stop = False

    def finished(self) -> bool:
        return not self.producing and self.outstanding == 0 and not self.results

    def ready(self) -> bool:
        return bool(self.results) or self.broken is not None or self.finished()
