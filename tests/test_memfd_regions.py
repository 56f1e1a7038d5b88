"""Sealed memfd regions on the local channel (hardening issue, item 8).

A client that shrinks a POSIX segment a worker mapped kills that worker with SIGBUS. On the
local channel ``shmserve.client`` therefore makes its regions sealed memfds (F_SEAL_SHRINK)
and passes them by fd: a shrink fails with EPERM and the worker keeps serving. The server
refuses an fd that is not sealed. POSIX keys keep working; their exposure stays contained to
the one instance, which is restarted.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

import shmserve.tests.test_client as suite
from shmserve.client import (
    AsyncClient,
    Client,
    HostRegion,
    MemfdRegion,
    ShmserveError,
    SystemRegion,
)
from shmserve.client.local_channel import LocalChannel
from shmserve.tests.serverproc import ServerProcess

StartServer = Callable[..., ServerProcess]
no_leaks = suite.no_leaks  # autouse: nothing may be left in /dev/shm
SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


@pytest.fixture
def local(start_server: StartServer, tmp_path: Path) -> Iterator[tuple[ServerProcess, str]]:
    path = str(tmp_path / "s.sock")
    server = start_server(["crasher", "shm_probe"], "--local-socket", path)
    yield server, path


def holders(name: str) -> set[int]:
    """Pids of the processes holding the memfd called ``name``: an fd on it, or a mapping."""
    found: set[int] = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
            with open(f"/proc/{pid}/maps") as maps:
                if f"/memfd:{name} " in maps.read():
                    found.add(int(pid))
        except OSError:  # gone, or not ours to read
            continue
        for fd in fds:
            try:  # one per fd: the fd listdir itself used is listed but closed by now
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith(f"/memfd:{name} "):
                found.add(int(pid))
    return found


def crasher(client: Client, region: HostRegion | None = None
            ) -> tuple[np.ndarray, int]:
    """(OUTPUT0, the worker's pid) for an echo request; inputs and outputs in ``region``."""
    if region is None:
        out = client.infer("crasher", {"INPUT0": np.array([7], np.int32)})
        return out["OUTPUT0"], int(out["PID"][0])
    value = region.copy(np.array([7], np.int32))
    echoed = region.ndarray(1, np.int32)
    pid = region.ndarray(1, np.int64)
    out = client.infer("crasher", {"INPUT0": value}, outputs={"OUTPUT0": echoed, "PID": pid})
    assert np.shares_memory(out["OUTPUT0"], echoed) and np.shares_memory(out["PID"], pid)
    return out["OUTPUT0"], int(out["PID"][0])


def test_local_regions_are_sealed_memfds_used_in_place(local: tuple[ServerProcess, str]
                                                      ) -> None:
    server, path = local
    before = set(os.listdir("/dev/shm"))
    with Client(f"local://{path}") as client, client.shared_memory(1 << 16) as region:
        assert isinstance(region, MemfdRegion) and region.key == ""
        assert fcntl.fcntl(region.fileno(), fcntl.F_GET_SEALS) == SEALS
        assert set(os.listdir("/dev/shm")) == before  # no name anywhere
        status = client.shared_memory_status(region.name)[region.name]
        assert (status.key, status.offset, status.byte_size) == ("", 0, 1 << 16)
        # Zero copy both ways: the backend adds 1 to INPUT0 through the view it was handed.
        data = region.copy(np.arange(8, dtype=np.uint8))
        result = region.ndarray(8, np.uint8)
        out = client.infer("shm_probe", {"INPUT0": data}, outputs={"OUTPUT0": result})
        np.testing.assert_array_equal(data, np.arange(8) + 1)
        assert np.shares_memory(out["OUTPUT0"], result)
        np.testing.assert_array_equal(result, np.arange(8) + 1)
        text = region.bytes_tensor(["a", "bc"])
        assert text.decode().tolist() == [b"a", b"bc"]
        # The server holds the memfd (by fd: it never maps a client's memory), and so does
        # the worker that used it (a mapping of the fd it was passed).
        assert server.pid in holders(region.name) and len(holders(region.name)) == 3
        name = region.name
    # Unregistered and closed: the supervisor and the worker let go (this process keeps the
    # mapping, and mmap's duplicate of the fd, while arrays from the region are alive).
    suite.settled(lambda: holders(name) - {os.getpid()}, set())
    assert holders(name) - {os.getpid()} == set()


def test_async_client_uses_memfd_regions(local: tuple[ServerProcess, str]) -> None:
    _, path = local

    async def main() -> None:
        async with AsyncClient(f"local://{path}") as client:
            async with client.shared_memory(4096) as region:
                assert isinstance(region, MemfdRegion)
                data = region.copy(np.zeros(4, np.uint8))
                await client.infer("shm_probe", {"INPUT0": data})
                np.testing.assert_array_equal(data, np.ones(4))
            assert region.closed and client.regions == []

    asyncio.run(main())


def test_a_client_cannot_shrink_its_region_and_the_worker_keeps_serving(
        local: tuple[ServerProcess, str]) -> None:
    server, path = local
    with Client(f"local://{path}") as client, client.shared_memory(1 << 16) as region:
        assert isinstance(region, MemfdRegion)
        echoed, pid = crasher(client, region)
        assert echoed.tolist() == [7]
        for size in (0, 4096, 1 << 20):  # neither shrink nor grow
            with pytest.raises(PermissionError) as info:
                os.ftruncate(region.fileno(), size)
            assert info.value.errno == errno.EPERM
        with pytest.raises(PermissionError):  # nor unseal
            fcntl.fcntl(region.fileno(), fcntl.F_ADD_SEALS, 0)
        for _ in range(3):
            echoed, again = crasher(client, region)
            assert echoed.tolist() == [7] and again == pid
    assert "SIGBUS" not in server.log() and server.process.poll() is None


def _refused(channel: LocalChannel, fd: int, byte_size: int = 4096) -> ShmserveError:
    assert channel.fd_door is not None
    tag = channel.fd_door.pass_fd(fd)
    with pytest.raises(ShmserveError) as info:
        channel.call({"op": "register", "name": "r", "fd": tag, "offset": 0,
                      "byte_size": byte_size}, timeout=10)
    return info.value


def _memfd(name: str, size: int = 4096, seals: int = 0, sealing: bool = True) -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC | (os.MFD_ALLOW_SEALING if sealing else 0))
    os.ftruncate(fd, size)
    if seals:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


