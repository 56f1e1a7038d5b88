"""The local-channel transport of ``Client`` and ``AsyncClient`` (see docs/client.md).

With ``Client("local:///path/to.sock")`` or ``Client("host:port", transport="shm")`` inference
and region (un)registration travel through the shared-memory rings of a local channel
(client/local_channel.py); every other call goes through gRPC, at the address the server names
in the channel's handshake (or the url's). This module holds what both clients share: choosing
the socket, opening it (with the one-time fallback to gRPC), re-registering regions on a new
channel after a reconnect, and the msgpack request builders.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import grpc
import numpy as np

from shmserve.client._common import StreamRequest, StreamResult, target_of
from shmserve.client._convert import (
    InputValue,
    Locator,
    Outputs,
    ParameterValue,
    check_parameter,
    read_reply_outputs,
    walk_inputs,
    walk_outputs,
)
from shmserve.client.errors import ShmserveError, invalid_argument
from shmserve.client.local_channel import AsyncLocalChannel, LocalChannel, socket_path
from shmserve.client.memfd_region import with_passed_fd
from shmserve.client.response_ring import ResponseRing
from shmserve.protos import shmserve_service_pb2 as pb
from shmserve.protos.local_socket import client_socket_path

log = logging.getLogger("shmserve.client")

TRANSPORTS = ("grpc", "shm")
#: How long opening a local channel (connect + handshake) may take.
CONNECT_TIMEOUT = 5.0


def default_socket_path(port: int) -> str:
    """Where the server listening on gRPC ``port`` has its socket unless told otherwise."""
    return client_socket_path(port)


@dataclass(frozen=True, slots=True)
class LocalPlan:
    """How a client reaches the local channel."""

    path: str               # the socket ("" = find it from host and port when first needed)
    grpc_target: str | None  # the gRPC target when the url names one (None for local: urls)
    host: str = ""
    port: int | None = None  # the gRPC port the channel's server must report
    reason: str = ""         # why there is no socket to try (path and host empty)
    server_uid: int | None = None  # a uid trusted to serve the socket besides ours and root


def plan_transport(url: str, transport: str | None, local_socket: str | None,
                   server_uid: int | None = None) -> LocalPlan | None:
    """The local-channel plan for a url, or None for plain gRPC."""
    is_local = url.startswith("local:")
    if transport is None:
        transport = "shm" if is_local else "grpc"
    if transport not in TRANSPORTS:
        raise invalid_argument(f"unknown transport '{transport}': use 'grpc' or 'shm'")
    if is_local:
        if transport != "shm":
            raise invalid_argument(f"url '{url}' names a local channel: it needs transport "
                                   f"'shm'")
        path = local_socket or socket_path(url)
        if not path:
            raise invalid_argument(f"url '{url}' names no socket path (local:///path/to.sock)")
        return LocalPlan(path, None, server_uid=server_uid)
    if transport == "grpc":
        if local_socket:
            raise invalid_argument("local_socket needs transport='shm'")
        return None
    target = target_of(url)
    host, port = _split_target(target)
    if local_socket:
        return LocalPlan(local_socket, target, host, port, server_uid=server_uid)
    if port is None:
        return LocalPlan("", target, reason=f"the gRPC url '{url}' names no TCP port to find "
                                            f"the server's socket by (pass local_socket=)")
    return LocalPlan("", target, host, port, server_uid=server_uid)


def _split_target(target: str) -> tuple[str, int | None]:
    if target.startswith("unix:"):
        return "", None
    host, _, port = target.rpartition(":")
    try:
        return host.strip("[]"), int(port)
    except ValueError:
        return target, None


def is_this_host(host: str) -> bool:
    """Whether ``host`` names this machine (loopback, or one of its own addresses)."""
    if host in ("", "localhost"):
        return True
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError:
        return False
    for family, _, _, _, address in infos:
        try:
            if ipaddress.ip_address(address[0]).is_loopback:
                return True
        except ValueError:
            continue
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as probe:
                probe.bind((address[0], 0))  # only an address of this host can be bound
            return True
        except OSError:
            continue
    return False


def _resolve_path(plan: LocalPlan) -> tuple[str, str]:
    """(socket path, "") or ("", why there is none)."""
    if plan.path:
        return plan.path, ""
    if plan.reason:
        return "", plan.reason
    if not is_this_host(plan.host):
        return "", f"{plan.host} is not this host"
    assert plan.port is not None
    return default_socket_path(plan.port), ""


def _check_hello(plan: LocalPlan, path: str, hello: Mapping[str, Any]) -> str:
    """Why the channel at ``path`` is not the server the url names ("" when it is)."""
    if plan.port is None:
        return ""
    address = str(hello.get("grpc", ""))
    _, port = _split_target(address)
    if port != plan.port:
        return f"the socket {path} belongs to the server at {address}, not port {plan.port}"
    return ""


def _unavailable(path: str, exc: BaseException) -> ShmserveError:
    if isinstance(exc, ShmserveError):
        return exc
    detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return ShmserveError(grpc.StatusCode.UNAVAILABLE,
                         f"cannot open the local channel at {path}: {detail}")


def _log_fallback(path: str, reason: str, target: str) -> None:
    where = f" at {path}" if path else ""
    log.warning("local channel%s unavailable (%s); using gRPC at %s",
                where, reason, target)


# --- registrations -----------------------------------------------------------------------------
class Registrations:
    """The regions registered on the channel: replayed on a new channel after a reconnect."""

    def __init__(self) -> None:
        self._items: dict[str, dict[str, Any]] = {}  # name -> its register message

    def add(self, name: str, key: str, offset: int, byte_size: int) -> bool:
        """Record ``name``; False when it is recorded already (the server will refuse it)."""
        return self.add_message(name, register_message(name, key, offset, byte_size))

    def add_message(self, name: str, message: dict[str, Any]) -> bool:
        """``add`` for a prepared register message (a memfd region's, see memfd_region.py)."""
        if name in self._items:
            return False
        self._items[name] = message
        return True

    def discard(self, name: str) -> None:
        if name:
            self._items.pop(name, None)
        else:
            self._items.clear()

    def messages(self) -> list[dict[str, Any]]:
        return [dict(message) for message in list(self._items.values())]


def register_message(name: str, key: str, offset: int, byte_size: int) -> dict[str, Any]:
    return {"op": "register", "name": name, "key": key, "offset": offset,
            "byte_size": byte_size}


def unregister_message(name: str) -> dict[str, Any]:
    return {"op": "unregister", "name": name}


def status_message(name: str) -> dict[str, Any]:
    return {"op": "status", "name": name}


def status_from_reply(reply: Mapping[str, Any]) -> dict[str, Any]:
    """The channel's regions, under the names the client gave them (gRPC never shows them)."""
    region_status = pb.SystemSharedMemoryStatusResponse.RegionStatus
    return {name: region_status(name=name, key=key, offset=offset, byte_size=byte_size)
            for name, key, offset, byte_size in reply["regions"]}


# --- the links: one base for the decisions, a sync and an asyncio way to do the I/O --------
AnyChannel = TypeVar("AnyChannel", LocalChannel, AsyncLocalChannel)


class Link(Generic[AnyChannel]):
    """What the sync and the asyncio link share: state, and what to make of a connection
    attempt (use the channel, fall back to gRPC once, or raise)."""

    def __init__(self, plan: LocalPlan) -> None:
        self.plan = plan
        self.registrations = Registrations()
        self._channel: AnyChannel | None = None
        self._opened_once = False
        self.fell_back = False
        self.path = ""
        self._grpc_target = plan.grpc_target
        self._closed = False

    @property
    def known_target(self) -> str | None:
        """The gRPC address as known now (a local: url learns it from the handshake)."""
        return self._grpc_target

    def current(self) -> AnyChannel | None:
        """The open channel, without opening one."""
        channel = self._channel
        return channel if channel is not None and not channel.closed else None

    def forget(self, name: str) -> AnyChannel | None:
        """Stop registering ``name`` (with no name: every region) again after a reconnect;
        the open channel to unregister it on, if any (a closed one took its regions along)."""
        self.registrations.discard(name)
        return self.current()

    def _reusable(self) -> AnyChannel | None:
        """Under the link's lock: the open channel, or None after closing a dead one.
        Raises CANCELLED once the client is closed."""
        channel = self._channel
        if channel is not None and not channel.closed:
            return channel
        if self._closed:
            raise ShmserveError(grpc.StatusCode.CANCELLED, "the client is closed")
        if channel is not None:
            channel.close()
            self._channel = None
        return None

    def _known_path(self) -> tuple[str, str] | None:
        """(socket path, "") or ("", why there is none) when known without resolving a host
        name; None when ``_resolve_path`` must find it."""
        if self.path or self.plan.path:
            return self.path or self.plan.path, ""
        return ("", self.plan.reason) if self.plan.reason else None

    def _connect_failed(self, path: str, exc: OSError | ShmserveError) -> str:
        """Why the channel could not be opened (for the fallback), or raise UNAVAILABLE when
        there is nothing to fall back to or the channel worked before."""
        if self._opened_once or self._grpc_target is None:
            raise _unavailable(path, exc) from None
        return exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)

    def _accept(self, path: str, channel: AnyChannel | None, reason: str
                ) -> list[dict[str, Any]] | None:
        """After a connection attempt (``channel``, or None and why not): the registrations
        to replay on the channel before the link uses it, or None when the client falls back
        to gRPC (logged once; a refused channel is closed). Raises UNAVAILABLE when a channel
        that worked before is refused."""
        if channel is not None:
            reason = self._refused(path, channel)
            if not reason:
                return self.registrations.messages() if self._adopt(path, channel) else []
        assert self._grpc_target is not None
        _log_fallback(path, reason, self._grpc_target)
        self.fell_back = True
        return None

    def _refused(self, path: str, channel: AnyChannel) -> str:
        """Why the server's hello is not acceptable ('' when it is; the channel is closed
        otherwise)."""
        reason = _check_hello(self.plan, path, channel.hello)
        if reason:
            channel.close()
            if self._opened_once:
                raise ShmserveError(grpc.StatusCode.UNAVAILABLE, reason)
        return reason

    def _adopt(self, path: str, channel: AnyChannel) -> bool:
        """Follow ``channel``'s server (its socket, and for a local: url its gRPC address);
        True when regions must be registered again on it (it is not the first channel)."""
        self.path = path
        if self.plan.grpc_target is None:  # a local: url: follow the server's address
            self._grpc_target = channel.grpc_address
        reopened = self._opened_once
        self._opened_once = True
        return reopened

    def _replay_failed(self, message: dict[str, Any], exc: ShmserveError) -> None:
        log.warning("region '%s' could not be registered again on the new local channel: %s",
                    message["name"], exc)
        self.registrations.discard(message["name"])

    def _detach(self) -> AnyChannel | None:
        """Close the link for good; the channel to close."""
        self._closed = True
        channel, self._channel = self._channel, None
        return channel

    def close(self) -> None:
        channel = self._detach()
        if channel is not None:
            channel.close()


