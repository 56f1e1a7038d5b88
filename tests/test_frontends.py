"""--grpc-frontends N: gRPC (and HTTP) served by N processes past one core.

Whichever process a call reaches, it is answered the same: regions, statistics, model state
live in the core. A frontend SIGKILLed under load fails only its own requests and is started
again; SIGTERM drains every frontend; nothing is left in /dev/shm. The gRPC suite's modules
(test_server, test_errors, test_streaming, test_system_shm) and test_http run with 2 frontends
too (their ``server`` fixtures).
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from shmserve.daemon.frontend_process.pool import frontend_count
from shmserve.tests.serverproc import (
    ServerProcess,
    arena_segments,
    frontend_pids,
    thread_io,
)
from shmserve.workers.lineage import process_alive

StartServer = Callable[..., ServerProcess]
SEGMENT = f"/shmserve_test_frontends_{os.getpid()}"


def frontend_series(server: ServerProcess, name: str) -> dict[int, int]:
    """shmserve_frontend_<name>{frontend="i"} from the metrics page, by frontend."""
    return {int(index): int(float(value)) for index, value in re.findall(
        rf'^shmserve_frontend_{name}{{frontend="(\d+)"}} (\S+)$', server.metrics_page(),
        re.MULTILINE)}


def new_client(server: ServerProcess) -> grpcclient.InferenceServerClient:
    # Its own connection: gRPC shares one between channels to the same target otherwise.
    return grpcclient.InferenceServerClient(
        server.url, channel_args=[("grpc.use_local_subchannel_pool", 1),
                                  ("grpc.max_send_message_length", -1),
                                  ("grpc.max_receive_message_length", -1)])


def client_per_frontend(server: ServerProcess, count: int
                        ) -> dict[int, grpcclient.InferenceServerClient]:
    """A client connected to each frontend, told apart by the frontends' request counters:
    the kernel spreads new connections (SO_REUSEPORT)."""
    found: dict[int, grpcclient.InferenceServerClient] = {}
    for _ in range(60):
        if len(found) == count:
            return found
        client = new_client(server)
        before = frontend_series(server, "requests_total")
        assert client.is_server_live()
        after = frontend_series(server, "requests_total")
        grew = [index for index in after if after[index] > before.get(index, 0)]
        if len(grew) == 1 and grew[0] not in found:
            found[grew[0]] = client
        else:
            client.close()
    raise AssertionError(f"connections never reached every frontend: {sorted(found)}")


@pytest.fixture
def shm_segment() -> Iterator[tuple[str, int]]:
    fd = os.open(f"/dev/shm{SEGMENT}", os.O_CREAT | os.O_RDWR, 0o600)
    os.ftruncate(fd, 4096)
    yield SEGMENT, fd
    os.close(fd)
    os.unlink(f"/dev/shm{SEGMENT}")


def simple_inputs(value: int, region: str | None = None) -> list[grpcclient.InferInput]:
    inputs = [grpcclient.InferInput(name, [1, 16], "INT32") for name in ("INPUT0", "INPUT1")]
    if region is None:
        inputs[0].set_data_from_numpy(np.full((1, 16), value, np.int32))
    else:
        inputs[0].set_shared_memory(region, 64)
    inputs[1].set_data_from_numpy(np.ones((1, 16), np.int32))
    return inputs


def test_the_default_count_follows_the_cores() -> None:
    assert frontend_count(3) == 3
    cores = len(os.sched_getaffinity(0))
    assert frontend_count(0) == max(1, min(8, cores // 4))


def test_a_region_registered_through_one_frontend_serves_the_next(
        start_server: StartServer, shm_segment: tuple[str, int]) -> None:
    server = start_server(["simple"], "--grpc-frontends", "2")
    assert len(frontend_pids(server.pid)) == 2
    clients = client_per_frontend(server, 2)
    key, fd = shm_segment
    os.pwrite(fd, np.full(16, 7, np.int32).tobytes(), 0)
    try:
        for registrar, user in ((0, 1), (1, 0)):
            clients[registrar].register_system_shared_memory("in", key, 64)
            status = clients[user].get_system_shared_memory_status()
            assert [region.name for region in status.regions.values()] == ["in"]
            before = frontend_series(server, "requests_total")
            result = clients[user].infer("simple", simple_inputs(0, region="in"))
            assert result.as_numpy("OUTPUT0").tolist() == [[8] * 16]
            after = frontend_series(server, "requests_total")
            assert after[user] == before[user] + 1 and after[registrar] == before[registrar]
            clients[user].unregister_system_shared_memory("in")
            assert not clients[registrar].get_system_shared_memory_status().regions
        # Statistics, model state and health are the core's: the same through either.
        stats = [c.get_inference_statistics("simple").model_stats[0].inference_stats
                 for c in clients.values()]
        assert stats[0].success.count == stats[1].success.count == 2
        assert all(c.is_model_ready("simple") and c.is_server_ready()
                   for c in clients.values())
        assert server.metric("nv_inference_request_success", "simple") == 2
    finally:
        for client in clients.values():
            client.close()


def test_a_frontend_killed_under_load_fails_only_its_requests_and_comes_back(
        start_server: StartServer) -> None:
    server = start_server(["simple", "sleeper"], "--grpc-frontends", "2")
    clients = client_per_frontend(server, 2)
    victim, survivor = clients[0], clients[1]
    pids = frontend_series(server, "pid")
    stop = threading.Event()
    survivor_errors: list[BaseException] = []
    survivor_answers = [0]

    def load() -> None:  # the other frontend keeps serving meanwhile
        while not stop.is_set():
            try:
                result = survivor.infer("simple", simple_inputs(2), client_timeout=20)
                assert result.as_numpy("OUTPUT0").tolist() == [[3] * 16]
                survivor_answers[0] += 1
            except BaseException as exc:
                survivor_errors.append(exc)
                return

    outcomes: list[object] = []
    done = threading.Semaphore(0)

    def collect(result: object, error: object) -> None:
        outcomes.append(error if error is not None else result)
        done.release()

    loader = threading.Thread(target=load)
    loader.start()
    try:
        seconds = grpcclient.InferInput("SECONDS", [1], "FP32")
        seconds.set_data_from_numpy(np.array([1.0], np.float32))
        for _ in range(4):  # two sent to the worker (--pipeline-depth), two queued
            victim.async_infer("sleeper", [seconds], collect, client_timeout=30)
        deadline = time.monotonic() + 10
        while server.metric("nv_inference_pending_request_count", "sleeper") < 2:
            assert time.monotonic() < deadline, "the sleeper requests never queued"
            time.sleep(0.02)
        os.kill(pids[0], signal.SIGKILL)
        for _ in range(4):
            assert done.acquire(timeout=30)
        assert all(isinstance(o, InferenceServerException) and o.status() ==
                   "StatusCode.UNAVAILABLE" for o in outcomes), outcomes
        deadline = time.monotonic() + 30
        while frontend_series(server, "restarts_total")[0] != 1 or \
                len(frontend_pids(server.pid)) != 2:
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.05)
        assert frontend_series(server, "pid")[0] not in (0, pids[0])
        assert frontend_series(server, "pid")[1] == pids[1]
        time.sleep(0.3)  # the survivor's load runs on across the restart
    finally:
        stop.set()
        loader.join(30)
    assert not survivor_errors and survivor_answers[0] > 0
    # The restarted frontend serves again (and new connections reach both).
    again = client_per_frontend(server, 2)
    for client in again.values():
        assert client.infer("simple", simple_inputs(4)).as_numpy("OUTPUT0")[0, 0] == 5
        client.close()
    assert "gRPC frontend 0" in server.log() and "SIGKILL" in server.log()
    # The core cancelled the dead frontend's queued requests: the sleeper is idle soon.
    deadline = time.monotonic() + 10
    while server.metric("nv_inference_pending_request_count", "sleeper") != 0:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    for client in clients.values():
        client.close()


def test_http_is_served_by_every_frontend_alike(start_server: StartServer,
                                               shm_segment: tuple[str, int]) -> None:
    """The frontends serve the HTTP port too: inference runs in the frontend that took the
    connection, every other route is the core's (a region registered over HTTP through one
    is used through the other)."""
    server = start_server(["simple"], "--grpc-frontends", "2")
    key, fd = shm_segment
    os.pwrite(fd, np.full(16, 5, np.int32).tobytes(), 0)
    clients: dict[int, httpclient.InferenceServerClient] = {}
    for _ in range(60):  # a connection to each frontend, told apart by their counters
        if len(clients) == 2:
            break
        client = httpclient.InferenceServerClient(server.http_url)
        before = frontend_series(server, "requests_total")
        client.infer("simple", http_inputs(1))
        after = frontend_series(server, "requests_total")
        grew = [index for index in after if after[index] > before[index]]
        if len(grew) == 1 and grew[0] not in clients:
            clients[grew[0]] = client
        else:
            client.close()
    assert len(clients) == 2, "HTTP connections never reached both frontends"
    try:
        clients[0].register_system_shared_memory("http_in", key, 64)
        assert clients[1].get_system_shared_memory_status()[0]["name"] == "http_in"
        result = clients[1].infer("simple", http_inputs(0, region="http_in"))
        assert result.as_numpy("OUTPUT0").tolist() == [[6] * 16]
        clients[1].unregister_system_shared_memory("http_in")
        assert clients[0].get_system_shared_memory_status() == []
        stats = [c.get_inference_statistics("simple")["model_stats"][0]["inference_stats"]
                 for c in clients.values()]
        assert stats[0] == stats[1] and stats[0]["success"]["count"] >= 3
        assert all(c.is_server_ready() and c.is_model_ready("simple")
                   for c in clients.values())
        with pytest.raises(InferenceServerException, match="unknown model"):
            clients[0].get_model_metadata("nope")
    finally:
        for client in clients.values():
            client.close()


def http_inputs(value: int, region: str | None = None) -> list[httpclient.InferInput]:
    inputs = [httpclient.InferInput(name, [1, 16], "INT32") for name in ("INPUT0", "INPUT1")]
    if region is None:
        inputs[0].set_data_from_numpy(np.full((1, 16), value, np.int32))
    else:
        inputs[0].set_shared_memory(region, 64)
    inputs[1].set_data_from_numpy(np.ones((1, 16), np.int32))
    return inputs


def test_sigterm_drains_every_frontend_and_leaves_nothing(start_server: StartServer,
                                                          tmp_path: Path) -> None:
    server = start_server(["sleeper"], "--grpc-frontends", "2")
    clients = client_per_frontend(server, 2)
    pids = frontend_pids(server.pid)
    outcomes: list[object] = []
    done = threading.Semaphore(0)

    def collect(result: object, error: object) -> None:
        outcomes.append(error if error is not None else result)
        done.release()

    seconds = grpcclient.InferInput("SECONDS", [1], "FP32")
    seconds.set_data_from_numpy(np.array([0.4], np.float32))
    for client in clients.values():
        for _ in range(2):
            client.async_infer("sleeper", [seconds], collect, client_timeout=30)
    deadline = time.monotonic() + 10
    while server.metric("nv_inference_pending_request_count", "sleeper") < 2:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    server.process.send_signal(signal.SIGTERM)
    for _ in range(4):
        assert done.acquire(timeout=30)
    assert all(isinstance(o, grpcclient.InferResult) for o in outcomes), outcomes
    assert server.process.wait(30) == 0, server.log()
    for client in clients.values():
        client.close()
    assert not any(process_alive(pid) for pid in pids)
    assert arena_segments(server.pid) == []
    assert [name for name in os.listdir("/dev/shm") if str(server.pid) in name] == []


def test_a_large_request_crosses_a_frontend_in_memfds(start_server: StartServer) -> None:
    server = start_server(["identity_fp32"], "--grpc-frontends", "2",
                          "--local-ring-bytes", str(1 << 20))
    data = np.random.default_rng(3).random(2 * 1024 * 1024, dtype=np.float32)  # 8 MiB
    for client in client_per_frontend(server, 2).values():
        tensor = grpcclient.InferInput("INPUT0", list(data.shape), "FP32")
        tensor.set_data_from_numpy(data)
        np.testing.assert_array_equal(client.infer("identity_fp32", [tensor])
                                      .as_numpy("OUTPUT0"), data)
        client.close()


def test_a_large_answer_crosses_a_frontend_off_the_supervisors_loop(
        start_server: StartServer) -> None:
    """32 MiB out: the worker answers through its arena (too large for the frontend's direct
    ring, never inline through the supervisor's socket), and the supervisor copies it from
    the arena into the answer's memfd on another thread than its loop's."""
    server = start_server(["identity_fp32"], "--grpc-frontends", "2")
    payload = 32 << 20
    data = np.arange(payload // 4, dtype=np.float32)
    with grpcclient.InferenceServerClient(server.url, channel_args=[
            ("grpc.max_receive_message_length", -1),
            ("grpc.max_send_message_length", -1)]) as client:
        def infer() -> None:
            tensor = grpcclient.InferInput("INPUT0", list(data.shape), "FP32")
            tensor.set_data_from_numpy(data)
            np.testing.assert_array_equal(client.infer("identity_fp32", [tensor])
                                          .as_numpy("OUTPUT0"), data)

        infer()  # threads started, arenas grown
        before = thread_io(server.pid)
        infer()
        after = thread_io(server.pid)
    loop_read = after[server.pid][0] - before[server.pid][0]
    loop_written = after[server.pid][1] - before[server.pid][1]
    assert loop_read < payload // 2, f"the supervisor's loop read {loop_read} bytes"
    assert loop_written < payload // 2, f"the supervisor's loop wrote {loop_written} bytes"


def test_a_port_in_use_fails_the_start(start_server: StartServer) -> None:
    """SO_REUSEPORT would let a second server share the port: it must be refused instead."""
    first = start_server(["simple"], "--grpc-frontends", "2")
    second = ServerProcess(first.repository, "--grpc-frontends", "2", "--grpc-port",
                           str(first.port))
    try:
        assert second.process.wait(60) == 1
        assert "cannot listen on" in second.log() and "Address already in use" in second.log()
    finally:
        second.stop()
    assert first.process.poll() is None


def test_a_unix_grpc_address_is_served_by_the_supervisor(start_server: StartServer,
                                                         tmp_path: Path) -> None:
    """SO_REUSEPORT spreads TCP connections only: with gRPC on a Unix socket the supervisor
    serves it and says the frontends were not started."""
    address = f"unix:{tmp_path}/grpc.sock"
    server = start_server(["simple"], "--grpc-address", address, "--grpc-frontends", "2",
                          wait=False)
    server.wait_started()
    assert "--grpc-frontends 2 ignored" in server.log()
    assert frontend_pids(server.pid) == []
    client = grpcclient.InferenceServerClient(address)
    try:
        assert client.is_server_ready()
        assert client.infer("simple", simple_inputs(1)).as_numpy("OUTPUT0")[0, 0] == 2
    finally:
        client.close()
