"""Sealed memfd regions: what ``Client.shared_memory`` makes on a local channel.

A POSIX segment can be shrunk by its owner at any time (``ftruncate``); a worker that mapped it
then dies of SIGBUS at its next access. A memfd sealed with ``F_SEAL_SHRINK`` cannot be shrunk
by anyone, so on the local channel the client creates its regions as sealed memfds and passes
the fd to the server (the wire is described in protos/local_messages.py). The region has
no name in /dev/shm: nothing can leak there, and no other process can open it by name.

The allocator, ``ndarray``/``copy``/``bytes_tensor`` and ``close`` are ``HostRegion``'s,
shared with ``SystemRegion``.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import mmap
import os
import secrets
import socket
import threading
import weakref
from typing import Any, Protocol

import grpc

from shmserve.client.errors import ShmserveError, invalid_argument
from shmserve.client.regions import HostRegion, SystemRegion
from shmserve.protos.local_messages import FD_TAG

NAME_PREFIX = "shmserve_memfd_"
#: The seals a client region carries: it can neither shrink nor grow, and nobody can change
#: that (nor seal it against writes, which would fail the server's writes of outputs).
SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
_DOOR_TIMEOUT = 5.0
_counter = itertools.count()
#: Key of a register message's fd that is still to be passed over the channel's fd door.
PASS_FD = "pass_fd"


def memfd_supported() -> bool:
    return hasattr(os, "memfd_create")


class MemfdRegion(HostRegion):
    """A sealed memfd mapped into this process (see ``HostRegion``). ``key`` is empty: the
    region has no name outside this process, the server holds it by file descriptor."""

    def __init__(self, byte_size: int) -> None:
        super().__init__(byte_size)
        self.name = f"{NAME_PREFIX}{os.getpid()}_{next(_counter)}_{secrets.token_hex(4)}"
        self.key = ""
        fd = os.memfd_create(self.name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, self.byte_size)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
            mapped = mmap.mmap(fd, self.byte_size)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._fd_finalizer = weakref.finalize(self, os.close, fd)
        self._use_mapping(mapped)

    def fileno(self) -> int:
        """The memfd (valid until ``close``)."""
        if self._fd < 0:
            raise ValueError(f"region '{self.name}' is closed")
        return self._fd

    def _release_memory(self) -> None:
        self._fd = -1
        self._fd_finalizer()

    def register_message(self) -> dict[str, Any]:
        """The channel's register message for this region, with the fd still to be passed
        (``with_passed_fd`` sends it and names it in the message)."""
        return {"op": "register", "name": self.name, "offset": 0,
                "byte_size": self.byte_size, PASS_FD: self.fileno()}



class FdDoor:
    """The client end of a channel's fd door: one datagram per fd, tagged."""

    def __init__(self, fd: int) -> None:
        self._sock = socket.socket(fileno=fd)
        self._sock.settimeout(_DOOR_TIMEOUT)  # a tiny datagram: only a stuck server blocks it
        self._tags = itertools.count(1)
        self._lock = threading.Lock()

    def pass_fd(self, fd: int) -> int:
        """Send ``fd`` to the server; returns the tag a register message names it by."""
        with self._lock:
            tag = next(self._tags)
            try:
                socket.send_fds(self._sock, [FD_TAG.pack(tag)], [fd])
            except OSError as exc:
                raise ShmserveError(grpc.StatusCode.UNAVAILABLE,
                                    f"cannot pass a region's memfd to the server: {exc}"
                                    ) from None
        return tag

    def receive_fd(self, tag: int) -> int:
        """The fd the server sent under ``tag`` (a frontend process's large answer: the server
        sends it before the reply that names it, so it is waiting here)."""
        with self._lock:
            while True:
                try:
                    data, fds, _, _ = socket.recv_fds(self._sock, FD_TAG.size, 1)
                except OSError as exc:
                    raise ShmserveError(grpc.StatusCode.UNAVAILABLE,
                                        f"cannot receive an answer's memfd: {exc}") from None
                got = FD_TAG.unpack(data)[0] if len(data) == FD_TAG.size else -1
                if len(fds) == 1 and got == tag:
                    return fds[0]
                for fd in fds:
                    os.close(fd)
                if not 0 <= got < tag:
                    raise ShmserveError(grpc.StatusCode.INTERNAL,
                                        f"expected the answer's memfd under tag {tag}")
                # An earlier answer's, which nobody read: its caller had given up.

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.close()


def with_passed_fd(door: FdDoor | None, message: dict[str, Any]) -> dict[str, Any]:
    """``message`` ready for the channel: a region's fd (``PASS_FD``) is sent over ``door``
    and replaced by its tag ("fd"). Messages without one are returned as they are."""
    fd = message.get(PASS_FD)
    if fd is None:
        return message
    if door is None:  # replayed on a channel of a server that takes no fds
        raise invalid_argument("this server's local channel takes no memfd regions")
    sent = {key: value for key, value in message.items() if key != PASS_FD}
    sent["fd"] = door.pass_fd(fd)
    return sent


class FdChannel(Protocol):
    """A local channel, as far as regions care: whether it has an fd door."""

    @property
    def fd_door(self) -> FdDoor | None: ...


def new_region(channel: FdChannel | None, byte_size: int) -> HostRegion:
    """The region ``Client.shared_memory`` makes: a sealed memfd on a local channel whose
    server takes them, a POSIX segment otherwise (gRPC, or an older server)."""
    if channel is not None and channel.fd_door is not None and memfd_supported():
        return MemfdRegion(byte_size)
    return SystemRegion(byte_size)