class LocalLink(Link[LocalChannel]):
    """The sync client's local channel: opened on first use, reopened after it closes."""

    def __init__(self, plan: LocalPlan) -> None:
        super().__init__(plan)
        self._lock = threading.Lock()

    def channel(self) -> LocalChannel | None:
        """The open channel (opening it if needed), or None once the client fell back to gRPC.

        Raises UNAVAILABLE when the channel cannot be opened and there is no gRPC to fall
        back to (or the channel worked before: then the server is down or restarting).
        """
        channel = self.current()
        if channel is not None or self.fell_back:
            return channel
        with self._lock:
            if self.fell_back:
                return None
            return self._reusable() or self._open()

    def _open(self) -> LocalChannel | None:
        path, reason = self._known_path() or _resolve_path(self.plan)
        channel = None
        if path:
            try:
                channel = LocalChannel(path, CONNECT_TIMEOUT, self.plan.server_uid)
            except (OSError, ShmserveError) as exc:
                reason = self._connect_failed(path, exc)
        replay = self._accept(path, channel, reason)
        if replay is None or channel is None:
            return None
        for message in replay:
            try:
                channel.call(with_passed_fd(channel.fd_door, message), CONNECT_TIMEOUT)
            except ShmserveError as exc:
                self._replay_failed(message, exc)
        self._channel = channel
        return channel

    def grpc_target(self) -> str:
        """The gRPC address: the url's, or the one the server names in the handshake."""
        if self._grpc_target is None:
            self.channel()
        assert self._grpc_target is not None
        return self._grpc_target

    def _detach(self) -> LocalChannel | None:
        with self._lock:
            return super()._detach()


