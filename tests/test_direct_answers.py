"""Workers answer local-channel requests straight into the client's direct rings.

Seen from the protocol: which ring a reply arrives in tells who wrote it (the channel's
response ring: the supervisor; a direct ring: the worker that owns it). Real server, real
workers, raw channel (the client library reads every ring and cannot tell).
"""

from __future__ import annotations

import array
import os
import resource
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest

from shmserve.client import Client, ShmserveError
from shmserve.client.local_channel import _handshake
from shmserve.protos.local_ring import Ring
from shmserve.tests.serverproc import ServerProcess, worker_pids

A = np.arange(16, dtype=np.int32).reshape(1, 16)
B = np.ones((1, 16), dtype=np.int32)
MAIN_RING = 0
StartServer = Callable[..., ServerProcess]


@dataclass
class RawChannel:
    sock: socket.socket
    requests: Ring
    replies: list[Ring]
    close: Callable[[], None]
    next_id: int = 1

    def ask(self, message: dict[str, Any], timeout: float = 30.0) -> tuple[int, dict[str, Any]]:
        """Publish one message and wait for its reply: (index of the ring it came in, reply).
        Ring 0 is the channel's response ring, 1.. the direct rings."""
        request_id = self.next_id
        self.next_id += 1
        self.requests.put(msgpack.packb({**message, "id": request_id}))
        self.sock.send(b"\x01")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for index, ring in enumerate(self.replies):
                for raw in ring.get_all():
                    reply = msgpack.unpackb(raw, raw=False)
                    if reply["id"] == request_id:
                        return index, reply
            if select.select([self.sock], [], [], 0.5)[0]:
                assert self.sock.recv(4096), "the server closed the channel"
        raise AssertionError(f"no reply to {message['model']} in {timeout}s")


@pytest.fixture
def open_raw(tmp_path: Path) -> Iterator[Callable[..., RawChannel]]:
    opened: list[RawChannel] = []

    def open_channel(path: str, announce: bool = True) -> RawChannel:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(path)
        _, memory, requests, replies = _handshake(sock, announce)

        def close() -> None:
            requests.release()
            replies.release()
            memory.close()
            sock.close()

        channel = RawChannel(sock, requests, replies.rings, close)
        opened.append(channel)
        return channel

    yield open_channel
    for channel in opened:
        channel.close()


def simple(a: np.ndarray = A) -> dict[str, Any]:
    return {"op": "infer", "model": "simple", "version": "", "rid": "", "out": [], "p": {},
            "in": [["INPUT0", "INT32", [1, 16], "b", a.tobytes()],
                   ["INPUT1", "INT32", [1, 16], "b", B.tobytes()]]}


def crasher(value: int) -> dict[str, Any]:
    return {"op": "infer", "model": "crasher", "version": "", "rid": "", "out": [], "p": {},
            "in": [["INPUT0", "INT32", [1], "b", np.array([value], np.int32).tobytes()]]}


def output(reply: dict[str, Any], name: str, dtype: type) -> np.ndarray:
    (entry,) = [o for o in reply["out"] if o[0] == name]
    return np.frombuffer(entry[3], dtype=dtype)


def test_worker_answers_directly_and_errors_come_from_the_supervisor(
        start_server: StartServer, open_raw: Callable[..., RawChannel],
        tmp_path: Path) -> None:
    path = str(tmp_path / "s.sock")
    start_server(["simple"], "--local-socket", path)
    channel = open_raw(path)
    for i in range(20):
        ring, reply = channel.ask(simple(A + i))
        assert ring != MAIN_RING, "answered by the supervisor, not the worker"
        assert reply["model_version"] == "1"
        np.testing.assert_array_equal(output(reply, "OUTPUT0", np.int32), (A + i + 1).ravel())
        np.testing.assert_array_equal(output(reply, "OUTPUT1", np.int32), (A + i - 1).ravel())
    bad = simple()
    bad["in"] = bad["in"][:1]
    ring, reply = channel.ask(bad)
    assert ring == MAIN_RING and reply["err"][0] == "INVALID_ARGUMENT", reply


