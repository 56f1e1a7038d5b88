"""The local shared-memory channel (issue 8) through ``shmserve.client``, against real servers.

The client suite's inference tests run again through the channel (parametrized below, not
copied); then what is particular to the channel: errors identical to gRPC's, region isolation,
32 concurrent clients, a client SIGKILLed mid-request, a client that never reads, a full ring,
a daemon restart, the fallback to gRPC, statistics.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import msgpack
import numpy as np
import pytest

import shmserve.tests.test_client as suite
from shmserve.client import AsyncClient, Client, HostRegion, ShmserveError, SystemRegion
from shmserve.client._local import default_socket_path
from shmserve.client.local_channel import LocalChannel, _handshake
from shmserve.daemon import admin_shm
from shmserve.protos.local_ring import Ring, RingFull
from shmserve.tests.serverproc import ServerProcess, build_repository

A = np.arange(16, dtype=np.int32).reshape(1, 16)
B = np.ones((1, 16), dtype=np.int32)
EXAMPLE_MODELS = ["simple", "identity_fp32", "string_upper"]
SLOW = ["simple", "two_instances"]  # two_instances sleeps 0.3 s per request
StartServer = Callable[..., ServerProcess]


@dataclass
class LocalServer:
    """A server as the client suite sees it, but with a ``local://`` url."""

    server: ServerProcess
    socket: str

    @property
    def url(self) -> str:
        return f"local://{self.socket}"

    @property
    def grpc_url(self) -> str:
        return self.server.url


@pytest.fixture(scope="module")
def local_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServer]:
    base = tmp_path_factory.mktemp("local")
    repo = build_repository(base / "repo", EXAMPLE_MODELS)
    server = ServerProcess(repo, "--local-socket", str(base / "shmserve.sock"))
    server.wait_ready()
    yield LocalServer(server, str(base / "shmserve.sock"))
    code = server.stop()
    assert code == 0, server.log()
    assert not os.path.exists(base / "shmserve.sock"), "the server left its socket behind"


no_leaks = suite.no_leaks  # autouse: no test leaves a client segment in /dev/shm


@pytest.fixture
def client(local_server: LocalServer) -> Iterator[Client]:
    with Client(local_server.url) as c:
        yield c


def server_regions(server: LocalServer | ServerProcess) -> dict[str, Any]:
    """Every system region the server holds, as a plain gRPC client sees them."""
    url = server.grpc_url if isinstance(server, LocalServer) else server.url
    with Client(url) as plain:
        return plain.shared_memory_status()


def channel_regions(server: LocalServer | ServerProcess, channel_id: object = None) -> int:
    """Regions the server holds for one local channel (or all channels), from its metrics.

    gRPC status never shows a channel's regions: their names and keys are private.
    """
    import re
    process = server.server if isinstance(server, LocalServer) else server
    text = process.metrics_page()
    owner = f"local:{channel_id}" if channel_id is not None else "local:[0-9]+"
    return sum(int(float(count)) for count in re.findall(
        r'shmserve_shared_memory_regions\{kind="system",owner="' + owner + r'"\} (\S+)', text))


def wait_for(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.02)


# --- the client suite, through the channel ----------------------------------------------

CLIENT_TESTS = [
    suite.test_model_statistics_count_requests,
    suite.test_infer_payload,
    suite.test_infer_big_payload,
    suite.test_infer_bytes_payload,
    suite.test_server_errors_carry_code_and_message,
    suite.test_client_side_errors,
    suite.test_deadline_and_unreachable_server,
    suite.test_views_offsets_and_fallbacks,
    suite.test_region_allocator,
    suite.test_bytes_tensors_in_a_region,
    suite.test_raw_registration_of_a_segment_made_elsewhere,
    suite.test_exception_inside_with_leaves_nothing,
    suite.test_stream_infer,
]
# Not here: the suite's tests of POSIX segments a dead program leaves in /dev/shm. Through the
# channel the client's regions are memfds, which leave nothing (test_sigkilled_client_...).
SERVER_TESTS = [
    suite.test_unregister_all_touches_only_this_clients_regions,
    suite.test_close_and_garbage_collection_release_regions,
    suite.test_async_client_methods,
    suite.test_async_client_concurrency_32,
]


@pytest.mark.parametrize("test", CLIENT_TESTS, ids=lambda t: t.__name__)
def test_client_suite_through_the_channel(test: Callable[[Client], None],
                                          client: Client) -> None:
    test(client)
    assert client.transport == "shm"


@pytest.mark.parametrize("test", SERVER_TESTS, ids=lambda t: t.__name__)
def test_server_suite_through_the_channel(test: Callable[[Any], None],
                                          local_server: LocalServer) -> None:
    test(local_server)


@pytest.mark.parametrize("example", sorted(p.name for p in suite.EXAMPLES_DIR.glob("*.py")))
def test_examples_through_the_channel(example: str, local_server: LocalServer) -> None:
    suite.test_examples_run(example, local_server)  # type: ignore[arg-type]


# --- what travels where ------------------------------------------------------------------