def test_an_unsealed_memfd_is_refused(local: tuple[ServerProcess, str], tmp_path: Path) -> None:
    server, path = local
    channel = LocalChannel(path)
    fds: list[int] = []
    try:
        assert channel.hello.get("fd_door") == 1 and channel.fd_door is not None
        fds.append(_memfd("refused_unsealed"))
        error = _refused(channel, fds[-1])
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT
        assert error.message == (
            "cannot register shared memory region 'r' - the memfd is not sealed against "
            "shrinking (add F_SEAL_SHRINK, F_SEAL_GROW and F_SEAL_SEAL before registering it)")
        fds.append(_memfd("refused_unsealable", sealing=False))
        assert "not sealed against shrinking" in _refused(channel, fds[-1]).message
        with open(tmp_path / "plain", "wb+") as plain:
            plain.truncate(4096)
            error = _refused(channel, plain.fileno())
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT and "seal" in error.message
        fds.append(_memfd("refused_write_sealed", seals=SEALS | fcntl.F_SEAL_WRITE))
        assert "sealed against writes" in _refused(channel, fds[-1]).message
        fds.append(_memfd("refused_small", seals=SEALS))
        assert "invalid args" in _refused(channel, fds[-1], byte_size=8192).message
        fds.append(_memfd("refused_readonly", seals=SEALS))
        read_only = os.open(f"/proc/self/fd/{fds[-1]}", os.O_RDONLY)
        fds.append(read_only)
        assert "reading and writing" in _refused(channel, read_only).message
        with pytest.raises(ShmserveError) as info:
            channel.call({"op": "register", "name": "r", "fd": 999, "byte_size": 64},
                         timeout=10)
        assert "no file descriptor was passed under tag 999" in info.value.message
        with pytest.raises(ShmserveError) as info:
            channel.call({"op": "register", "name": 5, "fd": 1, "byte_size": 64}, timeout=10)
        assert info.value.message == "register: name must be a string"
        # Nothing was registered, the server closed every refused fd, the channel works.
        assert channel.call({"op": "status", "name": ""}, timeout=10)["regions"] == []
        for name in ("refused_unsealed", "refused_unsealable", "refused_write_sealed",
                     "refused_small", "refused_readonly"):
            assert server.pid not in holders(name), name
        # A sealed one of the right size is taken.
        fds.append(_memfd("accepted", seals=SEALS))
        tag = channel.fd_door.pass_fd(fds[-1])
        channel.call({"op": "register", "name": "ok", "fd": tag, "byte_size": 4096},
                     timeout=10)
        assert channel.call({"op": "status", "name": "ok"}, timeout=10)["regions"] == [
            ["ok", "", 0, 4096]]
        assert server.pid in holders("accepted")
    finally:
        channel.close()
        for fd in fds:
            os.close(fd)
    suite.settled(lambda: holders("accepted"), set())
    assert holders("accepted") == set()  # the channel closed: its region's fd with it