def test_a_client_that_does_not_announce_direct_rings_is_answered_by_the_supervisor(
        start_server: StartServer, open_raw: Callable[..., RawChannel],
        tmp_path: Path) -> None:
    """A client built before direct answers never reads those rings: without its hello the
    workers must not answer into them (it would wait for ever)."""
    path = str(tmp_path / "s.sock")
    start_server(["simple"], "--local-socket", path)
    channel = open_raw(path, announce=False)
    for i in range(5):
        ring, reply = channel.ask(simple(A + i))
        assert ring == MAIN_RING
        np.testing.assert_array_equal(output(reply, "OUTPUT0", np.int32), (A + i + 1).ravel())


def test_direct_rings_are_shared_out_and_taken_back_from_dead_workers(
        start_server: StartServer, open_raw: Callable[..., RawChannel],
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One direct ring, two workers: the first one answers directly, the other through the
    supervisor; when the first dies its ring goes to the next worker that needs one."""
    monkeypatch.setenv("SHMSERVE_LOCAL_DIRECT_RINGS", "1")
    path = str(tmp_path / "s.sock")
    start_server(["simple", "crasher"], "--local-socket", path)
    channel = open_raw(path)
    ring, reply = channel.ask(crasher(5))
    assert ring == 1 and output(reply, "OUTPUT0", np.int32)[0] == 5
    first_pid = output(reply, "PID", np.int64)[0]
    ring, reply = channel.ask(simple())
    assert ring == MAIN_RING, "two workers cannot own the one direct ring"
    np.testing.assert_array_equal(output(reply, "OUTPUT0", np.int32), (A + 1).ravel())

    ring, reply = channel.ask(crasher(1))  # its worker kills itself
    assert ring == MAIN_RING and reply["err"][0] == "UNAVAILABLE", reply
    deadline = time.monotonic() + 60
    while True:
        ring, reply = channel.ask(crasher(7))
        if "err" not in reply or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert "err" not in reply, reply
    assert output(reply, "PID", np.int64)[0] != first_pid
    assert ring == 1, "the dead worker's ring was not given to the restarted one"
    ring, reply = channel.ask(simple())
    assert ring == MAIN_RING
    np.testing.assert_array_equal(output(reply, "OUTPUT0", np.int32), (A + 1).ravel())


def _holds_channel(pid: int) -> bool:
    with open(f"/proc/{pid}/maps") as maps:
        return "shmserve-local-channel" in maps.read()


def test_closed_channels_are_detached_from_workers(start_server: StartServer,
                                                   tmp_path: Path) -> None:
    """A worker drops a channel's memory and socket when the channel closes: no fd, no
    mapping left behind however many clients came and went."""
    path = tmp_path / "s.sock"
    server = start_server(["simple"], "--local-socket", str(path))
    (worker,) = worker_pids(server.pid)
    fds_before = len(os.listdir(f"/proc/{worker}/fd"))
    for _ in range(5):
        with Client(f"local://{path}") as client:
            np.testing.assert_array_equal(
                client.infer("simple", {"INPUT0": A, "INPUT1": B})["OUTPUT0"], A + 1)
            assert _holds_channel(worker)
    deadline = time.monotonic() + 20
    while _holds_channel(worker) or len(os.listdir(f"/proc/{worker}/fd")) > fds_before:
        assert time.monotonic() < deadline, "the worker kept a closed channel's fds"
        time.sleep(0.05)
    assert worker_pids(server.pid) == [worker]


def test_a_client_cannot_resize_its_channel_memory(start_server: StartServer,
                                                   tmp_path: Path) -> None:
    """The channel's memfd is sealed: shrinking it would make the next access of the daemon
    (or a worker) to its rings die of SIGBUS."""
    path = str(tmp_path / "s.sock")
    server = start_server(["simple"], "--local-socket", path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    fds = array.array("i")
    _, ancillary, _, _ = sock.recvmsg(65536, socket.CMSG_SPACE(fds.itemsize))
    for _, _, payload in ancillary:
        fds.frombytes(payload[:fds.itemsize])
    try:
        for size in (0, 1 << 30):
            with pytest.raises(PermissionError):
                os.ftruncate(fds[0], size)
        sock.send(b"\x01")
        with Client(f"local://{path}") as client:
            np.testing.assert_array_equal(
                client.infer("simple", {"INPUT0": A, "INPUT1": B})["OUTPUT0"], A + 1)
        assert server.process.poll() is None
    finally:
        os.close(fds[0])
        sock.close()


def test_a_client_scribbling_over_its_direct_rings_does_not_hurt_the_worker(
        start_server: StartServer, open_raw: Callable[..., RawChannel],
        tmp_path: Path) -> None:
    """The client owns the rings' memory: a capacity or head it writes must neither aim the
    worker's writes elsewhere nor crash it. Its answers still arrive."""
    path = str(tmp_path / "s.sock")
    server = start_server(["simple"], "--local-socket", path)
    (worker,) = worker_pids(server.pid)
    channel = open_raw(path)
    far = 64 << 20  # as an offset from the ring: past the end of the channel's memory
    for ring in channel.replies[1:]:
        # head = tail = far (a consistent, empty ring), and a capacity that would make the
        # position far itself rather than far modulo the real capacity.
        struct.pack_into("<QQQ", ring._buf, ring._base, far, far, 1 << 60)
    for i in range(3):
        where, reply = channel.ask(simple(A + i))
        np.testing.assert_array_equal(output(reply, "OUTPUT0", np.int32), (A + i + 1).ravel())
        assert where != MAIN_RING, "the worker stopped answering directly"
    assert worker_pids(server.pid) == [worker]


def _open_file_limit(pid: int) -> tuple[int, int]:
    with open(f"/proc/{pid}/limits") as limits:
        line = next(line for line in limits if line.startswith("Max open files"))
    soft, hard = line.split()[3:5]
    return int(soft), int(hard)


def test_the_daemon_raises_its_open_file_limit(start_server: StartServer,
                                               tmp_path: Path) -> None:
    """Each channel costs the daemon three fds and every worker that answers it two: a
    login shell's soft limit of 1,024 would cap the clients at about three hundred."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= 512:
        pytest.skip(f"the hard open-file limit here is {hard}: nothing to raise")
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
    try:
        server = start_server(["simple"], "--local-socket", str(tmp_path / "s.sock"))
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    (worker,) = worker_pids(server.pid)
    for pid in (server.pid, worker):
        raised, _ = _open_file_limit(pid)
        assert raised > 256 and (hard == resource.RLIM_INFINITY or raised == hard), raised


def test_a_batch_mixing_channels_and_grpc_answers_each_its_own(start_server: StartServer,
                                                                tmp_path: Path) -> None:
    """One dynamic batch holds requests of two local channels and of gRPC, some failing: every
    caller gets its own output or its own error, whoever delivers it."""
    path = tmp_path / "s.sock"
    server = start_server(["raiser"], "--local-socket", str(path))
    clients = [Client(f"local://{path}"), Client(f"local://{path}"), Client(server.url)]
    outcomes: dict[int, object] = {}

    def call(client: Client, value: int) -> None:
        try:
            out = client.infer("raiser", {"INPUT0": np.array([[value]], np.int32)})["OUTPUT0"]
            outcomes[value] = int(out[0][0])
        except ShmserveError as exc:
            outcomes[value] = exc.message

    values = {c: [c * 1000 + k + 1 if k % 3 else -(c * 1000 + k + 1) for k in range(8)]
              for c in range(len(clients))}
    try:
        (before,) = clients[2].model_statistics("raiser")
        for _ in range(3):
            threads = [threading.Thread(target=call, args=(clients[c], v))
                       for c, vs in values.items() for v in vs]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(60)
            for vs in values.values():
                for v in vs:
                    assert outcomes[v] == (v if v > 0 else "negative input rejected"), v
            outcomes.clear()
        (after,) = clients[2].model_statistics("raiser")
    finally:
        for client in clients:
            client.close()
    executions = after.execution_count - before.execution_count
    assert executions < 3 * 24 / 2, f"{executions} executions: the requests were not batched"
