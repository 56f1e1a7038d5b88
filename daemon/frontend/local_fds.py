"""Sealed memfd regions on the local channel: the fd door and the checks on what comes in.

A client can shrink a POSIX segment after a worker mapped it, and the worker's next access
is SIGBUS. A memfd sealed with ``F_SEAL_SHRINK`` cannot be shrunk by anyone, so
``shmserve.client`` registers its local-channel regions as sealed memfds, passed by fd.

The wire (the fd door passed with the hello, one tagged datagram per fd, "register" with
"fd" instead of "key") is written down with the channel's other messages in
protos/local_messages.py.

The server refuses (INVALID_ARGUMENT) an fd that is not a regular file sealed against
shrinking (``F_GET_SEALS``), one sealed against writes (outputs could not be written), one not
open for reading and writing, or one smaller than ``offset + byte_size``. The registry keeps
the fd while the region is registered and closes it once the last request using it released
it; workers get their own duplicate (daemon/worker_process.py ``share_region_fd``).
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import os
import socket
import stat
from typing import Any

from shmserve.daemon.core import Core
from shmserve.daemon.errors import ServeError, invalid_argument
from shmserve.daemon.shm_registry import printable
from shmserve.protos.local_messages import FD_TAG

MAX_PARKED = 64
F_SEAL_FUTURE_WRITE = 0x0010  # Linux 5.1; not in Python 3.11's fcntl
_WRITE_SEALS = fcntl.F_SEAL_WRITE | F_SEAL_FUTURE_WRITE


class FdDoor:
    """The server end of one channel's fd door, and the fds received but not registered yet."""

    def __init__(self) -> None:
        server_end, client_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        server_end.setblocking(False)
        self._sock = server_end
        self._client: socket.socket | None = client_end
        self._parked: dict[int, int] = {}  # tag -> fd

    def client_fd(self) -> int:
        """The end to pass to the client (``handed_over`` closes it here once it is sent)."""
        assert self._client is not None
        return self._client.fileno()

    def handed_over(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def take(self, tag: object, name: str) -> int:
        """The fd the client sent under ``tag`` (the caller owns it from now on)."""
        if type(tag) is not int:
            raise invalid_argument(f"cannot register shared memory region {printable(name)}"
                                   f" - malformed fd tag {tag!r}")
        self._receive_waiting()
        fd = self._parked.pop(tag, None)
        if fd is None:
            raise invalid_argument(f"cannot register shared memory region {printable(name)}"
                                   f" - no file descriptor was passed under tag {tag}")
        return fd

    def give(self, fd: int, tag: int) -> None:
        """Send ``fd`` to the client under ``tag`` (a frontend process's large answer,
        frontend_link.py); the caller keeps its own fd. Raises OSError."""
        socket.send_fds(self._sock, [FD_TAG.pack(tag)], [fd])

    def _receive_waiting(self) -> None:
        while True:
            fds = array.array("i")
            try:
                data, ancillary, _, _ = self._sock.recvmsg(
                    FD_TAG.size, socket.CMSG_SPACE(4 * fds.itemsize))
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            if not data and not ancillary:
                return  # the client closed its end
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
            if len(data) == FD_TAG.size and len(fds) == 1:
                (tag,) = FD_TAG.unpack(data)
                self._park(tag, fds[0])
            else:  # malformed: nothing can name it
                for fd in fds:
                    os.close(fd)

    def _park(self, tag: int, fd: int) -> None:
        old = self._parked.pop(tag, None)
        if old is not None:
            os.close(old)
        if len(self._parked) >= MAX_PARKED:  # a client sending fds it never registers
            os.close(self._parked.pop(next(iter(self._parked))))
        self._parked[tag] = fd

    def close(self) -> None:
        self.handed_over()
        self._receive_waiting()
        for fd in self._parked.values():
            os.close(fd)
        self._parked.clear()
        self._sock.close()


def check_sealed_memfd(name: str, fd: int, offset: int, byte_size: int) -> None:
    """Refuse an fd a worker could be SIGBUSed through, or could not use."""
    shown = printable(name)

    def refuse(why: str) -> ServeError:
        return invalid_argument(f"cannot register shared memory region {shown} - {why}")

    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        raise refuse("the file descriptor is not a memfd")
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        raise refuse("the file descriptor is not a memfd that can be sealed (create it with "
                     "memfd_create(MFD_ALLOW_SEALING) and seal it with F_SEAL_SHRINK)") from None
    if not seals & fcntl.F_SEAL_SHRINK:
        raise refuse("the memfd is not sealed against shrinking (add F_SEAL_SHRINK, "
                     "F_SEAL_GROW and F_SEAL_SEAL before registering it)")
    if seals & _WRITE_SEALS:
        raise refuse("the memfd is sealed against writes: outputs could not be written")
    if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE != os.O_RDWR:
        raise refuse("the memfd must be open for reading and writing")
    if type(offset) is not int or type(byte_size) is not int or offset < 0 or byte_size <= 0 \
            or offset + byte_size > info.st_size:
        raise refuse(f"invalid args (offset {offset!r}, byte_size {byte_size!r}, memfd of "
                     f"{info.st_size} bytes)")


def register_memfd(core: Core, door: FdDoor | None, prefix: str,
                   message: dict[str, Any], owner: str) -> None:
    """Handle a channel's "register" message that names an fd: check the fd and register it
    under the channel's private name (``prefix`` + the message's name), or close it and
    raise."""
    name, offset, byte_size = message["name"], message.get("offset", 0), message["byte_size"]
    if type(name) is not str:
        raise invalid_argument("register: name must be a string")
    name = prefix + name
    if door is None:
        raise invalid_argument("this channel has no fd door")
    fd = door.take(message["fd"], name)
    try:
        check_sealed_memfd(name, fd, offset, byte_size)
        core.registry.register_memfd(name, fd, offset, byte_size, owner)
    except BaseException:
        with contextlib.suppress(OSError):
            os.close(fd)
        raise