class AsyncLocalLink(Link[AsyncLocalChannel]):
    """``LocalLink`` for ``AsyncClient``."""

    def __init__(self, plan: LocalPlan) -> None:
        super().__init__(plan)
        self._lock: asyncio.Lock | None = None

    async def channel(self) -> AsyncLocalChannel | None:
        channel = self.current()
        if channel is not None or self.fell_back:
            return channel
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self.fell_back:
                return None
            return self._reusable() or await self._open()

    async def _open(self) -> AsyncLocalChannel | None:
        known = self._known_path()
        if known is None:  # resolving a host name may block: not on the loop
            known = await asyncio.get_running_loop().run_in_executor(None, _resolve_path,
                                                                     self.plan)
        path, reason = known
        channel = None
        if path:
            try:
                channel = await AsyncLocalChannel.connect(path, CONNECT_TIMEOUT,
                                                              self.plan.server_uid)
            except (OSError, ShmserveError) as exc:
                reason = self._connect_failed(path, exc)
        replay = self._accept(path, channel, reason)
        if replay is None or channel is None:
            return None
        for message in replay:
            try:
                await channel.call(with_passed_fd(channel.fd_door, message), CONNECT_TIMEOUT)
            except ShmserveError as exc:
                self._replay_failed(message, exc)
        self._channel = channel
        return channel

    async def grpc_target(self) -> str:
        if self._grpc_target is None:
            await self.channel()
        assert self._grpc_target is not None
        return self._grpc_target


