"""Worker processes: crashes, restarts, broken models, draining, and shared-memory cleanup."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from shmserve.tests.conftest import StartServer
from shmserve.tests.serverproc import ServerProcess, arena_segments, worker_pids


def _crasher(value: int) -> list[grpcclient.InferInput]:
    tensor = grpcclient.InferInput("INPUT0", [1], "INT32")
    tensor.set_data_from_numpy(np.array([value], dtype=np.int32))
    return [tensor]


def _wait_ready(client: grpcclient.InferenceServerClient, model: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client.is_model_ready(model):
            return
        time.sleep(0.05)
    raise TimeoutError(f"{model} not ready again after {timeout}s")


def _infer_in_thread(url: str, value: int) -> tuple[threading.Thread, dict[str, object]]:
    outcome: dict[str, object] = {}

    def run() -> None:
        with grpcclient.InferenceServerClient(url) as client:
            started = time.monotonic()
            try:
                outcome["result"] = client.infer("crasher", _crasher(value), client_timeout=30)
            except InferenceServerException as exc:
                outcome["error"] = exc
            outcome["seconds"] = time.monotonic() - started

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


def test_worker_killed_mid_request(start_server: StartServer) -> None:
    server = start_server(["crasher", "simple"])
    with grpcclient.InferenceServerClient(server.url) as client:
        first_pid = int(client.infer("crasher", _crasher(5)).as_numpy("PID")[0])
        thread, outcome = _infer_in_thread(server.url, 2)   # sleeps 1 s in the model
        time.sleep(0.3)
        os.kill(first_pid, signal.SIGKILL)
        thread.join(20)
        error = outcome.get("error")
        assert isinstance(error, InferenceServerException), outcome
        assert error.status() == "StatusCode.UNAVAILABLE"
        assert "crasher_0_0" in error.message() and "SIGKILL" in error.message()
        assert outcome["seconds"] < 1.0 + 5.0  # failed at the kill, not after a long timeout
        _wait_ready(client, "crasher")
        again = client.infer("crasher", _crasher(9))
        assert again.as_numpy("OUTPUT0").tolist() == [9]
        assert int(again.as_numpy("PID")[0]) != first_pid
        assert client.is_model_ready("simple")
        stats = client.get_inference_statistics("crasher").model_stats[0]
        assert stats.inference_stats.fail.count >= 1


def test_model_that_kills_its_own_process(start_server: StartServer) -> None:
    server = start_server(["crasher"])
    with grpcclient.InferenceServerClient(server.url) as client:
        for _ in range(3):  # repeated crashes restart each time
            with pytest.raises(InferenceServerException) as error:
                client.infer("crasher", _crasher(1), client_timeout=20)
            assert error.value.status() == "StatusCode.UNAVAILABLE"
            _wait_ready(client, "crasher")
        assert client.infer("crasher", _crasher(3)).as_numpy("OUTPUT0").tolist() == [3]
    assert "was killed by signal SIGKILL" in server.log()


def test_broken_models_beside_good_ones(start_server: StartServer) -> None:
    server = start_server(["simple", "init_fails", "broken_config"], "--exit-on-error", "false",
                          wait=False)
    server.wait_started()
    with grpcclient.InferenceServerClient(server.url) as client:
        assert client.is_model_ready("simple")
        assert not client.is_model_ready("init_fails")
        assert not client.is_model_ready("broken_config")
        index = {m.name: m for m in client.get_model_repository_index().models}
        assert index["init_fails"].state == "UNAVAILABLE"
        assert "weights file is corrupt" in index["init_fails"].reason
        broken = index["broken_config"]
        assert broken.state == "UNAVAILABLE"
        assert "broken_config/config.pbtxt" in broken.reason and "data_typo" in broken.reason
        with pytest.raises(InferenceServerException) as error:
            client.infer("init_fails", [grpcclient.InferInput("INPUT0", [1], "FP32")])
        assert error.value.status() == "StatusCode.NOT_FOUND"
        inputs = [grpcclient.InferInput(n, [1, 16], "INT32") for n in ("INPUT0", "INPUT1")]
        for tensor in inputs:
            tensor.set_data_from_numpy(np.ones((1, 16), np.int32))
        assert client.infer("simple", inputs).as_numpy("OUTPUT0").tolist() == [[2] * 16]
    log = server.log()
    assert "weights file is corrupt" in log and "data_typo" in log


def test_arenas_removed_after_worker_sigkill(start_server: StartServer) -> None:
    server = start_server(["identity_fp32"])
    data = np.ones(1 << 20, dtype=np.float32)  # 4 MiB: goes through both arenas
    with grpcclient.InferenceServerClient(server.url) as client:
        tensor = grpcclient.InferInput("INPUT0", [data.size], "FP32")
        tensor.set_data_from_numpy(data)
        client.infer("identity_fp32", [tensor])
        segments = arena_segments(server.pid)
        worker_arena = re.compile(r"_w\d+g1o\d+_\d+$")  # generation 1's output arena, any lane
        assert any(name.endswith("_1") and worker_arena.search(name) for name in segments), \
            segments
        for pid in worker_pids(server.pid):
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while any(worker_arena.search(s) for s in arena_segments(server.pid)) and \
                time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(worker_arena.search(s) for s in arena_segments(server.pid))
        _wait_ready(client, "identity_fp32")
        result = client.infer("identity_fp32", [tensor])
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), data)


def test_sigterm_drains_in_flight_requests(start_server: StartServer) -> None:
    server = start_server(["crasher"])
    thread, outcome = _infer_in_thread(server.url, 2)   # takes 1 s
    time.sleep(0.3)
    server.process.send_signal(signal.SIGTERM)
    thread.join(20)
    assert "result" in outcome, outcome
    assert server.process.wait(20) == 0
    assert arena_segments(server.pid) == []


def test_supervisor_sigkill_takes_workers_down(start_server: StartServer,
                                               tmp_path: Path) -> None:
    server = start_server(["identity_fp32", "simple"])
    workers = worker_pids(server.pid)
    assert len(workers) == 2
    with grpcclient.InferenceServerClient(server.url) as client:
        tensor = grpcclient.InferInput("INPUT0", [1 << 20], "FP32")
        tensor.set_data_from_numpy(np.ones(1 << 20, np.float32))
        client.infer("identity_fp32", [tensor])
    server.process.kill()
    server.process.wait(10)
    deadline = time.monotonic() + 10
    while any(os.path.exists(f"/proc/{pid}") and _state(pid) != "Z" for pid in workers) and \
            time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(not os.path.exists(f"/proc/{pid}") or _state(pid) == "Z" for pid in workers)
    assert arena_segments(server.pid), "expected the killed server's arenas to be left behind"
    ServerProcess(server.repository).stop()  # a fresh start cleans up after the dead one
    successor = ServerProcess(server.repository)
    try:
        successor.wait_ready()
        assert arena_segments(server.pid) == []
    finally:
        successor.stop()


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "X"


def test_requests_spread_over_instances(start_server: StartServer) -> None:
    server = start_server(["two_instances"])
    pids: list[int] = []
    lock = threading.Lock()

    def call() -> None:
        with grpcclient.InferenceServerClient(server.url) as client:
            result = client.infer("two_instances", [_input_int32()])
            with lock:
                pids.append(int(result.as_numpy("PID")[0]))

    threads = [threading.Thread(target=call) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert len(pids) == 4
    assert len(set(pids)) == 2, pids
    assert sorted(set(pids)) == worker_pids(server.pid)


def _input_int32() -> grpcclient.InferInput:
    tensor = grpcclient.InferInput("INPUT0", [1], "INT32")
    tensor.set_data_from_numpy(np.array([0], dtype=np.int32))
    return tensor


@pytest.mark.skipif(os.path.isdir("/proc/driver/nvidia/gpus"), reason="host has GPUs")
def test_kind_gpu_without_gpus_fails_clearly(start_server: StartServer) -> None:
    server = start_server(["gpu_only", "simple"], "--exit-on-error", "false", wait=False)
    server.wait_started()
    with grpcclient.InferenceServerClient(server.url) as client:
        assert client.is_model_ready("simple")
        index = {m.name: m for m in client.get_model_repository_index().models}
        assert index["gpu_only"].state == "UNAVAILABLE"
        assert "KIND_GPU but no GPUs are available" in index["gpu_only"].reason