class SizeSpy:
    """Records the packed size of every message the clients of this process send."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.sizes: list[int] = []
        original = Ring.put

        def put(ring: Ring, message: bytes) -> None:
            original(ring, message)
            self.sizes.append(len(message))

        monkeypatch.setattr(Ring, "put", put)


def test_requests_travel_through_the_channel(local_server: LocalServer,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """No ModelInfer over gRPC, no tensor bytes in the ring; the server counts the requests."""
    recorder = suite.Recorder()
    spy = SizeSpy(monkeypatch)
    with Client(local_server.url, interceptors=[recorder]) as client, \
            Client(local_server.grpc_url) as plain:
        (before,) = plain.model_statistics("identity_fp32")
        with client.shared_memory(2 * suite.MIB16 * 4 + 4096) as region:
            x = region.ndarray(suite.MIB16, np.float32)
            x[:] = np.random.default_rng(3).random(suite.MIB16, dtype=np.float32)
            y = region.ndarray(suite.MIB16, np.float32)
            for _ in range(3):
                out = client.infer("identity_fp32", {"INPUT0": x}, outputs={"OUTPUT0": y})
                assert out["OUTPUT0"] is y
                np.testing.assert_array_equal(y, x)
                x += 1
            # The region is registered in the channel's own namespace on the server.
            channel_id = client._link.current().channel_id  # type: ignore[union-attr]
            assert channel_regions(local_server, channel_id) == 1
            assert region.name not in server_regions(local_server)
            assert not any(name.startswith("@") for name in server_regions(local_server))
        (after,) = plain.model_statistics("identity_fp32")
    assert recorder.sizes == [], "inference went through gRPC"
    # hello, register, 3 x infer, unregister
    assert len(spy.sizes) == 6 and max(spy.sizes) < 512, spy.sizes
    assert after.inference_count == before.inference_count + 3
    assert after.inference_stats.success.count == before.inference_stats.success.count + 3
    assert after.execution_count >= before.execution_count + 3


def test_statistics_count_local_requests(local_server: LocalServer) -> None:
    """Local requests count exactly as gRPC ones do, failures included."""
    def stats(plain: Client) -> tuple[int, int, int, int]:
        (s,) = plain.model_statistics("simple")
        return (s.inference_count, s.execution_count, s.inference_stats.success.count,
                s.inference_stats.fail.count)

    def run(client: Client) -> None:
        for i in range(5):
            np.testing.assert_array_equal(
                client.infer("simple", {"INPUT0": A + i, "INPUT1": B})["OUTPUT0"], A + i + 1)
        bad_inputs: list[dict[str, np.ndarray]] = [
            {"INPUT0": A}, {"INPUT0": A, "INPUT1": B.astype(np.int64)}]
        for bad in bad_inputs:
            with pytest.raises(ShmserveError):
                client.infer("simple", bad)

    with Client(local_server.url) as client, Client(local_server.grpc_url) as plain:
        deltas = []
        for who in (client, plain):
            before = stats(plain)
            run(who)
            suite.settled(lambda: stats(plain)[2], before[2] + 5)  # see suite.settled
            deltas.append(tuple(b - a for a, b in zip(before, stats(plain), strict=True)))
        # The local client's own statistics call (gRPC) sees the same numbers.
        assert client.model_statistics("simple")[0].inference_count == stats(plain)[0]
    assert deltas[0] == deltas[1]
    assert deltas[0][0] == deltas[0][2] == 5


def test_errors_are_identical_to_grpc(local_server: LocalServer) -> None:
    def outcome(client: Client, call: Callable[[Client], Any]) -> tuple[str, str]:
        with pytest.raises(ShmserveError) as info:
            call(client)
        return info.value.code.name, info.value.message

    f32 = A.astype(np.float32)
    cases: list[Callable[[Client], Any]] = [
        lambda c: c.infer("no_such_model", {"INPUT0": A}),
        lambda c: c.infer("simple", {"INPUT0": A}, version="7"),
        lambda c: c.infer("simple", {"INPUT0": A}),
        lambda c: c.infer("simple", {"INPUT0": f32, "INPUT1": B}),
        lambda c: c.infer("simple", {"INPUT0": A, "INPUT1": B, "EXTRA": B}),
        lambda c: c.infer("simple", {"INPUT0": A.reshape(16), "INPUT1": B.reshape(16)}),
        lambda c: c.infer("simple", {"INPUT0": np.zeros((9, 16), np.int32),
                                     "INPUT1": np.zeros((9, 16), np.int32)}),
        lambda c: c.infer("simple", {"INPUT0": A[:, :8], "INPUT1": B[:, :8]}),
        lambda c: c.infer("simple", {"INPUT0": A, "INPUT1": B}, outputs=["NOPE"]),
        lambda c: c.infer("identity_fp32", {"INPUT0": np.array(["x"], dtype=object)}),
        lambda c: c.infer("string_upper", {"TEXT": np.zeros((1, 1), np.int32)}),
        lambda c: c.infer("simple", {"INPUT0": np.zeros((1, 16), np.complex64), "INPUT1": B}),
        lambda c: c.infer("simple", {"INPUT0": A, "INPUT1": B},
                          parameters={"bad": [1]}),  # type: ignore[dict-item]
        lambda c: c.infer("simple", {"INPUT0": A, "INPUT1": B},
                          parameters={"raw": b"\x00"}),  # type: ignore[dict-item]
        lambda c: c.infer("simple", {"INPUT0": A, "INPUT1": B},
                          outputs={"OUTPUT0": np.empty((1, 16), np.int32)}),
        lambda c: c.infer("simple", [A, B]),  # type: ignore[arg-type]
        lambda c: c.register_system_shared_memory("bad", "/no_such_segment_xyz", 64),
        lambda c: c.register_system_shared_memory("arena", "/shmserve_arena_1_x_1", 64),
        lambda c: c.shared_memory_status("no_such_region"),
    ]
    with Client(local_server.url) as local, Client(local_server.grpc_url) as plain:
        for index, call in enumerate(cases):
            expected = outcome(plain, call)
            got = outcome(local, call)
            assert got == expected, f"case {index}: {got} != {expected}"

        # Region errors name the client's own region: the same text but for that name.
        # A segment made elsewhere, registered by key (the channel's own regions are memfds).
        with local.shared_memory(4096) as mine, plain.shared_memory(4096) as theirs, \
                closing(SystemRegion(4096)) as segment:
            seen = []
            for client, region in ((local, mine), (plain, theirs)):
                rows = region.copy(np.tile(A, (2, 1)))
                tiny = region.ndarray((1, 16), np.int32)

                def small_output(c: Client, rows: np.ndarray = rows,
                                 tiny: np.ndarray = tiny) -> Any:
                    return c.infer("simple", {"INPUT0": rows, "INPUT1": rows},
                                   outputs={"OUTPUT0": tiny})

                def twice(c: Client, region: HostRegion = region) -> None:
                    c.register_system_shared_memory(region.name, segment.key, 64)

                def too_big(c: Client) -> None:
                    c.register_system_shared_memory("too_big", segment.key, 1 << 20)

                seen.append([(code, text.replace(region.name, "<region>")) for code, text in
                             (outcome(client, call) for call in (small_output, twice,
                                                                 too_big))])
            assert seen[0] == seen[1]
            assert seen[0][0][0] == "INTERNAL" and "should be at least 128" in seen[0][0][1]
        assert local.transport == "shm"


# --- region isolation --------------------------------------------------------------------

def _raw_infer(channel: LocalChannel, region: str, size: int = 64) -> dict[str, Any]:
    return channel.call({"op": "infer", "model": "simple", "version": "", "rid": "",
                         "in": [["INPUT0", "INT32", [1, 16], "r", region, 0, size],
                                ["INPUT1", "INT32", [1, 16], "b", B.tobytes()]],
                         "out": [], "p": {}}, timeout=30)


def test_a_channel_reaches_only_its_own_regions(local_server: LocalServer) -> None:
    with Client(local_server.grpc_url) as grpc_client, Client(local_server.url) as local, \
            grpc_client.shared_memory(4096) as theirs, local.shared_memory(4096) as mine:
        theirs.copy(A)
        x_mine = mine.copy(A)
        own = local._link.current()  # type: ignore[union-attr]
        assert own is not None
        intruder = LocalChannel(local_server.socket)
        try:
            # Not a gRPC client's region, not another channel's (by its name or the server's).
            for name in (theirs.name, mine.name, f"@{own.channel_id}:{mine.name}"):
                with pytest.raises(ShmserveError) as info:
                    _raw_infer(intruder, name)
                assert info.value.code == grpc.StatusCode.NOT_FOUND
                assert info.value.message == f"Unable to find shared memory region: '{name}'"
            # Nor can it unregister them ...
            intruder.call({"op": "unregister", "name": mine.name}, timeout=10)
            intruder.call({"op": "unregister", "name": ""}, timeout=10)
            assert theirs.name in server_regions(local_server)
            assert channel_regions(local_server, own.channel_id) == 1
            # ... and the same name in its own namespace is its own region, not the owner's.
            segment = SystemRegion(4096)
            try:
                segment.copy(np.full((1, 16), 5, np.int32))
                intruder.call({"op": "register", "name": mine.name, "key": segment.key,
                               "offset": 0, "byte_size": 4096}, timeout=10)
                assert _raw_infer(intruder, mine.name)["out"][0][3] == (
                    np.full((1, 16), 6, np.int32).tobytes())
                np.testing.assert_array_equal(
                    local.infer("simple", {"INPUT0": x_mine, "INPUT1": B})["OUTPUT0"], A + 1)
            finally:
                segment.close()
        finally:
            intruder.close()
        wait_for(lambda: channel_regions(local_server, intruder.channel_id) == 0)


CHILD_FOREIGN_KEY = """
import os, sys
import numpy as np
from shmserve.client import Client, ShmserveError, SystemRegion
url, foreign_key = sys.argv[1], sys.argv[2]
os.setgid(65534)
os.setuid(65534)
with Client(url) as client:
    try:
        client.register_system_shared_memory("stolen", foreign_key, 64)
        print("REGISTERED")
    except ShmserveError as exc:
        print("REFUSED", exc.code.name, exc.message)
    with client.shared_memory(4096) as own:  # its own segment is fine
        x = own.copy(np.ones((1, 16), np.int32))
        print("OWN", int(client.infer("simple", {"INPUT0": x, "INPUT1": x})["OUTPUT0"].sum()))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as another user")
