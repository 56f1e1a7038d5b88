"""The client end of the local channel (see shmserve.daemon.frontend.local).

``LocalChannel`` connects to the server's Unix socket, receives the memfd holding the two rings,
and exchanges msgpack messages through them; the socket carries only doorbell bytes. It is
thread-safe: one reader thread completes the futures of every waiting caller.
``AsyncLocalChannel`` does the same on an asyncio loop without threads.
"""

from __future__ import annotations

import array
import asyncio
import itertools
import mmap
import os
import socket
import struct
import threading
import time
from typing import Any

import grpc
import msgpack

from shmserve.client.errors import ShmserveError
from shmserve.protos.local_ring import Ring, RingFull, layout

_LENGTH = struct.Struct("<I")
_BACKPRESSURE_SLEEP = 0.0002


def _error(raw: list[str]) -> ShmserveError:
    code = getattr(grpc.StatusCode, raw[0], grpc.StatusCode.UNKNOWN)
    return ShmserveError(code, raw[1])


def _gone(message: str) -> ShmserveError:
    return ShmserveError(grpc.StatusCode.UNAVAILABLE, message)


def _handshake(sock: socket.socket) -> tuple[dict[str, Any], mmap.mmap, Ring, Ring]:
    fds = array.array("i")
    data, ancillary, _, _ = sock.recvmsg(65536, socket.CMSG_SPACE(fds.itemsize))
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
    if not fds:
        raise _gone("local channel handshake carried no shared memory")
    while len(data) < 4 or len(data) < 4 + _LENGTH.unpack_from(data)[0]:
        more = sock.recv(65536)
        if not more:
            raise _gone("local channel closed during the handshake")
        data += more
    (length,) = _LENGTH.unpack_from(data)
    hello = msgpack.unpackb(data[4:4 + length], raw=False)
    try:
        total, request_base, response_base = layout(hello["ring_bytes"])
        memory = mmap.mmap(fds[0], total)
    finally:
        for fd in fds:
            os.close(fd)
    return hello, memory, Ring.attach(memory, request_base), Ring.attach(memory, response_base)


def socket_path(url: str) -> str:
    """``local:///run/shmserve.sock`` or ``local:/run/shmserve.sock`` -> the socket path."""
    path = url[len("local:"):]
    while path.startswith("//"):
        path = path[1:]
    return path


class _Slot:
    __slots__ = ("done", "error", "reply")

    def __init__(self) -> None:
        self.done = False
        self.reply: dict[str, Any] | None = None
        self.error: ShmserveError | None = None


