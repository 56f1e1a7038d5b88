"""The client end of the local channel (see shmserve.daemon.frontend.local).

``LocalChannel`` connects to the server's Unix socket, receives the memfd holding the two rings,
and exchanges msgpack messages through them; the socket carries only doorbell bytes. It is
thread-safe: there is no reader thread, a waiting caller reads for everyone (leader/follower).
``AsyncLocalChannel`` does the same on an asyncio loop without threads.

Both raise ``MessageTooLarge`` (before sending anything) for a message the ring cannot hold,
wait while the request ring is full (backpressure: nothing is dropped), and fail every waiting
call with ``UNAVAILABLE`` when the server closes the socket (it stopped, restarted, or closed
the channel); a closed channel stays closed, the owner opens a new one.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import errno
import itertools
import mmap
import os
import select
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import grpc
import msgpack

from shmserve.client.errors import ShmserveError
from shmserve.client.memfd_region import FdDoor
from shmserve.protos.local_messages import DOORBELL, HANDSHAKE_LENGTH, OP_CANCEL, client_hello
from shmserve.protos.local_ring import MessageTooLarge, Ring, RingFull, layout
from shmserve.protos.local_socket import check_server

__all__ = ["AsyncLocalChannel", "LocalChannel", "MessageTooLarge", "socket_path"]

_LENGTH = HANDSHAKE_LENGTH
_BACKPRESSURE_SLEEP = 0.0002
_LIVENESS_CHECK_S = 0.05
_DOORBELL = DOORBELL
_SEND_FLAGS = int(socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)  # int: IntFlag math costs per call

#: Called once per submitted message with (reply, None), or (None, error) when the channel
#: failed before the reply came. A reply the server refused carries "err": [code, message].
Callback = Callable[[dict[str, Any] | None, ShmserveError | None], None]


def _refusal(err: list[str]) -> ShmserveError:
    """The error of a refused request: a reply's "err" (gRPC code name, the server's text)."""
    return ShmserveError(getattr(grpc.StatusCode, err[0], grpc.StatusCode.UNKNOWN), err[1])


def _gone(message: str) -> ShmserveError:
    return ShmserveError(grpc.StatusCode.UNAVAILABLE, message)


def deadline_exceeded() -> ShmserveError:
    return ShmserveError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")


_CLOSED_BY_SERVER = "the server closed the local channel (it stopped or restarted)"


class _Replies:
    """Where replies arrive: the channel's response ring and the rings workers answer into
    directly (each has one producer; a doorbell means "look at all of them")."""

    def __init__(self, memory: mmap.mmap, bases: list[int]) -> None:
        self.rings = [Ring.attach(memory, base) for base in bases]
        # Each ring starts with its head and tail (u64): compared here without a call per ring.
        self._words = memoryview(memory).cast("Q")
        self._heads = [(base // 8, ring) for base, ring in zip(bases, self.rings, strict=True)]

    def get_all(self) -> list[bytes]:
        replies: list[bytes] = []
        words = self._words
        for head, ring in self._heads:
            if words[head] != words[head + 1]:
                replies += ring.get_all()
        return replies

    def release(self) -> None:
        self._words.release()
        for ring in self.rings:
            ring.release()


def _handshake(sock: socket.socket, announce: bool = True, kept: list[int] | None = None
               ) -> tuple[dict[str, Any], mmap.mmap, Ring, _Replies]:
    """Receive the server's hello and the channel's memory; then (``announce``) tell the
    server this client reads the direct rings, so that its workers may answer into them.
    The announcement's reply (id 0) is ignored like any reply nobody waits for.
    ``kept`` receives the fds after the first (the fd door), which are closed otherwise."""
    fds = array.array("i")
    data, ancillary, _, _ = sock.recvmsg(65536, socket.CMSG_SPACE(2 * fds.itemsize))
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
    try:
        if not fds:
            raise _gone("local channel handshake carried no shared memory")
        while len(data) < 4 or len(data) < 4 + _LENGTH.unpack_from(data)[0]:
            more = sock.recv(65536)
            if not more:
                raise _gone("local channel closed during the handshake")
            data += more
        (length,) = _LENGTH.unpack_from(data)
        hello = msgpack.unpackb(data[4:4 + length], raw=False)
        rings = layout(hello["ring_bytes"], *hello.get("direct", (0, 0)))
        memory = mmap.mmap(fds[0], rings.total)
    finally:
        for index, fd in enumerate(fds):
            if index and kept is not None:
                kept.append(fd)
            else:
                os.close(fd)
    requests = Ring.attach(memory, rings.request_base)
    if announce and rings.direct_bases:
        requests.put(msgpack.packb(client_hello()))
        sock.send(_DOORBELL)
    return hello, memory, requests, _Replies(memory, [rings.response_base, *rings.direct_bases])


def fd_door(hello: dict[str, Any], kept: list[int]) -> FdDoor | None:
    """The channel's fd door, when the server passed one (hello "fd_door"); fds the client
    does not know what to do with are closed."""
    door = FdDoor(kept.pop(0)) if kept and hello.get("fd_door") == 1 else None
    for fd in kept:
        os.close(fd)
    kept.clear()
    return door


def socket_path(url: str) -> str:
    """``local:///run/shmserve.sock`` or ``local:/run/shmserve.sock`` -> the socket path."""
    path = url[len("local:"):]
    while path.startswith("//"):
        path = path[1:]
    return path