def test_a_channel_cannot_register_another_users_segment(start_server: StartServer) -> None:
    shared = Path(tempfile.mkdtemp(prefix="shmserve-test-"))  # pytest's tmp is root-only
    shared.chmod(0o755)
    path = shared / "s.sock"
    root_segment = SystemRegion(4096)
    try:
        server = start_server(["simple"], "--local-socket", str(path))
        path.chmod(0o666)  # let the other user connect
        done = subprocess.run([sys.executable, "-c", textwrap.dedent(CHILD_FOREIGN_KEY),
                               f"local://{path}", root_segment.key],
                              capture_output=True, text=True, timeout=60, cwd="/")
        server.stop()
    finally:
        root_segment.close()
        shutil.rmtree(shared, ignore_errors=True)
    assert done.returncode == 0, done.stderr
    assert f"REFUSED INVALID_ARGUMENT cannot register shared memory region 'stolen' - shm key " \
           f"'{root_segment.key}' belongs to another user" in done.stdout
    assert "OWN 32" in done.stdout
    assert "uid 65534" in server.log()


# --- many clients -------------------------------------------------------------------------

def test_32_concurrent_clients_in_threads(local_server: LocalServer) -> None:
    errors: list[BaseException] = []
    barrier = threading.Barrier(32)

    def run(i: int) -> None:
        try:
            with Client(local_server.url) as client, client.shared_memory(4096) as region:
                barrier.wait(30)
                x = region.copy(A + i)
                out = region.ndarray((1, 16), np.int32)
                for j in range(10):
                    if j % 2:
                        got = client.infer("simple", {"INPUT0": x, "INPUT1": B},
                                           outputs={"OUTPUT0": out, "OUTPUT1": None})
                        assert got["OUTPUT0"] is out
                    else:
                        got = client.infer("simple", {"INPUT0": A + i, "INPUT1": B})
                    np.testing.assert_array_equal(got["OUTPUT0"], A + i + 1)
                    np.testing.assert_array_equal(got["OUTPUT1"], A + i - 1)
                assert client.transport == "shm"
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(32)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors[:3]