class LocalChannel:
    """Thread-safe. No reader thread: a waiting caller becomes the reader (leader/follower),
    so a lone caller reads its own reply without any thread switch."""

    def __init__(self, path: str, connect_timeout: float = 5.0) -> None:
        self.path = path
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(connect_timeout)
        try:
            sock.connect(path)
            self.hello, self._memory, self._requests, self._responses = _handshake(sock)
        except BaseException:
            sock.close()
            raise
        sock.settimeout(None)
        self._sock = sock
        self._ids = itertools.count(1)
        self._send_lock = threading.Lock()
        self._cond = threading.Condition()
        self._reading = False
        self._waiting: dict[int, _Slot] = {}
        self._closed = False

    @property
    def grpc_address(self) -> str:
        return str(self.hello["grpc"])

    @property
    def closed(self) -> bool:
        return self._closed

    def call(self, message: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        """Send one message and wait for its reply; raises ShmserveError."""
        slot = self._send(message)
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not slot.done:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    self._waiting.pop(int(message["id"]), None)
                    raise ShmserveError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                        "Deadline Exceeded")
                if self._closed:
                    raise _gone("the server closed the local channel (it stopped or "
                                "restarted)")
                if self._reading:
                    self._cond.wait(remaining)
                    continue
                self._reading = True
                self._cond.release()
                try:
                    self._read_once(remaining)
                finally:
                    self._cond.acquire()
                    self._reading = False
                    self._cond.notify_all()
        if slot.error is not None:
            raise slot.error
        assert slot.reply is not None
        return slot.reply

    def _send(self, message: dict[str, Any]) -> _Slot:
        slot = _Slot()
        request_id = next(self._ids)
        message["id"] = request_id
        data = msgpack.packb(message, use_bin_type=True)
        with self._send_lock:
            if self._closed:
                raise _gone("local channel to the server is closed")
            self._waiting[request_id] = slot
            while True:
                try:
                    self._requests.put(data)
                    break
                except RingFull:  # backpressure: the server drains, nothing is dropped
                    if self._closed:
                        raise _gone("local channel to the server is closed") from None
                    time.sleep(_BACKPRESSURE_SLEEP)
            try:
                self._sock.sendall(b"\x01")
            except OSError as exc:
                self._fail_all(f"local channel to the server failed: {exc}")
        return slot

    def _read_once(self, timeout: float | None) -> None:
        try:
            self._sock.settimeout(timeout)
            chunk = self._sock.recv(4096)
        except TimeoutError:
            return
        except OSError as exc:
            self._fail_all(f"local channel to the server failed: {exc}")
            return
        if not chunk:
            self._fail_all("the server closed the local channel (it stopped or restarted)")
            return
        for raw in self._responses.get_all():
            reply = msgpack.unpackb(raw, raw=False)
            slot = self._waiting.pop(reply["id"], None)
            if slot is None:
                continue
            if "err" in reply:
                slot.error = _error(reply["err"])
            else:
                slot.reply = reply
            slot.done = True

    def _fail_all(self, reason: str) -> None:
        self._closed = True
        waiting, self._waiting = self._waiting, {}
        for slot in waiting.values():
            slot.error = _gone(reason)
            slot.done = True

    def close(self) -> None:
        self._closed = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()


class AsyncLocalChannel(asyncio.Protocol):
    """The same channel on an asyncio loop: the doorbell socket is read by the loop."""

    def __init__(self) -> None:
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._transport: asyncio.Transport | None = None
        self._closed = False
        self.hello: dict[str, Any] = {}

    @classmethod
    async def connect(cls, path: str, connect_timeout: float = 5.0) -> AsyncLocalChannel:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(connect_timeout)
        try:
            await loop.run_in_executor(None, sock.connect, path)
            hello, memory, requests, responses = await loop.run_in_executor(
                None, _handshake, sock)
        except BaseException:
            sock.close()
            raise
        sock.setblocking(False)
        channel = cls()
        channel.hello, channel._memory = hello, memory
        channel._requests, channel._responses = requests, responses
        await loop.create_unix_connection(lambda: channel, sock=sock)
        return channel

    @property
    def grpc_address(self) -> str:
        return str(self.hello["grpc"])

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        for raw in self._responses.get_all():
            reply = msgpack.unpackb(raw, raw=False)
            future = self._waiting.pop(reply["id"], None)
            if future is None or future.done():
                continue
            if "err" in reply:
                future.set_exception(_error(reply["err"]))
            else:
                future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        waiting, self._waiting = self._waiting, {}
        for future in waiting.values():
            if not future.done():
                future.set_exception(_gone("the server closed the local channel (it stopped "
                                           "or restarted)"))

    @property
    def closed(self) -> bool:
        return self._closed

    async def call(self, message: dict[str, Any], timeout: float | None = None
                   ) -> dict[str, Any]:
        if self._closed or self._transport is None:
            raise _gone("local channel to the server is closed")
        request_id = next(self._ids)
        message["id"] = request_id
        data = msgpack.packb(message, use_bin_type=True)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = future
        while True:
            try:
                self._requests.put(data)
                break
            except RingFull:
                await asyncio.sleep(_BACKPRESSURE_SLEEP)
                if self._closed:
                    raise _gone("local channel to the server is closed") from None
        self._transport.write(b"\x01")
        try:
            return await asyncio.wait_for(future, timeout)
        finally:
            self._waiting.pop(request_id, None)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