def test_an_unregistered_region_in_use_keeps_its_fd_until_the_request_ends(
        local: tuple[ServerProcess, str]) -> None:
    server, path = local
    fd = _memfd("in_flight", seals=SEALS)
    answers: list[dict[str, Any] | None] = []
    try:
        with closing(LocalChannel(path)) as channel:
            assert channel.fd_door is not None
            tag = channel.fd_door.pass_fd(fd)
            channel.call({"op": "register", "name": "r", "fd": tag, "byte_size": 4096},
                         timeout=10)
            channel.submit({"op": "infer", "model": "shm_probe", "version": "", "rid": "",
                            "in": [["INPUT0", "UINT8", [8], "r", "r", 0, 8]], "out": [],
                            "p": {"sleep_ms": 1500}},
                           lambda reply, error: answers.append(reply))
            deadline = time.monotonic() + 20
            while len(holders("in_flight")) < 3 and time.monotonic() < deadline:
                time.sleep(0.02)  # this process, the server, and the worker that runs it
            (worker,) = holders("in_flight") - {os.getpid(), server.pid}
            channel.call({"op": "unregister", "name": "r"}, timeout=10)
            assert channel.call({"op": "status", "name": ""}, timeout=10)["regions"] == []
            assert holders("in_flight") == {os.getpid(), server.pid, worker}  # still in use
            assert channel.wait(lambda: bool(answers), time.monotonic() + 30)
            assert answers[0] is not None and "err" not in answers[0]
            # The request released it: the server closed its fd, the worker dropped its own.
            suite.settled(lambda: holders("in_flight"), {os.getpid()})
            assert holders("in_flight") == {os.getpid()}
    finally:
        os.close(fd)


def test_posix_regions_still_work_and_a_shrink_is_contained(
        local: tuple[ServerProcess, str]) -> None:
    """The documented exposure of POSIX keys (docs/security.md): a client that shrinks its
    segment kills the worker that mapped it, and only that instance, which is restarted."""
    server, path = local
    infer = {"op": "infer", "model": "crasher", "version": "", "rid": "", "out": [],
             "in": [["INPUT0", "INT32", [1], "r", "posix", 0, 4]]}
    with closing(LocalChannel(path)) as channel, closing(SystemRegion(4096)) as segment:
        channel.call({"op": "register", "name": "posix", "key": segment.key, "offset": 0,
                      "byte_size": 4096}, timeout=10)
        segment.copy(np.array([7], np.int32))
        first = {o[0]: o[3] for o in channel.call(dict(infer), timeout=30)["out"]}
        assert np.frombuffer(first["OUTPUT0"], np.int32).tolist() == [7]
        os.truncate(f"/dev/shm/{segment.name}", 0)  # the test touches the memory no more
        with pytest.raises(ShmserveError) as info:
            channel.call(dict(infer), timeout=30)
        assert info.value.code == grpc.StatusCode.UNAVAILABLE
        assert f"killed by signal {signal.SIGBUS.name}" in info.value.message
        assert "being restarted" in info.value.message
        channel.call({"op": "unregister", "name": "posix"}, timeout=10)
    # Only that instance went down; it comes back, and the server never did.
    with Client(f"local://{path}") as client:
        assert client.infer("shm_probe", {"INPUT0": np.zeros(2, np.uint8)})[
            "OUTPUT0"].shape == (2,)
        deadline = time.monotonic() + 30
        while (pid := _echo_pid(client)) is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert pid not in (None, int(np.frombuffer(first["PID"], np.int64)[0]))
    assert server.process.poll() is None


def _echo_pid(client: Client) -> int | None:
    try:
        return crasher(client)[1]
    except ShmserveError:
        return None


def test_grpc_fallback_keeps_posix_regions(start_server: StartServer, tmp_path: Path) -> None:
    server = start_server(["crasher"], "--local-socket", str(tmp_path / "s.sock"))
    with Client(server.url, transport="shm", local_socket=str(tmp_path / "absent.sock")
                ) as client, client.shared_memory(4096) as region:
        assert client.transport == "grpc"
        assert isinstance(region, SystemRegion) and suite.segment_exists(region)
        assert crasher(client, region)[0].tolist() == [7]
    assert not suite.segment_exists(region)