class _Slot:
    """The outcome of one call; the class attributes are the "not yet" state (no __init__
    to run: this is made for every call)."""

    done = False
    reply: dict[str, Any] | None = None
    error: ShmserveError | None = None

    def __call__(self, reply: dict[str, Any] | None, error: ShmserveError | None) -> None:
        self.reply, self.error = reply, error
        self.done = True

    def ready(self) -> bool:
        return self.done


class _Channel:
    """What ``LocalChannel`` and ``AsyncLocalChannel`` answer alike: the server's hello, and
    whether the channel is closed."""

    hello: dict[str, Any]
    #: Where memfd regions' fds go to the server (None: it takes none).
    fd_door: FdDoor | None
    _closed: bool
    _waiting: dict[int, Any]

    @property
    def grpc_address(self) -> str:
        return str(self.hello["grpc"])

    @property
    def channel_id(self) -> int:
        return int(self.hello["channel"])

    @property
    def closed(self) -> bool:
        return self._closed

    def forget(self, request_id: int) -> None:
        """Drop a request whose answer nobody waits for any more."""
        self._waiting.pop(request_id, None)

    def cancel(self, request_id: int) -> None:
        """Drop a request and tell the server (a stream closed early): it cancels it for
        its model. Best effort: a closed or full channel is left alone."""
        if self._waiting.pop(request_id, None) is None or self._closed:
            return
        self._send_cancel({"op": OP_CANCEL, "target": request_id})

    def _send_cancel(self, message: dict[str, Any]) -> None:
        raise NotImplementedError