def test_one_client_shared_by_32_threads(local_server: LocalServer) -> None:
    with Client(local_server.url) as client:
        def run(i: int) -> np.ndarray:
            return client.infer("simple", {"INPUT0": A + i, "INPUT1": B})["OUTPUT0"]

        results: list[np.ndarray | None] = [None for _ in range(32 * 5)]

        def worker(i: int) -> None:
            for k in range(5):
                results[i * 5 + k] = run(i * 5 + k)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(32)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        for n, result in enumerate(results):
            np.testing.assert_array_equal(result, A + n + 1)


def test_async_client_32_concurrent_tasks(local_server: LocalServer) -> None:
    async def main() -> None:
        async with AsyncClient(local_server.url) as client, \
                client.shared_memory(1 << 16) as region:
            xs = [region.copy(A + i) for i in range(32)]
            outs = [region.ndarray((1, 16), np.int32) for _ in range(32)]

            async def one(i: int) -> dict[str, np.ndarray]:
                if i % 2:
                    return await client.infer("simple", {"INPUT0": xs[i], "INPUT1": B},
                                              outputs={"OUTPUT0": outs[i], "OUTPUT1": None})
                return await client.infer("simple", {"INPUT0": A + i, "INPUT1": B})

            for _ in range(5):
                results = await asyncio.gather(*(one(i) for i in range(32)))
                for i, result in enumerate(results):
                    np.testing.assert_array_equal(result["OUTPUT0"], A + i + 1)
                    if i % 2:
                        assert result["OUTPUT0"] is outs[i]
            assert client.transport == "shm"
            # 32 AsyncClients, one task each, at once.
            others = [AsyncClient(local_server.url) for _ in range(32)]
            try:
                results = await asyncio.gather(*(
                    c.infer("simple", {"INPUT0": A + i, "INPUT1": B})
                    for i, c in enumerate(others)))
                for i, result in enumerate(results):
                    np.testing.assert_array_equal(result["OUTPUT0"], A + i + 1)
            finally:
                await asyncio.gather(*(c.close() for c in others))

    asyncio.run(main())


# --- a client that dies, a client that never reads ---------------------------------------

CHILD_LOOPS = """
import sys
import numpy as np
from shmserve.client import Client
with Client(sys.argv[1]) as client, client.shared_memory(1 << 16) as region:
    x = region.copy(np.ones(1, np.int32))
    print(region.name, client._link.current().channel_id, flush=True)
    while True:  # two_instances sleeps 0.3 s per request: killed while one is in flight
        client.infer("two_instances", {"INPUT0": x})
"""