# --- messages -----------------------------------------------------------------------------------
@dataclass(slots=True)
class LocalRequest:
    """An infer message for the channel and what is needed to read its answer."""

    message: dict[str, Any]
    region_outputs: dict[str, np.ndarray]
    payload_bytes: int       # tensor bytes carried in the message itself
    references: bool         # whether it names regions (then it cannot go through gRPC)

    def fits(self, limit: int) -> bool:
        """False when the tensor bytes alone exceed the limit (no need to pack it to know)."""
        return self.payload_bytes <= limit


def infer_message(model: str, inputs: Mapping[str, InputValue], outputs: Outputs, version: str,
                  request_id: str, parameters: Mapping[str, ParameterValue] | None,
                  locate: Locator | None, timeout: float | None) -> LocalRequest:
    """The channel's infer message; the same client-side checks, in the same order, as
    ``prepare_infer`` (so both transports refuse the same requests with the same errors)."""
    if type(inputs) is not dict and not isinstance(inputs, Mapping):
        raise invalid_argument("inputs must be a mapping of input name to array")
    sent: list[list[Any]] = []
    payload = 0
    references = False
    for name, datatype, shape, ref, data in walk_inputs(inputs, locate):
        if ref is not None:
            sent.append([name, datatype, shape, "r", ref[0], ref[1], ref[2]])
            references = True
        else:
            assert data is not None
            sent.append([name, datatype, shape, "b", data])
            payload += data.nbytes if isinstance(data, memoryview) else len(data)
    entries, region_outputs = walk_outputs(outputs, locate)
    wanted: list[list[Any]] = []
    for name, ref in entries:
        if ref is None:
            wanted.append([name])
        else:
            wanted.append([name, ref[0], ref[1], ref[2]])
            references = True
    params = {key: check_parameter(value) for key, value in parameters.items()} \
        if parameters else {}
    message: dict[str, Any] = {"op": "infer", "model": model, "version": version,
                               "rid": request_id, "in": sent, "out": wanted, "p": params}
    if timeout is not None:
        message["t"] = timeout
    return LocalRequest(message, region_outputs, payload, references)