class LocalChannel(_Channel):
    """Thread-safe. No reader thread: a waiting caller becomes the reader (leader/follower),
    so a lone caller reads its own reply without any thread switch."""

    def __init__(self, path: str, connect_timeout: float = 5.0,
                 server_uid: int | None = None) -> None:
        self.path = path
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(connect_timeout)
        kept: list[int] = []
        try:
            sock.connect(path)
            check_server(sock, path, server_uid)
            self.hello, self._memory, self._requests, self._responses = _handshake(sock,
                                                                                   kept=kept)
        except BaseException:
            sock.close()
            for fd in kept:
                os.close(fd)
            raise
        self._setup(sock, kept)

    @classmethod
    def over(cls, sock: socket.socket) -> LocalChannel:
        """A channel on a socket already connected to the server (a worker's BLS socket,
        daemon/frontend/bls.py): the server's hello is read from it."""
        channel = cls.__new__(cls)
        channel.path = ""
        kept: list[int] = []
        try:
            channel.hello, channel._memory, channel._requests, channel._responses = \
                _handshake(sock, kept=kept)
        except BaseException:
            for fd in kept:
                os.close(fd)
            raise
        channel._setup(sock, kept)
        return channel

    def _setup(self, sock: socket.socket, kept: list[int]) -> None:
        self.fd_door = fd_door(self.hello, kept)
        sock.setblocking(False)
        self._sock = sock
        self._poll = select.poll()
        self._poll.register(sock.fileno(), select.POLLIN)
        self._doorbells = bytearray(4096)  # read under the reader role only
        #: The largest message (bytes, packed) the request ring takes.
        self.max_message = self._requests.capacity // 2 - 8
        self._ids = itertools.count(1)
        self._send_lock = threading.Lock()
        self._packer = msgpack.Packer(use_bin_type=True)  # used under _send_lock only
        self._lock = threading.Lock()  # guards _reading and _followers
        self._cond = threading.Condition(self._lock)
        self._reading = False
        self._followers = 0  # callers blocked in self._cond.wait
        self._waiting: dict[int, Callback] = {}
        self._closed = False

    # --- sending --------------------------------------------------------------------------
    def submit(self, message: dict[str, Any], callback: Callback,
               deadline: float | None = None) -> int:
        """Publish ``message`` (its "id" is set here); ``callback`` gets the reply.

        Raises MessageTooLarge (nothing sent), UNAVAILABLE when the channel is closed, and
        DEADLINE_EXCEEDED when the ring stays full past ``deadline`` (time.monotonic()).
        """
        request_id = next(self._ids)
        message["id"] = request_id
        with self._send_lock:
            data = self._packer.pack(message)
            if self._closed:
                raise _gone("local channel to the server is closed")
            self._waiting[request_id] = callback
            try:
                try:
                    self._requests.put(data)
                except RingFull:
                    self._put_when_room(data, deadline)
            except BaseException:
                self._waiting.pop(request_id, None)
                raise
            try:
                self._sock.send(_DOORBELL, _SEND_FLAGS)
            except BlockingIOError:
                pass  # doorbells are queued already: the server will drain the ring
            except OSError as exc:
                self._fail_all(f"local channel to the server failed: {exc}")
                self.notify()
        return request_id

    def _send_cancel(self, message: dict[str, Any]) -> None:
        with contextlib.suppress(Exception):  # never waits for room: best effort
            self.submit(message, lambda reply, error: None, deadline=time.monotonic())

    def _put_when_room(self, data: bytes, deadline: float | None) -> None:
        """Backpressure: wait while the request ring is full (nothing is dropped)."""
        next_check = 0.0
        while True:
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                raise deadline_exceeded()
            if now >= next_check:
                next_check = now + _LIVENESS_CHECK_S
                if self._closed or self._peer_gone():
                    self._fail_all(_CLOSED_BY_SERVER)
                    self.notify()
                    raise _gone(_CLOSED_BY_SERVER)
            time.sleep(_BACKPRESSURE_SLEEP)
            try:
                self._requests.put(data)
                return
            except RingFull:
                pass

    def _peer_gone(self) -> bool:
        try:
            return self._sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True

    # --- waiting --------------------------------------------------------------------------
    def wait(self, ready: Callable[[], bool], deadline: float | None = None) -> bool:
        """Read replies until ``ready()`` (True), the channel closes, or ``deadline`` (False).

        ``ready`` is evaluated under the channel's lock after every batch of replies.
        """
        with self._lock:
            while True:
                if ready():
                    return True
                if self._closed:
                    return bool(ready())
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                if self._reading:
                    self._followers += 1
                    try:
                        self._cond.wait(remaining)
                    finally:
                        self._followers -= 1
                    continue
                self._reading = True
                self._lock.release()
                try:
                    self._read_once(remaining)
                finally:
                    self._lock.acquire()
                    self._reading = False
                    if self._followers:
                        self._cond.notify_all()

    def call(self, message: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        """Send one message and wait for its reply; raises ShmserveError."""
        deadline = None if timeout is None else time.monotonic() + timeout
        slot = _Slot()
        request_id = self.submit(message, slot, deadline)
        if not self.wait(slot.ready, deadline):
            self.forget(request_id)
            if self._closed:
                raise _gone(_CLOSED_BY_SERVER)
            raise deadline_exceeded()
        if slot.error is not None:
            raise slot.error
        reply = slot.reply
        assert reply is not None
        if "err" in reply:
            raise _refusal(reply["err"])
        return reply

    def _read_once(self, timeout: float | None) -> None:
        """Wait for a doorbell (up to ``timeout``), then deliver every published reply."""
        try:
            if not self._poll.poll(None if timeout is None else max(0, int(timeout * 1000) + 1)):
                return
            received = self._sock.recv_into(self._doorbells)
        except BlockingIOError:
            return
        except InterruptedError:
            return
        except OSError as exc:
            self._fail_all(f"local channel to the server failed: {exc}")
            return
        if not received:
            self._fail_all(_CLOSED_BY_SERVER)
            return
        if self._closed:
            return
        for raw in self._responses.get_all():
            reply = msgpack.unpackb(raw, raw=False)
            if "more" in reply:  # a streamed request's reply that more follow
                callback = self._waiting.get(reply["id"])
            else:
                callback = self._waiting.pop(reply["id"], None)
            if callback is not None:
                callback(reply, None)

    def _fail_all(self, reason: str) -> None:
        self._closed = True
        waiting, self._waiting = self._waiting, {}
        error = _gone(reason)
        for callback in waiting.values():
            callback(None, error)

    def notify(self) -> None:
        """Wake callers blocked in ``wait`` so they re-check their condition."""
        with self._cond:
            self._cond.notify_all()

    def close(self) -> None:
        if not self._closed:
            self._fail_all("local channel closed by the client")
            self.notify()
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        if self.fd_door is not None:
            self.fd_door.close()


class AsyncLocalChannel(_Channel):
    """The same channel on an asyncio loop: the loop watches the doorbell socket."""

    def __init__(self, path: str, hello: dict[str, Any], memory: mmap.mmap, requests: Ring,
                 responses: _Replies, sock: socket.socket, door: FdDoor | None = None) -> None:
        self.path = path
        self.hello = hello
        self.fd_door = door
        self._memory = memory
        self._requests = requests
        self._responses = responses
        self._sock = sock
        self._doorbells = bytearray(4096)
        #: The largest message (bytes, packed) the request ring takes.
        self.max_message = requests.capacity // 2 - 8
        self._loop = asyncio.get_running_loop()  # cached: each lookup is a getpid() syscall
        self._ids = itertools.count(1)
        self._packer = msgpack.Packer(use_bin_type=True)
        self._waiting: dict[int, asyncio.Future[dict[str, Any]] | _Waiter] = {}
        # Streamed requests' replies that more follow go here (``send(on_partial=...)``).
        self._partials: dict[int, Callable[[dict[str, Any]], None]] = {}
        self._deadlines: dict[int, float] = {}  # request id -> loop time, for calls that have one
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._unrung = False
        self._ring_scheduled = False
        self._closed = False
        self._loop.add_reader(sock.fileno(), self._readable)

    @classmethod
    async def connect(cls, path: str, connect_timeout: float = 5.0,
                      server_uid: int | None = None) -> AsyncLocalChannel:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        kept: list[int] = []
        try:
            async with asyncio.timeout(connect_timeout):
                await loop.sock_connect(sock, path)
                check_server(sock, path, server_uid)
                hello, memory, requests, responses = await _async_handshake(loop, sock, kept)
        except BaseException as exc:
            sock.close()
            for fd in kept:
                os.close(fd)
            if isinstance(exc, TimeoutError):
                raise OSError(errno.ETIMEDOUT, "local channel handshake timed out") from None
            raise
        return cls(path, hello, memory, requests, responses, sock, fd_door(hello, kept))

    @classmethod
    async def over(cls, sock: socket.socket) -> AsyncLocalChannel:
        """A channel on a socket already connected to the server (a frontend process's,
        daemon/frontend_process): the server's hello is read from it."""
        sock.setblocking(False)
        kept: list[int] = []
        try:
            hello, memory, requests, responses = await _async_handshake(
                asyncio.get_running_loop(), sock, kept)
        except BaseException:
            for fd in kept:
                os.close(fd)
            raise
        return cls("", hello, memory, requests, responses, sock, fd_door(hello, kept))

    def _readable(self) -> None:
        """Doorbell: the server published replies (or closed the socket)."""
        try:
            received = self._sock.recv_into(self._doorbells)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._lost(f"local channel to the server failed: {exc}")
            return
        if not received:
            self._lost(_CLOSED_BY_SERVER)
            return
        delivered = False
        try:
            for raw in self._responses.get_all():
                reply = msgpack.unpackb(raw, raw=False)
                if self._partials:
                    if "more" in reply:  # a streamed request's reply that more follow
                        on_partial = self._partials.get(reply["id"])
                        if on_partial is not None:
                            on_partial(reply)
                            delivered = True
                        continue
                    self._partials.pop(reply["id"], None)
                future = self._waiting.pop(reply["id"], None)
                if future is not None and not future.done():
                    future.set_result(reply)
                    delivered = True
        except Exception as exc:  # a malformed reply: the channel is of no further use
            self._lost(f"local channel to the server failed: {exc}")
            return
        if delivered and not self._ring_scheduled:
            # Scheduled after the callers just woken: what they send next shares one doorbell,
            # rung in the same loop iteration.
            self._ring_scheduled = True
            self._loop.call_soon(self._ring)

    def _lost(self, reason: str) -> None:
        if not self._closed:
            self._fail_all(reason)
        if self._sock.fileno() != -1:  # once: the number may belong to another socket later
            self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
            if self.fd_door is not None:
                self.fd_door.close()

    def _fail_all(self, reason: str) -> None:
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._deadlines.clear()
        waiting, self._waiting = self._waiting, {}
        for future in waiting.values():
            if not future.done():
                future.set_exception(_gone(reason))

    def forget(self, request_id: int) -> None:
        self._waiting.pop(request_id, None)
        self._partials.pop(request_id, None)

    def _send_cancel(self, message: dict[str, Any]) -> None:
        try:
            request_id, future, unsent = self._submit(message)
        except Exception:
            return
        if unsent is not None:  # the ring is full: not worth waiting for
            self._waiting.pop(request_id, None)
            future.cancel()

    async def send(self, message: dict[str, Any], deadline: float | None = None,
                   on_partial: Callable[[dict[str, Any]], None] | None = None
                   ) -> tuple[int, asyncio.Future[dict[str, Any]]]:
        """Publish ``message``; the future gets the reply (a refusal carries "err"), and
        ``on_partial`` the replies before it of a streamed request (``"more"``).

        Raises MessageTooLarge (nothing sent), UNAVAILABLE when the channel is closed, and
        DEADLINE_EXCEEDED when the ring stays full past ``deadline`` (time.monotonic()).
        """
        request_id, future, unsent = self._submit(message)
        if on_partial is not None:
            self._partials[request_id] = on_partial
        if unsent is not None:
            await self._put_when_room(request_id, unsent, deadline)
        return request_id, future

    def send_nowait(self, message: dict[str, Any], on_reply: Callback,
                    on_partial: Callable[[dict[str, Any]], None] | None = None) -> int:
        """``send`` without awaiting and without a future: ``on_reply`` is called with the
        reply (or the error) from the reader itself, in the loop iteration that read it.
        While the request ring is full the message waits in a task. Returns the request id;
        raises MessageTooLarge and UNAVAILABLE (closed channel) at once."""
        if self._closed:
            raise _gone("local channel to the server is closed")
        request_id = next(self._ids)
        message["id"] = request_id
        data = self._packer.pack(message)
        unsent = None
        try:
            self._requests.put(data)
        except RingFull:
            unsent = data
        else:
            self._ring_soon()
        waiter = _Waiter(on_reply)
        self._waiting[request_id] = waiter
        if on_partial is not None:
            self._partials[request_id] = on_partial
        if unsent is not None:
            task = self._loop.create_task(self._put_when_room(request_id, unsent, None))
            task.add_done_callback(lambda done: _fail_unsent(done, waiter))
        return request_id

    def _submit(self, message: dict[str, Any]
                ) -> tuple[int, asyncio.Future[dict[str, Any]], bytes | None]:
        """Publish ``message`` if the ring has room: (its id, the future of its reply, and
        its bytes when the ring is full: then ``_put_when_room`` must send them)."""
        if self._closed:
            raise _gone("local channel to the server is closed")
        request_id = next(self._ids)
        message["id"] = request_id
        data = self._packer.pack(message)
        try:
            self._requests.put(data)
            unsent = None
        except RingFull:
            unsent = data
        else:
            self._ring_soon()
        # Registered after the put is fine: nothing is read before this returns to the loop.
        future: asyncio.Future[dict[str, Any]] = self._loop.create_future()
        self._waiting[request_id] = future
        return request_id, future, unsent

    async def _put_when_room(self, request_id: int, data: bytes, deadline: float | None
                             ) -> None:
        """Backpressure: wait while the request ring is full (nothing is dropped)."""
        try:
            while True:
                if deadline is not None and time.monotonic() >= deadline:
                    raise deadline_exceeded()
                await asyncio.sleep(_BACKPRESSURE_SLEEP)
                if self._closed:
                    raise _gone(_CLOSED_BY_SERVER)
                try:
                    self._requests.put(data)
                    break
                except RingFull:
                    pass
        except BaseException:
            self._waiting.pop(request_id, None)
            raise
        self._ring_soon()

    def _ring_soon(self) -> None:
        """One doorbell for all sent in this loop iteration."""
        self._unrung = True
        if not self._ring_scheduled:
            self._ring_scheduled = True
            self._loop.call_soon(self._ring)

    def _ring(self) -> None:
        self._ring_scheduled = False
        if self._unrung and not self._closed:
            self._unrung = False
            try:
                self._sock.send(_DOORBELL, _SEND_FLAGS)
            except BlockingIOError:
                pass  # doorbells are queued already: the server will drain the ring
            except OSError as exc:
                self._lost(f"local channel to the server failed: {exc}")

    async def call(self, message: dict[str, Any], timeout: float | None = None
                   ) -> dict[str, Any]:
        """Send one message and wait for its reply; raises ShmserveError."""
        request_id, future, unsent = self._submit(message)
        try:
            if timeout is not None:
                # One timer serves all calls, armed for the earliest deadline (cheaper than a
                # timer per call); it fails the expired ones with DEADLINE_EXCEEDED.
                when = self._loop.time() + timeout
                self._deadlines[request_id] = when
                if self._timer is None or when < self._timer_at:
                    self._arm_timer(when)
                if unsent is not None:
                    await self._put_when_room(request_id, unsent, time.monotonic() + timeout)
            elif unsent is not None:
                await self._put_when_room(request_id, unsent, None)
            reply = await future
        finally:
            if timeout is not None:
                self._deadlines.pop(request_id, None)
            self._waiting.pop(request_id, None)
        if "err" in reply:
            raise _refusal(reply["err"])
        return reply

    def _arm_timer(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = when
        self._timer = self._loop.call_at(when, self._expire)

    def _expire(self) -> None:
        self._timer = None
        due = max(self._loop.time(), self._timer_at)  # the loop may run a timer a bit early
        deadlines = self._deadlines
        for request_id in [r for r, when in deadlines.items() if when <= due]:
            del deadlines[request_id]
            future = self._waiting.pop(request_id, None)
            if future is not None and not future.done():
                future.set_exception(deadline_exceeded())
        if deadlines:
            self._arm_timer(min(deadlines.values()))

    def close(self) -> None:
        self._lost("local channel closed by the client")


class _Waiter:
    """A call of ``send_nowait``: answered by calling a function, where a future would wake
    its awaiter one loop iteration later."""

    __slots__ = ("_callback", "_done")

    def __init__(self, callback: Callback) -> None:
        self._callback = callback
        self._done = False

    def done(self) -> bool:
        return self._done

    def set_result(self, reply: dict[str, Any]) -> None:
        self._done = True
        self._callback(reply, None)

    def set_exception(self, error: BaseException) -> None:
        self._done = True
        self._callback(None, error if isinstance(error, ShmserveError)
                       else _gone(f"local channel to the server failed: {error}"))

    def cancel(self) -> bool:
        self._done = True
        return True


def _fail_unsent(task: asyncio.Task[None], waiter: _Waiter) -> None:
    error = None if task.cancelled() else task.exception()
    if error is not None and not waiter.done():
        waiter.set_exception(error)


async def _async_handshake(loop: asyncio.AbstractEventLoop, sock: socket.socket,
                           kept: list[int] | None = None
                           ) -> tuple[dict[str, Any], mmap.mmap, Ring, _Replies]:
    """``_handshake`` on a non-blocking socket: wait until readable, then read it."""
    readable: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not readable.done():
            readable.set_result(None)

    loop.add_reader(sock.fileno(), ready)
    try:
        await readable
    finally:
        loop.remove_reader(sock.fileno())
    sock.settimeout(1.0)  # the hello is one small message: it is all there or nearly
    try:
        return _handshake(sock, kept=kept)
    finally:
        sock.setblocking(False)