def test_sigkilled_client_is_reclaimed(start_server: StartServer, tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    server = start_server(SLOW, "--local-socket", str(path))
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(CHILD_LOOPS),
                              f"local://{path}"], stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    name, channel_id = child.stdout.readline().split()
    assert channel_regions(server, channel_id) >= 1
    time.sleep(0.5)
    child.send_signal(signal.SIGKILL)
    child.communicate(timeout=10)

    log_line = f"local channel {channel_id} (pid {child.pid}) closed"
    wait_for(lambda: log_line in server.log())
    wait_for(lambda: channel_regions(server, channel_id) == 0)
    # The server keeps serving, both ways, and the abandoned request did no harm.
    with Client(f"local://{path}") as client, Client(server.url) as plain:
        for c in (client, plain):
            np.testing.assert_array_equal(
                c.infer("simple", {"INPUT0": A, "INPUT1": B})["OUTPUT0"], A + 1)
        assert client.infer("two_instances", {"INPUT0": np.ones(1, np.int32)})["PID"].size == 1
    # Nothing is left behind: the client's region was a memfd, gone with its last fd.
    assert name.startswith("shmserve_memfd_")
    assert name not in {s.name for s in admin_shm.list_segments()}
    assert "Traceback" not in server.log()


def _publish(ring: Ring, sock: socket.socket, message: bytes) -> None:
    while True:
        try:
            ring.put(message)
            break
        except RingFull:
            time.sleep(0.001)
    sock.send(b"\x01")


def test_client_that_never_reads_is_closed(start_server: StartServer,
                                           monkeypatch: pytest.MonkeyPatch,
                                           tmp_path: Path) -> None:
    monkeypatch.setenv("SHMSERVE_LOCAL_STALL_SECS", "2")
    monkeypatch.setenv("SHMSERVE_LOCAL_RING_BYTES", str(32 << 10))
    monkeypatch.setenv("SHMSERVE_LOCAL_DIRECT_RING_BYTES", str(32 << 10))
    path = tmp_path / "s.sock"
    server = start_server(["simple", "identity_fp32"], "--local-socket", str(path))
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(path))
    hello, memory, requests, responses = _handshake(sock)
    x = np.ones(1024, np.float32)
    request = {"op": "infer", "model": "identity_fp32", "version": "", "rid": "",
               "in": [["INPUT0", "FP32", [1024], "b", x.tobytes()]], "out": [], "p": {}}
    started = time.monotonic()
    try:
        with Client(f"local://{path}") as other, Client(server.url) as plain:
            # 100 answers of 4 KiB overflow the 32 KiB response ring and the worker's 32 KiB
            # direct ring; this client never drains them and never reads its socket.
            for i in range(100):
                _publish(requests, sock, msgpack.packb({**request, "id": i + 1}))
            # Meanwhile the server serves everybody else.
            while time.monotonic() - started < 1.5:
                for c in (other, plain):
                    np.testing.assert_array_equal(
                        c.infer("simple", {"INPUT0": A, "INPUT1": B})["OUTPUT0"], A + 1)
            # After the bound, the server gives up on it and closes the channel.
            sock.settimeout(30)
            while sock.recv(65536):
                pass
            elapsed = time.monotonic() - started
            assert 2.0 <= elapsed < 30, elapsed
            log = server.log()
            assert f"channel {hello['channel']} (pid {os.getpid()}) stopped reading " \
                   f"responses; closing it" in log
            assert f"local channel {hello['channel']} (pid {os.getpid()}) closed" in log
            np.testing.assert_array_equal(
                other.infer("simple", {"INPUT0": A, "INPUT1": B})["OUTPUT0"], A + 1)
    finally:
        requests.release()
        responses.release()
        memory.close()
        sock.close()


# --- backpressure -------------------------------------------------------------------------

class FullCounter:
    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.full = 0
        original = Ring.put

        def put(ring: Ring, message: bytes) -> None:
            try:
                original(ring, message)
            except RingFull:
                self.full += 1
                raise

        monkeypatch.setattr(Ring, "put", put)


def test_full_ring_is_backpressure_not_loss(start_server: StartServer,
                                            monkeypatch: pytest.MonkeyPatch,
                                            tmp_path: Path) -> None:
    monkeypatch.setenv("SHMSERVE_LOCAL_RING_BYTES", "4096")  # ~15 requests fill it
    # The worker's direct ring fills too: those answers take the supervisor's way instead.
    monkeypatch.setenv("SHMSERVE_LOCAL_DIRECT_RING_BYTES", "4096")
    path = tmp_path / "s.sock"
    server = start_server(["simple"], "--local-socket", str(path))
    counter = FullCounter(monkeypatch)
    count = 400

    async def main() -> None:
        async with AsyncClient(f"local://{path}") as client:
            results = await asyncio.gather(*(
                client.infer("simple", {"INPUT0": A + i, "INPUT1": B}) for i in range(count)))
            for i, result in enumerate(results):
                np.testing.assert_array_equal(result["OUTPUT0"], A + i + 1)
                np.testing.assert_array_equal(result["OUTPUT1"], A + i - 1)

    asyncio.run(main())
    async_full = counter.full
    assert async_full > 0, "the ring never filled: the test proves nothing"

    with Client(f"local://{path}") as client:
        outcomes: list[np.ndarray | None] = [None] * count

        def worker(offset: int) -> None:
            for i in range(offset, count, 16):
                outcomes[i] = client.infer("simple", {"INPUT0": A + i, "INPUT1": B})["OUTPUT0"]

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        for i, result in enumerate(outcomes):
            np.testing.assert_array_equal(result, A + i + 1)
        # A stream of many requests: sent as fast as the ring takes them.
        results = list(client.stream_infer("simple", ({"INPUT0": A + i, "INPUT1": B}
                                                      for i in range(count))))
        assert sorted(r.index for r in results) == list(range(count))
        for r in results:
            np.testing.assert_array_equal(r.unwrap()["OUTPUT0"], A + r.index + 1)
    assert "stopped reading" not in server.log()