def too_large(size: int, limit: int, names_regions: bool = True) -> ShmserveError:
    """A request the channel cannot carry and gRPC cannot either (it names channel regions,
    or it is part of a stream on the channel)."""
    why = " and names shared-memory regions registered on it" if names_regions else ""
    return ShmserveError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        f"request of about {size} bytes is too large for the local channel (limit {limit} "
        f"bytes){why}: put its large inputs in a region (client.shared_memory)")


def stream_item(item: StreamRequest | Mapping[str, InputValue]) -> StreamRequest:
    return item if isinstance(item, StreamRequest) else StreamRequest(item)


def stream_error(reply_err: list[str]) -> ShmserveError:
    """A refused stream request: gRPC streams carry no code, only the text (UNKNOWN)."""
    return ShmserveError(grpc.StatusCode.UNKNOWN, reply_err[1])


def channel_gone(error: ShmserveError) -> bool:
    """Whether a call failed because the channel closed (and took its regions with it)."""
    return error.code == grpc.StatusCode.UNAVAILABLE


def stream_result(index: int, request_id: str, model: str, reply: dict[str, Any],
                  region_outputs: dict[str, np.ndarray],
                  ring: ResponseRing | None = None) -> StreamResult | None:
    """The answer of one stream request sent through the channel (None: a decoupled
    request's final flag alone, not to be shown). ``ring``: the stream's response ring."""
    final = not reply.get("more")
    try:
        if "end" in reply:
            return StreamResult(index, request_id, model, "") if reply.get("empty") else None
        if "err" in reply:
            result = StreamResult(index, request_id, model, "", final=final)
            result.error = stream_error(reply["err"])
            return result
        result = StreamResult(index, request_id, model, reply["model_version"], final=final)
        try:
            outputs = reply["out"]
            if ring is not None:
                placed = [(name, datatype, shape) for name, datatype, shape, data in outputs
                          if data is None and name not in region_outputs]
                if placed:
                    result.ring_slot, arrays = ring.place(placed)
                    region_outputs = {**region_outputs, **arrays}
            result.outputs = read_reply_outputs(outputs, region_outputs)
        except ShmserveError as exc:
            result.error = exc
        return result
    finally:
        if ring is not None and final:
            ring.finished()


def with_ring(item: StreamRequest | Mapping[str, InputValue],
              parameters: Mapping[str, ParameterValue] | None, ring: ResponseRing | None
              ) -> StreamRequest | Mapping[str, InputValue]:
    """A stream's request with its response ring's parameters added."""
    if ring is None:
        return item
    request = stream_item(item)
    own = request.parameters if request.parameters is not None else parameters
    return StreamRequest(request.inputs, request.outputs, request.request_id,
                         {**(own or {}), **ring.parameters()})


class StreamState:
    """What a stream through the channel tracks, in both clients: the channel's ids of its
    requests (forgotten when the stream ends), how many answers are due, whether requests
    are still being sent, and what ended it: the channel failing (``broken``) or a request
    that could not be sent (``failure``, raised once the answers are in)."""

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.outstanding = 0
        self.producing = True
        self.broken: BaseException | None = None
        self.failure: BaseException | None = None
