"""The local channel: requests from co-located clients through shared memory, no gRPC.

A client connects to the Unix socket; the server checks its credentials (SO_PEERCRED),
creates a memfd holding a request ring and a response ring (see protos/local_ring.py) and
passes the fd over the socket (SCM_RIGHTS). The segment has no name, so nothing can be
left in /dev/shm and no other process can open it. From then on the socket only carries
doorbell bytes and tells either side when the other is gone.

Requests are parsed into the same RequestItems as gRPC requests (no protobuf in between) and
handed to the core (daemon/core.py), which validates them into the same InferRequest and runs
them through the same scheduler, batching and statistics; each is answered through its
``_ChannelReply``. The messages themselves are written down in protos/local_messages.py.
Regions a channel registers live in their own namespace: a channel reaches only the regions
it registered, and they are unregistered when the channel closes.

Answers to requests a worker executed successfully skip the supervisor once the client has
announced (op "hello") that it reads the direct rings: the channel is attached to the worker
(its memfd and a duplicate of this end of the socket, passed once), the worker owns one of
the channel's direct response rings and rings the doorbell itself
(workers/direct_answers.py). Errors, and anything a worker could not deliver, are answered
from here. Each wake-up of a process costs tens of microseconds on a VM; this saves one per
request and the supervisor's work of copying outputs into the reply.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import fcntl
import itertools
import logging
import mmap
import os
import socket
import struct
import time
from collections import deque
from functools import partial
from typing import Any

import msgpack

from shmserve.daemon.core import Core
from shmserve.daemon.errors import ServeError, internal, invalid_argument, resource_exhausted
from shmserve.daemon.frontend.local_fds import FdDoor, register_memfd
from shmserve.daemon.infer_request import OutputIn, RequestItems, TensorIn
from shmserve.daemon.operations import LoadParameter, Operations
from shmserve.daemon.reply import DirectTarget, Reply
from shmserve.daemon.request import OutputTensor
from shmserve.protos import local_messages as messages
from shmserve.protos.local_ring import (
    DEFAULT_RING_BYTES,
    ChannelLayout,
    MessageTooLarge,
    Ring,
    RingFull,
    layout,
    ring_capacity,
)
from shmserve.protos.response_ring import REGION as RING_REGION

log = logging.getLogger("shmserve.local")
_channel_ids = itertools.count(1)
MAX_PENDING_RESPONSES = 4096
DIRECT_RINGS = 8               # workers that can answer one channel directly
DIRECT_RING_BYTES = 1 << 20
STALLED_CLIENT_SECS = 30.0


def _region_ref(prefix: str, entry: list[Any], what: str) -> tuple[str, int, int]:
    """A channel message's [region, offset, byte size] in the channel's own namespace."""
    region, offset, byte_size = entry
    if type(region) is not str or type(offset) is not int or type(byte_size) is not int:
        raise TypeError(f"{what}: bad region reference")
    return prefix + region, offset, byte_size


def _region_name(channel: int, name: str) -> str:
    return f"@{channel}:{name}"


class LocalChannel(asyncio.Protocol):
    """One connected client: its rings, its regions, its in-flight requests."""

    def __init__(self, frontend: LocalFrontend, channel_id: int, memfd: int, memory: mmap.mmap,
                 rings: ChannelLayout, peer: tuple[int, int, int],
                 fd_door: FdDoor | None = None) -> None:
        self._frontend = frontend
        self._fd_door = fd_door  # sealed memfd regions come through it (local_fds.py)
        self.channel_id = channel_id
        self.peer_pid, self.peer_uid, _ = peer
        self.owner = f"local:{channel_id}"
        self._memfd = memfd
        self._memory = memory
        self._requests = Ring.attach(memory, rings.request_base)
        self._responses = Ring.attach(memory, rings.response_base)
        self._free_direct = list(reversed(rings.direct_bases))
        self._direct_capacity = rings.direct_capacity
        self._direct: dict[DirectTarget, int] = {}  # attached worker -> its ring's base
        self._direct_ok = False  # until the client says it reads the direct rings
        self._transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()
        self._region_prefix = _region_name(channel_id, "")
        self._max_request_bytes = frontend.core.settings.max_request_bytes
        # Requests not answered yet, by the client's request id.
        self._inflight: dict[int, _ChannelReply] = {}
        self._pending: deque[bytes] = deque()
        self._stalled_since = 0.0
        self._retry: asyncio.TimerHandle | None = None
        self._ring_scheduled = False
        self.closed = False

    # --- asyncio protocol ---------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        """Doorbell: the client published requests (or drained responses)."""
        self._flush_pending()
        for raw in self._requests.get_all():
            try:
                message = msgpack.unpackb(raw, raw=False)
                self._handle(message)
            except Exception as exc:
                log.warning("channel %d: bad message: %s", self.channel_id, exc)
                self.close()
                return

    def connection_lost(self, exc: Exception | None) -> None:
        self._reclaim()

    # --- requests -----------------------------------------------------------------------
    def _handle(self, message: dict[str, Any]) -> None:
        op = message["op"]
        request_id = message["id"]
        registry = self._frontend.core.registry
        try:
            if op == messages.OP_INFER:
                self._infer(message)
                return
            if op == messages.OP_REGISTER and "fd" in message:  # a sealed memfd: local_fds.py
                register_memfd(self._frontend.core, self._fd_door, self._region_prefix,
                               message, self.owner)
            elif op == messages.OP_REGISTER:
                name, key = message["name"], message["key"]
                offset, byte_size = message.get("offset", 0), message["byte_size"]
                if not (isinstance(name, str) and isinstance(key, str)
                        and type(offset) is int and type(byte_size) is int):
                    raise invalid_argument("register: name and key must be strings, offset "
                                           "and byte_size integers")
                registry.register_system(_region_name(self.channel_id, name), key, offset,
                                         byte_size, self.owner, self.peer_uid)
            elif op == messages.OP_UNREGISTER:
                name = message.get("name", "")
                if name:
                    registry.unregister("system", _region_name(self.channel_id, name), self.owner)
                else:
                    registry.unregister("system", "", self.owner)
            elif op == messages.OP_STATUS:
                prefix = _region_name(self.channel_id, "")
                regions = registry.status("system", _region_name(self.channel_id, name)
                                          if (name := message.get("name", "")) else "",
                                          self.owner)
                self._reply(messages.status_reply(request_id, [
                    [r.name[len(prefix):], r.key, r.offset, r.byte_size] for r in regions
                    if r.owner == self.owner]))
                return
            elif op == messages.OP_PING:
                pass
            elif op == messages.OP_HELLO:  # the client reads the direct rings: workers may answer
                self._direct_ok = message.get("direct") is True
            elif op == messages.OP_CANCEL:
                self._cancel(message.get("target"))
            elif op == messages.OP_MODEL and self._frontend.model_control is not None:
                self._model_control(request_id, message)
                return
            else:
                raise ServeError.from_tuple(["INVALID_ARGUMENT", f"unknown operation '{op}'"])
            self._reply(messages.ok_reply(request_id))
        except ServeError as exc:
            self._reply_error(request_id, exc)

    def _model_control(self, request_id: int, message: dict[str, Any]) -> None:
        """A worker's pb_utils.load_model / unload_model / is_model_ready (BLS channels)."""
        try:
            call = messages.ModelControl.from_message(message)
        except (KeyError, TypeError, ValueError) as exc:
            raise invalid_argument(f"malformed model control call: {exc}") from None
        operations = self._frontend.model_control
        assert operations is not None
        if call.action == "ready":
            self._reply(messages.ready_reply(request_id,
                                             operations.model_ready(call.name, call.version)))
            return
        task = self._loop.create_task(self._run_model_control(request_id, call, operations))
        self._frontend.control_tasks.add(task)
        task.add_done_callback(self._frontend.control_tasks.discard)

    async def _run_model_control(self, request_id: int, call: messages.ModelControl,
                                 operations: Operations) -> None:
        try:
            if call.action == "load":
                parameters: list[LoadParameter] = [
                    (key, value, "bytes_param") for key, value in call.files.items()]
                if call.config:
                    parameters.append(("config", call.config, "string_param"))
                await operations.load_model(call.name, parameters)
            else:
                await operations.unload_model(call.name, call.dependents)
        except ServeError as exc:
            self._reply_error(request_id, exc)
        except Exception as exc:
            log.exception("model control call failed")
            self._reply_error(request_id, internal(f"{type(exc).__name__}: {exc}"))
        else:
            self._reply(messages.ok_reply(request_id))

    def _infer(self, message: dict[str, Any]) -> None:
        """Hand an infer request to the core; it is answered through its ``_ChannelReply``
        (no task and no future per request: this is the hot path)."""
        request_id = message["id"]
        # "t": the client's deadline in seconds; as with gRPC, a request still queued when it
        # passes is dropped.
        deadline = message.get("t")
        if deadline is not None and (type(deadline) not in (int, float) or deadline != deadline):
            self._reply_error(request_id, invalid_argument(
                f"malformed local-channel request: deadline {deadline!r}"))
            return
        reply = _ChannelReply(self, request_id)
        inflight = self._inflight
        inflight[request_id] = reply  # it may be answered before submit returns
        try:
            self._frontend.core.submit(message["model"], message.get("version", ""),
                                       partial(self._items, message), reply,
                                       message.get("s") is True)
        except ServeError as exc:
            inflight.pop(request_id, None)
            self._reply_error(request_id, exc)
            return
        except Exception as exc:
            inflight.pop(request_id, None)
            log.exception("local infer failed")
            self._reply(messages.error_reply(request_id, "INTERNAL",
                                             f"{type(exc).__name__}: {exc}"))
            return
        if deadline is not None and request_id in inflight:
            reply.timer = self._loop.call_later(deadline, self._expire, request_id)

    def _items(self, message: dict[str, Any]) -> RequestItems:
        try:
            inputs, outputs, parameters = self._parse(message)
            request_id = message.get("rid", "")
            if type(request_id) is not str:
                raise TypeError("rid must be a string")
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise invalid_argument(f"malformed local-channel request: {exc}") from None
        return RequestItems(inputs, outputs, parameters, request_id, self.owner)

    def direct_tag(self, worker: DirectTarget, request_id: int) -> list[int] | None:
        """The tag ``worker`` answers ``request_id`` under, attaching the channel to it first;
        None when it cannot (no direct ring left, channel closing)."""
        if worker not in self._direct:
            if not self._direct_ok or self.closed or self._transport is None \
                    or self._transport.is_closing():
                return None
            if not self._free_direct:
                for gone in [w for w in self._direct if not w.alive]:
                    self._free_direct.append(self._direct.pop(gone))
                if not self._free_direct:
                    return None
            base = self._free_direct[-1]
            sock = self._transport.get_extra_info("socket")
            if not worker.attach_channel(self.channel_id, self._memfd, sock.fileno(), base,
                                         self._direct_capacity):
                return None
            self._direct[worker] = self._free_direct.pop()
        return [self.channel_id, request_id]

    def _parse(self, message: dict[str, Any]
               ) -> tuple[list[TensorIn], list[OutputIn], dict[str, Any]]:
        prefix = self._region_prefix
        inputs: list[TensorIn] = []
        payload = 0
        for entry in message["in"]:
            name, datatype, shape = entry[0], entry[1], entry[2]
            if type(name) is not str or type(datatype) is not str or type(shape) is not list \
                    or not all(type(dim) is int for dim in shape):
                raise TypeError(f"input {name!r} needs a name, a datatype and integer dims")
            if entry[3] == "r":
                inputs.append(TensorIn(name, datatype, shape,
                                       shm=_region_ref(prefix, entry[4:7], f"input {name!r}")))
            else:
                data = entry[4]
                if type(data) is not bytes:
                    raise TypeError(f"input {name!r}: tensor data must be bytes")
                payload += len(data)
                inputs.append(TensorIn(name, datatype, shape, data))
        if payload > self._max_request_bytes:
            raise resource_exhausted(f"request tensor data of {payload} bytes is larger than "
                                     f"--max-request-bytes ({self._max_request_bytes})")
        outputs: list[OutputIn] = []
        for entry in message.get("out") or ():
            name = entry[0]
            if type(name) is not str:
                raise TypeError("output names must be strings")
            if len(entry) == 1:
                outputs.append(OutputIn(name))
                continue
            outputs.append(OutputIn(name, _region_ref(prefix, entry[1:4], f"output {name!r}")))
        parameters = message.get("p") or {}
        for key, value in parameters.items():
            if type(key) is not str:
                raise TypeError("parameter names must be strings")
            if not isinstance(value, bool | int | float | str):
                raise invalid_argument(f"unsupported parameter value {value!r} (use bool, int, "
                                       f"float or str)")
        ring = parameters.get(RING_REGION)
        if type(ring) is str:  # a response ring in one of this channel's regions
            parameters = {**parameters, RING_REGION: prefix + ring}
        return inputs, outputs, parameters

    def _cancel(self, request_id: object) -> None:
        """The client gave the request up: it gets no further reply."""
        reply = self._inflight.pop(request_id, None) if type(request_id) is int else None
        if reply is not None:
            if reply.timer is not None:
                reply.timer.cancel()
            if reply.request is not None:
                self._frontend.core.cancel(reply.request)

    def _expire(self, request_id: int) -> None:
        reply = self._inflight.pop(request_id, None)
        if reply is not None:
            if reply.request is not None:
                self._frontend.core.cancel(reply.request)  # dropped if still queued
            self._reply(messages.error_reply(request_id, "DEADLINE_EXCEEDED",
                                             "Deadline Exceeded"))

    def settle(self, reply: _ChannelReply) -> bool:
        """Forget an answered request; False if it was answered already (expired) or the
        channel closed."""
        if self._inflight.pop(reply.request_id, None) is None:
            return False
        if reply.timer is not None:
            reply.timer.cancel()
        return True

    def answer(self, reply: _ChannelReply, outputs: list[OutputTensor]) -> None:
        if self.settle(reply):
            assert reply.request is not None
            self._reply(messages.infer_reply(
                reply.request_id, str(reply.request.version),
                [[o.name, o.datatype, o.shape, o.data] for o in outputs]))

    def answer_error(self, reply: _ChannelReply, error: ServeError) -> None:
        if self.settle(reply):
            self._reply_error(reply.request_id, error)

    def answer_more(self, reply: _ChannelReply, outputs: list[OutputTensor] | None,
                    error: ServeError | None) -> None:
        """A response of a streamed request that more follow."""
        if reply.request_id not in self._inflight:
            return
        if error is not None:
            message = messages.error_reply(reply.request_id, error.code.name,
                                           error.message.replace(self._region_prefix, ""))
        else:
            assert reply.request is not None and outputs is not None
            message = messages.infer_reply(
                reply.request_id, str(reply.request.version),
                [[o.name, o.datatype, o.shape, o.data] for o in outputs])
        message["more"] = True
        self._reply(message)

    def answer_end(self, reply: _ChannelReply) -> None:
        """A streamed request's final flag alone."""
        if self.settle(reply):
            assert reply.request is not None
            empty = bool(reply.request.parameters.get("triton_enable_empty_final_response"))
            self._reply(messages.end_reply(reply.request_id, empty))

    def _reply_error(self, request_id: int, error: ServeError) -> None:
        self._reply(messages.error_reply(request_id, error.code.name,
                                         error.message.replace(self._region_prefix, "")))

    # --- responses ----------------------------------------------------------------------
    def _reply(self, message: dict[str, Any]) -> None:
        if self.closed:
            return
        data = msgpack.packb(message, use_bin_type=True)
        if self._pending:
            self._pending.append(data)
        else:
            try:
                self._responses.put(data)
            except RingFull:
                self._pending.append(data)
            except MessageTooLarge as exc:
                self._responses.put(msgpack.packb(messages.error_reply(
                    message["id"], "RESOURCE_EXHAUSTED",
                    f"response too large for the local channel ({exc}); request the outputs "
                    f"into a shared-memory region")))
        if self._pending:
            self._on_stall()
        self._ring()

    def _flush_pending(self) -> None:
        flushed = False
        while self._pending:
            try:
                self._responses.put(self._pending[0])
            except RingFull:
                break
            self._pending.popleft()
            self._stalled_since = 0.0
            flushed = True
        if flushed:  # also after a partial flush: the client drains only when rung
            self._ring()

    def _on_stall(self) -> None:
        """The client is not draining: hold responses, retry, give up after a while."""
        now = time.monotonic()
        if not self._stalled_since:
            self._stalled_since = now
        if len(self._pending) > MAX_PENDING_RESPONSES or \
                now - self._stalled_since > self._frontend.stall_secs:
            log.warning("channel %d (pid %d) stopped reading responses; closing it",
                        self.channel_id, self.peer_pid)
            self.close()
            return
        if self._retry is None:
            self._retry = self._loop.call_later(0.001, self._retry_flush)

    def _retry_flush(self) -> None:
        self._retry = None
        self._flush_pending()
        if self._pending and not self.closed:
            self._on_stall()

    def _ring(self) -> None:
        """One doorbell for every answer published in this loop iteration (a batch's
        answers wake the client once; measured faster than ringing the first at once)."""
        if not self._ring_scheduled:
            self._ring_scheduled = True
            self._loop.call_soon(self._ring_now)

    def _ring_now(self) -> None:
        self._ring_scheduled = False
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(messages.DOORBELL)

    # --- teardown -----------------------------------------------------------------------
    def close(self) -> None:
        self._reclaim()  # first: the client may act as soon as it sees the end
        if self._transport is not None:
            # Workers hold duplicates of this socket: shut it down so the client sees the end.
            sock = self._transport.get_extra_info("socket")
            if sock is not None and sock.fileno() != -1:
                with contextlib.suppress(OSError), \
                        socket.socket(fileno=os.dup(sock.fileno())) as duplicate:
                    duplicate.shutdown(socket.SHUT_RDWR)
            self._transport.close()

    def _reclaim(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._retry is not None:
            self._retry.cancel()
        inflight, self._inflight = self._inflight, {}
        for reply in inflight.values():
            if reply.timer is not None:
                reply.timer.cancel()
            if reply.request is not None:
                self._frontend.core.cancel(reply.request)
        self._frontend.core.registry.unregister("system", "", self.owner)
        if self._fd_door is not None:
            self._fd_door.close()
        for worker in self._direct:
            worker.detach_channel(self.channel_id)
        self._direct.clear()
        os.close(self._memfd)
        self._pending.clear()
        self._requests.release()
        self._responses.release()
        with contextlib.suppress(BufferError):
            self._memory.close()
        self._frontend.forget(self)
        log.info("local channel %d (pid %d) closed", self.channel_id, self.peer_pid)


class _ChannelReply(Reply):
    """A local-channel request's reply: answered into the channel's response ring, or by the
    worker itself through a direct ring."""

    __slots__ = ("channel", "request_id", "timer")
    direct = True

    def __init__(self, channel: LocalChannel, request_id: int) -> None:
        self.request = None
        self.channel = channel
        self.request_id = request_id
        self.timer: asyncio.TimerHandle | None = None  # the client's deadline

    # Each final answer drops the reply's side of the request<->reply cycle, so reference
    # counting frees the request once answered (tests/test_door_cycles.py).
    def send(self, response: list[OutputTensor], final: bool) -> None:
        if final:
            self.channel.answer(self, response)
            self.request = None
        else:
            self.channel.answer_more(self, response, None)

    def fail(self, error: ServeError) -> None:
        self.channel.answer_error(self, error)
        self.request = None

    def send_error(self, error: ServeError, final: bool) -> None:
        if final:
            self.channel.answer_error(self, error)
            self.request = None
        else:
            self.channel.answer_more(self, None, error)

    def end(self) -> None:
        self.channel.answer_end(self)
        self.request = None

    def direct_tag(self, worker: DirectTarget) -> list[int] | None:
        return self.channel.direct_tag(worker, self.request_id)

    def answered_directly(self) -> None:
        self.channel.settle(self)
        self.request = None


class LocalFrontend:
    """Accepts local clients on a Unix socket and gives each a pair of rings."""

    def __init__(self, core: Core, path: str, grpc_address: str,
                 ring_bytes: int = DEFAULT_RING_BYTES, stall_secs: float = STALLED_CLIENT_SECS,
                 direct_rings: int = DIRECT_RINGS,
                 direct_ring_bytes: int = DIRECT_RING_BYTES,
                 model_control: Operations | None = None) -> None:
        self.core = core
        # Set for workers' BLS channels: their model-control calls (pb_utils.load_model...).
        self.model_control = model_control
        self.control_tasks: set[asyncio.Task[None]] = set()
        self.path = path
        self._grpc_address = grpc_address
        self._ring_bytes = ring_bytes
        self._direct_rings = direct_rings
        self._direct_bytes = direct_ring_bytes
        self.stall_secs = stall_secs
        self._listener: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._channels: set[LocalChannel] = set()

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(self.path)
        listener.listen(128)
        listener.setblocking(False)
        self._listener = listener
        self._accepting = asyncio.get_running_loop().create_task(self._accept())
        log.info("Started local channel at %s", self.path)

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._listener is not None
        while True:
            connection, _ = await loop.sock_accept(self._listener)
            try:
                await self.open_channel(connection)
            except OSError as exc:
                log.warning("local handshake failed: %s", exc)
                connection.close()

    async def open_channel(self, connection: socket.socket) -> LocalChannel:
        """Give a connected client (or a worker's BLS socket, frontend/bls.py) its rings."""
        credentials = connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                            struct.calcsize("3i"))
        peer = struct.unpack("3i", credentials)
        rings = layout(self._ring_bytes, self._direct_rings, self._direct_bytes)
        fd = os.memfd_create("shmserve-local-channel", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        door = FdDoor()
        try:
            os.ftruncate(fd, rings.total)
            os.fchmod(fd, 0o600)
            # The client gets this fd: sealed, it cannot shrink the file under our mappings
            # (the next access would kill the daemon or a worker with SIGBUS).
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS,
                        fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
            memory = mmap.mmap(fd, rings.total)
            capacity = ring_capacity(self._ring_bytes)
            Ring.initialize(memory, rings.request_base, capacity)
            Ring.initialize(memory, rings.response_base, capacity)
            for base in rings.direct_bases:
                Ring.initialize(memory, base, ring_capacity(self._direct_bytes))
            channel_id = next(_channel_ids)
            hello = msgpack.packb(messages.server_hello(
                channel_id, self._ring_bytes, rings.total, self._direct_rings,
                self._direct_bytes, self._grpc_address, fd_door=True))
            connection.setblocking(True)
            connection.settimeout(5.0)
            connection.sendmsg([messages.HANDSHAKE_LENGTH.pack(len(hello)) + hello],
                               [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                 array.array("i", [fd, door.client_fd()]))])
            door.handed_over()
        except BaseException:
            os.close(fd)
            door.close()
            raise
        connection.setblocking(False)
        channel = self.make_channel(channel_id, fd, memory, rings, peer, door)
        self._channels.add(channel)
        await asyncio.get_running_loop().create_unix_connection(lambda: channel,
                                                                sock=connection)
        log.info("local channel %d opened for pid %d (uid %d)", channel_id, peer[0], peer[1])
        return channel

    def make_channel(self, channel_id: int, memfd: int, memory: mmap.mmap,
                     rings: ChannelLayout, peer: tuple[int, int, int],
                     fd_door: FdDoor | None) -> LocalChannel:
        """A new channel's endpoint (frontend_link.py makes privileged ones)."""
        return LocalChannel(self, channel_id, memfd, memory, rings, peer, fd_door)

    def forget(self, channel: LocalChannel) -> None:
        self._channels.discard(channel)

    async def stop(self) -> None:
        if self._accepting is not None:
            self._accepting.cancel()
        if self._listener is not None:
            self._listener.close()
        for channel in list(self._channels):
            channel.close()
        if self.path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