def test_message_too_large_for_the_channel(client: Client) -> None:
    """Bytes beyond the ring's limit go through gRPC, unless the request names regions."""
    big = np.ones(2 * suite.MIB16, np.float32)  # 32 MiB as bytes
    np.testing.assert_array_equal(client.infer("identity_fp32", {"INPUT0": big})["OUTPUT0"],
                                  big)
    with client.shared_memory(big.nbytes + 64) as region:
        out = region.ndarray(big.shape, np.float32)
        with pytest.raises(ShmserveError) as info:
            client.infer("identity_fp32", {"INPUT0": big}, outputs={"OUTPUT0": out})
        assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "too large for the local channel" in info.value.message
    assert client.transport == "shm"


@pytest.mark.parametrize("size", ["over", "edge"])
def test_stream_request_too_large_for_the_channel(local_server: LocalServer, size: str) -> None:
    """A stream on the channel cannot fall back to gRPC: a request too large for it ends the
    stream with RESOURCE_EXHAUSTED once the answers before it are in, and both clients say the
    same, whether the tensor bytes alone are over the limit or only the packed message is."""
    with Client(local_server.url) as client:
        assert client.is_server_ready()
        limit = client._link.current().max_message  # type: ignore[union-attr]
        count = 2 * limit // 4 if size == "over" else limit // 4  # "edge": the bytes fit
        requests = [{"INPUT0": np.ones(4, np.float32)}, {"INPUT0": np.ones(count, np.float32)}]
        answered = []
        with pytest.raises(ShmserveError) as info:
            for result in client.stream_infer("identity_fp32", requests):
                answered.append(result.index)
        sync_error = info.value

    async def main() -> tuple[list[int], ShmserveError]:
        async with AsyncClient(local_server.url) as client:
            answered = []
            with pytest.raises(ShmserveError) as info:
                async for result in client.stream_infer("identity_fp32", requests):
                    answered.append(result.index)
            return answered, info.value

    async_answered, async_error = asyncio.run(main())
    assert answered == async_answered == [0]
    assert sync_error.code == async_error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "too large for the local channel" in sync_error.message
    assert sync_error.message == async_error.message


