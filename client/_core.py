"""The client core: what ``Client`` and ``AsyncClient`` share, with no I/O in it.

The two clients are thin shells over ``ClientCore``: each does only its I/O (blocking, or
awaited). The core owns the state (options, regions, the local-channel link, the gRPC stubs)
and the decisions: which transport a call takes, when a request that does not fit the local
channel may fall back to gRPC, how a stream request is planned, what to do with a region that
is opened or released, and which errors mean that the server is gone. Request planning and
answer decoding live beside it, as I/O-free as the core: ``_unary`` (the unary RPCs),
``_convert`` and ``_wire`` (ModelInferRequest bytes and answers, and which tensors travel as
region references) and ``_local`` (the local channel's messages, and the link that opens the
channel or falls back to gRPC).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TypeVar

import grpc

from shmserve.client._common import (
    DEFAULT_TIMEOUT,
    LOAD_TIMEOUT,
    UNARY_RPCS,
    RegionSet,
    StreamRequest,
    call_metadata,
    method_path,
    new_client_id,
    prepare,
    target_of,
)
from shmserve.client._common import channel_options as _channel_options
from shmserve.client._convert import InputValue, Outputs, ParameterValue
from shmserve.client._local import (
    Link,
    LocalPlan,
    LocalRequest,
    infer_message,
    plan_transport,
    stream_item,
    too_large,
)
from shmserve.client.errors import ShmserveError
from shmserve.client.memfd_region import FdChannel, MemfdRegion, new_region
from shmserve.client.regions import HostRegion

#: The default of every ``timeout=`` argument: the client's ``timeout`` (``load_timeout``).
UNSET: Any = object()
# Unregister failures that mean "the server is gone": the region is released locally anyway.
SERVER_GONE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
               grpc.StatusCode.CANCELLED)

LinkT = TypeVar("LinkT", bound="Link[Any]")
ChannelT = TypeVar("ChannelT")


@dataclass(slots=True)
class Stubs(Generic[ChannelT]):
    """A gRPC channel to ``target`` and its callables (infer and stream move bytes)."""

    target: str
    channel: ChannelT
    unary: dict[str, Any]
    infer: Any
    stream: Any


def stubs_on(target: str, owned: ChannelT, channel: Any) -> Stubs[ChannelT]:
    """The stubs of ``channel`` (a grpc or grpc.aio channel, perhaps intercepting ``owned``)."""
    unary = {
        name: channel.unary_unary(method_path(name),
                                  request_serializer=request.SerializeToString,
                                  response_deserializer=response.FromString,
                                  _registered_method=True)
        for name, (request, response) in UNARY_RPCS.items()}
    # Inference requests and answers travel as bytes (see _wire.py).
    return Stubs(target, owned, unary,
                 channel.unary_unary(method_path("ModelInfer"), _registered_method=True),
                 channel.stream_stream(method_path("ModelStreamInfer"), _registered_method=True))


def closed_error() -> ShmserveError:
    return ShmserveError(grpc.StatusCode.CANCELLED, "the client is closed")


class ClientCore(Generic[LinkT, ChannelT]):
    """State and decisions shared by ``Client`` and ``AsyncClient`` (see ``Client``).

    A shell sets ``_link_type`` and implements ``_connect_grpc``; making a gRPC channel does
    no I/O (grpc connects on the first call).
    """

    _link_type: ClassVar[type[Any]]

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
        plan: LocalPlan | None = plan_transport(url, transport, local_socket, server_uid)
        self._link: LinkT | None = self._link_type(plan) if plan is not None else None
        self._options = _channel_options(channel_options)
        self._credentials = credentials
        self._interceptors = interceptors
        self._stubs_lock = threading.Lock()  # the sync client swaps stubs from many threads
        self._grpc_stubs: Stubs[ChannelT] | None = None
        if plan is None:
            self._grpc_stubs = self._connect_grpc(target_of(url))
        elif plan.grpc_target is not None:
            self._grpc_stubs = self._connect_grpc(plan.grpc_target)
        self._regions = RegionSet()
        self._closed = False

    def _connect_grpc(self, target: str) -> Stubs[ChannelT]:
        raise NotImplementedError

    @property
    def transport(self) -> str:
        """``"shm"`` while this client uses the local channel, else ``"grpc"``."""
        return "shm" if self._link is not None and not self._link.fell_back else "grpc"

    @property
    def regions(self) -> list[HostRegion]:
        """This client's open regions."""
        return [r for r in self._regions if isinstance(r, HostRegion)]

    def _deadline(self, timeout: float | None, loads: bool = False) -> float | None:
        if timeout is not UNSET:
            return timeout
        return self.load_timeout if loads else self.timeout

    # --- gRPC stubs --------------------------------------------------------------------------
    def _swap_stubs(self, target: str) -> tuple[Stubs[ChannelT], Stubs[ChannelT] | None]:
        """The stubs for ``target`` (a local: url's server may move), and the replaced ones,
        which the shell closes."""
        with self._stubs_lock:
            stubs = self._grpc_stubs
            if stubs is not None and stubs.target == target:
                return stubs, None
            if self._closed:
                raise closed_error()
            self._grpc_stubs = self._connect_grpc(target)
            return self._grpc_stubs, stubs

    def _shut(self) -> Stubs[ChannelT] | None:
        """Mark the client closed and close its link; the stubs to close."""
        self._closed = True
        if self._link is not None:
            self._link.close()
        with self._stubs_lock:
            return self._grpc_stubs

    # --- inference ---------------------------------------------------------------------------
    def serialize_infer_request(self, model: str, inputs: Mapping[str, InputValue],
                                outputs: Outputs = None, version: str = "",
                                request_id: str = "",
                                parameters: Mapping[str, ParameterValue] | None = None
                                ) -> bytes:
        """The exact ModelInferRequest bytes ``infer`` would send (for inspection and tests)."""
        return prepare(model, inputs, outputs, version, request_id, parameters,
                       self._regions).payload

    @staticmethod
    def _past_channel(request: LocalRequest, limit: int) -> None:
        """A request the channel declined as too large goes through gRPC, unless it names
        regions registered on the channel: then it fails."""
        if request.references:
            raise too_large(request.payload_bytes, limit)

    def _stream_request(self, model: str, index: int,
                        item: StreamRequest | Mapping[str, InputValue], outputs: Outputs,
                        version: str, parameters: Mapping[str, ParameterValue] | None,
                        deadline: float | None, limit: int) -> tuple[str, LocalRequest]:
        """(request id, message) of one request of a stream through the local channel."""
        one = stream_item(item)
        request_id = one.request_id or f"{index}"
        request = infer_message(
            model, one.inputs, one.outputs if one.outputs is not None else outputs,
            version, request_id, one.parameters if one.parameters is not None else parameters,
            self._regions.locate if len(self._regions) else None,
            None if deadline is None else max(0.0, deadline - time.monotonic()))
        if not request.fits(limit):
            raise too_large(request.payload_bytes, limit, False)
        return request_id, request

    # --- regions -----------------------------------------------------------------------------
    def _new_region(self, byte_size: int, channel: FdChannel | None = None) -> HostRegion:
        """A new region for ``shared_memory``: a sealed memfd on a local ``channel`` that takes
        them (the shell registers it with ``_record_memfd``), else a POSIX segment; the shell
        registers it, then adds it to ``_regions``."""
        if self._closed:
            raise closed_error()
        return new_region(channel, byte_size)

    def _record_memfd(self, region: MemfdRegion) -> tuple[dict[str, Any], bool]:
        """The register message of a memfd region (its fd still to be passed, see
        ``with_passed_fd``), remembered like ``_record`` does."""
        assert self._link is not None
        message = region.register_message()
        return message, self._link.registrations.add_message(region.name, message)

    def _leaving(self, region: HostRegion) -> bool:
        """Start releasing ``region``: True when it is this client's and must be unregistered
        (it is unlinked already: nothing can leak in /dev/shm even if the unregister call is
        interrupted); False when it is not (or no longer) this client's: it is only closed."""
        if not self._regions.remove(region):
            region.close()
            return False
        region.unlink()
        return True

    def _record(self, name: str, key: str, offset: int, byte_size: int) -> bool:
        """Remember a region registered on the local channel (replayed after a reconnect);
        False when the name is taken (the server will refuse it)."""
        assert self._link is not None
        return self._link.registrations.add(name, key, offset, byte_size)

    def _unrecord(self, name: str, recorded: bool) -> None:
        """The registration ``_record`` remembered failed."""
        if recorded:
            assert self._link is not None
            self._link.registrations.discard(name)


ClientT = TypeVar("ClientT", bound="ClientCore[Any, Any]")


class RegionContext(Generic[ClientT]):
    """What the context manager ``shared_memory`` returns holds: the client, the size, and
    the region while the block runs."""

    def __init__(self, client: ClientT, byte_size: int) -> None:
        self._client = client
        self._byte_size = byte_size
        self._region: HostRegion | None = None

    def _taken(self) -> HostRegion | None:
        """The region, for the block's exit (once)."""
        region, self._region = self._region, None
        return region
