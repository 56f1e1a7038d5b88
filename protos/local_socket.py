"""Where the local channel's socket lives, and who a client may trust to answer there.

Shared by the server (which creates the socket) and the client (which connects to it).

A socket in a directory that other users can write can be replaced by any of them, so a
server's default socket sits in a directory only the server's user can write:

- ``$RUNTIME_DIRECTORY`` when systemd gives one (``RuntimeDirectory=shmserve``: /run/shmserve),
- ``/run/shmserve`` for a server running as root,
- ``$TMPDIR/shmserve-<uid>`` (mode 0700) for anyone else.

A client checks the uid of the process that accepted its connection (SO_PEERCRED) before it
sends anything: its own uid, root, a uid it was told (``server_uid``), or the owner of the
socket's directory when nobody else can write that directory.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import struct
import tempfile

SYSTEM_SOCKET_DIR = "/run/shmserve"


class UntrustedServer(PermissionError):
    """The process behind a local socket is not one the client may trust."""


def socket_name(grpc_port: int) -> str:
    return f"shmserve-{grpc_port}.sock"


def _personal_dir(uid: int) -> str:
    return os.path.join(tempfile.gettempdir(), f"shmserve-{uid}")


def server_socket_dir() -> tuple[str, int]:
    """The directory a server puts its socket in by default, and the mode it creates it with
    (0755 for a system-wide server other users may connect to, 0700 for a personal one)."""
    runtime = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    if runtime:
        return runtime, 0o755
    uid = os.geteuid()
    if uid == 0:
        return SYSTEM_SOCKET_DIR, 0o755
    return _personal_dir(uid), 0o700


def server_socket_path(grpc_port: int) -> str:
    return os.path.join(server_socket_dir()[0], socket_name(grpc_port))


def client_socket_candidates(grpc_port: int) -> list[str]:
    """Where a client looks for the socket of the server on ``grpc_port``, in order: a server
    of its own user first, then a system-wide one."""
    name = socket_name(grpc_port)
    candidates = [os.path.join(_personal_dir(os.geteuid()), name)]
    runtime = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    if runtime:
        candidates.append(os.path.join(runtime, name))
    candidates.append(os.path.join(SYSTEM_SOCKET_DIR, name))
    return list(dict.fromkeys(candidates))


def client_socket_path(grpc_port: int) -> str:
    """The first candidate that exists (the first one when none does)."""
    candidates = client_socket_candidates(grpc_port)
    for path in candidates:
        if os.path.exists(path):
            return path
    return candidates[0]


def prepare_socket_dir(directory: str, mode: int) -> None:
    """Create the socket's directory, or check that an existing one is safe: a real directory
    owned by this user (or root) that nobody else can write. Raises ``PermissionError``."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(directory, mode)
        os.chmod(directory, mode)  # umask may have narrowed it
    info = os.lstat(directory)
    uid = os.geteuid()
    if not stat.S_ISDIR(info.st_mode):
        raise PermissionError(f"local socket directory '{directory}' is not a directory")
    if info.st_uid not in (uid, 0):
        raise PermissionError(f"local socket directory '{directory}' belongs to uid "
                              f"{info.st_uid}, not to this server's uid {uid}: another user "
                              f"could replace the socket; remove it or pass --local-socket")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise PermissionError(f"local socket directory '{directory}' is writable by other "
                              f"users (mode {stat.S_IMODE(info.st_mode):o}): another user could "
                              f"replace the socket; chmod it or pass --local-socket")


def writable_by_others(directory: str) -> bool:
    try:
        mode = os.stat(directory).st_mode
    except OSError:
        return False
    return bool(mode & (stat.S_IWGRP | stat.S_IWOTH))


def peer_uid(sock: socket.socket) -> int:
    """The uid of the process at the other end of a connected Unix socket."""
    credentials = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                  struct.calcsize("3i"))
    return int(struct.unpack("3i", credentials)[1])


def trusted_server_uids(path: str, server_uid: int | None = None) -> set[int]:
    trusted = {os.geteuid(), 0}
    if server_uid is not None:
        trusted.add(server_uid)
    directory = os.path.dirname(os.path.abspath(path))
    with contextlib.suppress(OSError):
        info = os.stat(directory)
        if not info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            trusted.add(info.st_uid)
    return trusted


def check_server(sock: socket.socket, path: str, server_uid: int | None = None) -> None:
    """Refuse a server the client has no reason to trust, before anything is sent to it."""
    uid = peer_uid(sock)
    if uid not in trusted_server_uids(path, server_uid):
        raise UntrustedServer(
            f"the local socket '{path}' is served by uid {uid}, which is neither this user, "
            f"root, nor the owner of a directory only it can write; refusing to send requests "
            f"there (pass server_uid={uid} if that server is trusted)")