def test_deadline_through_the_channel(start_server: StartServer, tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    start_server(SLOW, "--local-socket", str(path))
    one = np.ones(1, np.int32)
    with Client(f"local://{path}") as client:
        started = time.monotonic()
        with pytest.raises(ShmserveError) as info:
            client.infer("two_instances", {"INPUT0": one}, timeout=0.05)
        assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert info.value.message == "Deadline Exceeded"
        assert time.monotonic() - started < 0.25
        assert client.infer("two_instances", {"INPUT0": one})["PID"].shape == (1,)


# --- restart, fallback ---------------------------------------------------------------------

def test_daemon_restart_fails_fast_then_reconnects(start_server: StartServer,
                                                   tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    first = start_server(["simple"], "--local-socket", str(path))
    with Client(f"local://{path}", timeout=60) as client, client.shared_memory(4096) as region:
        x = region.copy(A)
        np.testing.assert_array_equal(client.infer("simple", {"INPUT0": x, "INPUT1": B})
                                      ["OUTPUT0"], A + 1)
        first.stop()
        for _ in range(2):  # the in-flight channel breaks, then the socket is gone: fast
            started = time.monotonic()
            with pytest.raises(ShmserveError) as info:
                client.infer("simple", {"INPUT0": A, "INPUT1": B})
            assert info.value.code == grpc.StatusCode.UNAVAILABLE
            assert time.monotonic() - started < 2.0
        assert "local channel" in info.value.message

        second = start_server(["simple"], "--local-socket", str(path))
        # The next call reconnects; the region is registered again on the new channel, and
        # the gRPC calls follow the server to its new port.
        np.testing.assert_array_equal(client.infer("simple", {"INPUT0": x, "INPUT1": B})
                                      ["OUTPUT0"], A + 1)
        assert client.is_server_ready()
        assert region.name in client.shared_memory_status()
        assert suite.settled(lambda: client.model_statistics("simple")[0].inference_count,
                             1) == 1
        assert client.transport == "shm"
    wait_for(lambda: channel_regions(second) == 0)


def test_async_daemon_restart_fails_fast_then_reconnects(start_server: StartServer,
                                                         tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    first = start_server(["simple"], "--local-socket", str(path))
    holder: list[ServerProcess] = []

    async def main() -> None:
        async with AsyncClient(f"local://{path}") as client:
            async with client.shared_memory(4096) as region:
                x = region.copy(A)
                await client.infer("simple", {"INPUT0": x, "INPUT1": B})
                await asyncio.get_running_loop().run_in_executor(None, first.stop)
                for _ in range(2):
                    started = time.monotonic()
                    with pytest.raises(ShmserveError) as info:
                        await client.infer("simple", {"INPUT0": A, "INPUT1": B})
                    assert info.value.code == grpc.StatusCode.UNAVAILABLE
                    assert time.monotonic() - started < 2.0
                holder.append(await asyncio.get_running_loop().run_in_executor(
                    None, start_server, ["simple"], "--local-socket", str(path)))
                out = await client.infer("simple", {"INPUT0": x, "INPUT1": B})
                np.testing.assert_array_equal(out["OUTPUT0"], A + 1)
                assert await client.is_server_ready()
                assert region.name in await client.shared_memory_status()

    asyncio.run(main())


def test_default_socket_is_found_from_the_grpc_url(start_server: StartServer,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    server = start_server(["simple"])
    assert os.path.exists(default_socket_path(server.port))
    with caplog.at_level(logging.WARNING, logger="shmserve.client"), \
            Client(server.url, transport="shm") as client:
        np.testing.assert_array_equal(client.infer("simple", {"INPUT0": A, "INPUT1": B})
                                      ["OUTPUT0"], A + 1)
        assert client.transport == "shm"

    async def main() -> str:
        async with AsyncClient(f"localhost:{server.port}", transport="shm") as client:
            await client.infer("simple", {"INPUT0": A, "INPUT1": B})
            return client.transport

    assert asyncio.run(main()) == "shm"
    assert [r for r in caplog.records if r.name == "shmserve.client"] == []


@pytest.mark.parametrize("case", ["no socket", "socket off", "other server", "not this host"])
def test_fallback_to_grpc_with_one_log_line(case: str, start_server: StartServer,
                                            tmp_path: Path,
                                            caplog: pytest.LogCaptureFixture) -> None:
    kwargs: dict[str, Any] = {}
    if case == "socket off":
        server = start_server(["simple"], "--local-socket", "none")
        url = server.url
    else:
        server = start_server(["simple"], "--local-socket", str(tmp_path / "s.sock"))
        url = server.url
        if case == "no socket":
            kwargs["local_socket"] = str(tmp_path / "missing.sock")
        elif case == "other server":
            other = start_server(["simple"], "--local-socket", str(tmp_path / "other.sock"))
            kwargs["local_socket"] = str(tmp_path / "other.sock")
            assert other.port != server.port
        else:
            url = f"192.0.2.1:{server.port}"  # TEST-NET: never this host
    with caplog.at_level(logging.INFO, logger="shmserve.client"), \
            Client(url, transport="shm", timeout=5, **kwargs) as client:
        if case == "not this host":
            with pytest.raises(ShmserveError) as info:  # gRPC then finds nobody there
                client.infer("simple", {"INPUT0": A, "INPUT1": B}, timeout=0.5)
            assert info.value.code in (grpc.StatusCode.UNAVAILABLE,
                                       grpc.StatusCode.DEADLINE_EXCEEDED)
        else:
            for _ in range(3):
                np.testing.assert_array_equal(
                    client.infer("simple", {"INPUT0": A, "INPUT1": B})["OUTPUT0"], A + 1)
            with client.shared_memory(4096) as region:
                assert region.name in client.shared_memory_status()
        assert client.transport == "grpc"
    lines = [r.getMessage() for r in caplog.records if r.name == "shmserve.client"]
    assert len(lines) == 1, lines
    reasons = {"no socket": ["No such file or directory"],
               "socket off": ["No such file or directory", "Connection refused"],
               "other server": ["belongs to the server at"],
               "not this host": ["192.0.2.1 is not this host"]}[case]
    assert lines[0].startswith("local channel"), lines[0]
    assert any(reason in lines[0] for reason in reasons), lines[0]
    assert lines[0].endswith(f"using gRPC at {url}"), lines[0]


CHILD_AS_NOBODY = """
import logging, os, sys
import numpy as np
from shmserve.client import Client
logging.basicConfig(level=logging.WARNING, format="%(name)s %(message)s")
os.setgid(65534)
os.setuid(65534)
x = np.ones((1, 16), np.int32)
with Client(sys.argv[1], transport="shm", local_socket=sys.argv[2]) as client:
    print("SUM", int(client.infer("simple", {"INPUT0": x, "INPUT1": x})["OUTPUT0"].sum()),
          client.transport, flush=True)
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as another user")
def test_permission_denied_falls_back_to_grpc(start_server: StartServer, tmp_path: Path) -> None:
    path = tmp_path / "private" / "s.sock"
    path.parent.mkdir(mode=0o700)
    server = start_server(["simple"], "--local-socket", str(path))
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(CHILD_AS_NOBODY), server.url,
                           str(path)], capture_output=True, text=True, timeout=60, cwd="/")
    assert done.returncode == 0, done.stderr
    assert "SUM 32 grpc" in done.stdout
    (line,) = [ln for ln in done.stderr.splitlines() if ln.startswith("shmserve.client")]
    assert f"local channel at {path} unavailable (Permission denied); using gRPC at " \
           f"{server.url}" in line


def test_local_url_without_a_server_is_unavailable(tmp_path: Path) -> None:
    with Client(f"local://{tmp_path}/nobody.sock") as client:
        for call in (lambda: client.infer("simple", {"INPUT0": A, "INPUT1": B}),
                     client.is_server_live):
            with pytest.raises(ShmserveError) as info:
                call()
            assert info.value.code == grpc.StatusCode.UNAVAILABLE
            assert info.value.message == (f"cannot open the local channel at {tmp_path}/"
                                          f"nobody.sock: No such file or directory")
    with pytest.raises(ShmserveError) as info:
        Client("local:///x.sock", transport="grpc")
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(ShmserveError):
        Client("127.0.0.1:1", transport="carrier-pigeon")


def test_raw_channel_handshake_and_ops(local_server: LocalServer) -> None:
    """The protocol under the client: hello, ping, unknown op, doorbell-only socket."""
    channel = LocalChannel(local_server.socket)
    try:
        assert channel.hello["v"] == 2 and channel.grpc_address == local_server.grpc_url
        assert channel.call({"op": "ping"}, timeout=10) == {"id": 1}
        with pytest.raises(ShmserveError) as info:
            channel.call({"op": "frobnicate"}, timeout=10)
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.message == "unknown operation 'frobnicate'"
        # The rings live in a memfd: nothing named in /dev/shm.
        assert not [n for n in os.listdir("/dev/shm") if "local" in n]
    finally:
        channel.close()


@pytest.mark.parametrize("change, what", [
    ({"in": [["INPUT0", "INT32", [1, "16"], "b", A.tobytes()]]}, "integer dims"),
    ({"in": [["INPUT0", "INT32", [1, 16], "b", "not bytes"]]}, "tensor data must be bytes"),
    ({"in": [["INPUT0", "INT32", [1, 16], "r", 7, 0, 64]]}, "bad region reference"),
    ({"in": 5}, "malformed local-channel request"),
    ({"out": [[3]]}, "output names must be strings"),
    ({"p": {"mode": [1, 2]}}, "unsupported parameter value [1, 2]"),
    ({"rid": 12}, "rid must be a string"),
    ({"t": "soon"}, "deadline 'soon'"),
])
def test_malformed_infer_messages_are_invalid_argument(local_server: LocalServer,
                                                       change: dict[str, Any],
                                                       what: str) -> None:
    """A hostile or buggy client's message is refused with INVALID_ARGUMENT; the channel
    stays open and the next request is served."""
    channel = LocalChannel(local_server.socket)
    good = {"op": "infer", "model": "simple", "version": "", "rid": "",
            "in": [["INPUT0", "INT32", [1, 16], "b", A.tobytes()],
                   ["INPUT1", "INT32", [1, 16], "b", B.tobytes()]], "out": [], "p": {}}
    try:
        with pytest.raises(ShmserveError) as info:
            channel.call({**good, **change}, timeout=10)
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT, info.value
        assert what in info.value.message
        reply = channel.call(dict(good), timeout=10)
        sums = np.frombuffer(reply["out"][0][3], dtype=np.int32)
        np.testing.assert_array_equal(sums, (A + B).ravel())
    finally:
        channel.close()


def test_grpc_callers_cannot_reach_channel_regions(local_server: LocalServer) -> None:
    """A channel's regions are private: gRPC can neither see, use, nor unregister them."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException
    with Client(local_server.url) as local, local.shared_memory(4096) as mine:
        x = mine.copy(A)
        channel_id = local._link.current().channel_id  # type: ignore[union-attr]
        private = f"@{channel_id}:{mine.name}"
        with grpcclient.InferenceServerClient(local_server.grpc_url) as triton:
            assert private not in str(triton.get_system_shared_memory_status())
            with pytest.raises(InferenceServerException) as error:
                triton.get_system_shared_memory_status(private)
            assert error.value.status() == "StatusCode.NOT_FOUND"
            tensor = grpcclient.InferInput("INPUT0", [1, 16], "INT32")
            tensor.set_shared_memory(private, 64)
            other = grpcclient.InferInput("INPUT1", [1, 16], "INT32")
            other.set_data_from_numpy(B)
            with pytest.raises(InferenceServerException) as error:
                triton.infer("simple", [tensor, other])
            assert error.value.message() == f"Unable to find shared memory region: '{private}'"
            with pytest.raises(InferenceServerException) as error:
                triton.register_system_shared_memory("@9:x", mine.key, 64)
            assert error.value.status() == "StatusCode.INVALID_ARGUMENT"
            triton.unregister_system_shared_memory(private)
            triton.unregister_system_shared_memory(
                "", headers={"shmserve-client-id": f"local:{channel_id}"})
        assert channel_regions(local_server, channel_id) == 1
        np.testing.assert_array_equal(local.infer("simple", {"INPUT0": x, "INPUT1": B})
                                      ["OUTPUT0"], A + 1)
