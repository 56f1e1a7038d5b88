"""Worker lifecycle limits on real servers: restarts after external kills stay quick, a model
that keeps crashing at start is visibly crash-looping, a hung initialize or execute and a
stopped worker are killed after their timeouts, and SIGTERM ends within one exit timeout.

Small timeouts (flags and config parameters) keep each test to a few seconds."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from shmserve.tests.conftest import StartServer
from shmserve.tests.serverproc import build_repository, worker_pids


def _int_input(value: int) -> list[grpcclient.InferInput]:
    tensor = grpcclient.InferInput("INPUT0", [1], "INT32")
    tensor.set_data_from_numpy(np.array([value], dtype=np.int32))
    return [tensor]


def _seconds_input(seconds: float) -> list[grpcclient.InferInput]:
    tensor = grpcclient.InferInput("SECONDS", [1], "FP32")
    tensor.set_data_from_numpy(np.array([seconds], dtype=np.float32))
    return [tensor]


def _wait_for(condition: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll until ``condition`` holds; returns the seconds it took."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if condition():
            return time.monotonic() - started
        time.sleep(0.02)
    raise TimeoutError(f"{what}: not after {timeout}s")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _index_entry(client: grpcclient.InferenceServerClient, model: str) -> tuple[str, str]:
    for entry in client.get_model_repository_index().models:
        if entry.name == model:
            return entry.state, entry.reason
    raise KeyError(model)


def _pid_of(client: grpcclient.InferenceServerClient, model: str = "crash_loop") -> int:
    return int(client.infer(model, _int_input(1), client_timeout=10).as_numpy("PID")[0])


def _served_again(client: grpcclient.InferenceServerClient, old_pid: int) -> Callable[[], bool]:
    def check() -> bool:
        try:
            return _pid_of(client) != old_pid
        except InferenceServerException:
            return False
    return check


# --- restarts -------------------------------------------------------------------------------
def test_restarts_after_repeated_external_kills_stay_quick(start_server: StartServer) -> None:
    """Issue 21 #7: each kill of a worker that served used to double the next restart's
    delay (0.14 s ... 10 s after eight kills); a worker that served restarts at once."""
    server = start_server(["crash_loop"])
    times = []
    with grpcclient.InferenceServerClient(server.url) as client:
        pid = _pid_of(client)
        for _ in range(8):
            os.kill(pid, signal.SIGKILL)
            times.append(_wait_for(_served_again(client, pid), 30, "serving after a kill"))
            pid = _pid_of(client)
            time.sleep(0.1)
    assert max(times) < 3.0, times
    assert sum(times[4:]) < sum(times[:4]) + 2.0, times  # not growing


@pytest.mark.parametrize("mode", ["init", "after"])
def test_a_crash_looping_model_is_visible(start_server: StartServer, tmp_path: Path,
                                          mode: str) -> None:
    """Workers that die while initializing, or right after start without serving, back off
    and the model reads as crash-looping: ModelReady false, the index reason, the metric,
    one log line per backoff step. Once a worker serves again it is over."""
    repository = build_repository(tmp_path / "repo", ["crash_loop", "simple"])
    server = start_server(None, "--restart-backoff-max-secs", "0.8", repository=repository)
    marker = repository / "crash_loop" / "CRASH"
    with grpcclient.InferenceServerClient(server.url) as client:
        pid = _pid_of(client)
        marker.write_text(mode)
        os.kill(pid, signal.SIGKILL)

        def crash_looping() -> bool:
            return "crash-looping" in _index_entry(client, "crash_loop")[1]

        _wait_for(crash_looping, 20, "crash-looping in the index")
        assert not client.is_model_ready("crash_loop")
        state, reason = _index_entry(client, "crash_loop")
        assert state == "READY"  # loaded; its instance is not serving
        assert "crash_loop_0_0" in reason and re.search(r"\d+ restarts?;", reason), reason
        assert "SIGABRT" in reason or "exited" in reason or "initializing" in reason, reason
        assert server.metric("shmserve_instance_crash_looping", "crash_loop") == 1.0
        assert client.is_model_ready("simple")
        steps = re.findall(r"instance crash_loop_0_0 failed \d+ start\(s\) in a row.*"
                           r"restarting in", server.log())
        assert len(steps) >= 2, server.log()
        marker.unlink()
        _wait_for(lambda: client.is_model_ready("crash_loop"), 20, "ready again")
        assert _pid_of(client) != pid
        assert "crash-looping" not in _index_entry(client, "crash_loop")[1]
        assert server.metric("shmserve_instance_crash_looping", "crash_loop") == 0.0


# --- timeouts -------------------------------------------------------------------------------
def test_a_hung_initialize_fails_the_load_after_the_init_timeout(start_server: StartServer,
                                                                 tmp_path: Path) -> None:
    """A model whose initialize never returns fails to load after --model-init-timeout-secs,
    naming the stage; a model's own shmserve.init_timeout_secs overrides the flag."""
    repository = build_repository(tmp_path / "repo", ["init_hangs", "slow_init", "simple"])
    started = time.monotonic()
    server = start_server(None, "--model-init-timeout-secs", "1", "--exit-on-error=false",
                          repository=repository, wait=False)
    server.wait_started(timeout=25)
    assert time.monotonic() - started < 20
    with grpcclient.InferenceServerClient(server.url) as client:
        state, reason = _index_entry(client, "init_hangs")
        assert state == "UNAVAILABLE", (state, reason)
        assert "instance_initialize" in reason and "timeout of 1s" in reason, reason
        assert client.is_model_ready("slow_init")  # 2 s, within its own 10 s
        assert client.is_model_ready("simple")
    assert len(server.log().split("stuck in instance_initialize")) == 2  # logged once
    assert len(worker_pids(server.pid)) == 2  # the hung worker was killed


def test_a_hung_execute_is_replaced_after_the_execution_timeout(start_server: StartServer,
                                                                tmp_path: Path) -> None:
    repository = build_repository(tmp_path / "repo", ["sleeper"])
    config = repository / "sleeper" / "config.pbtxt"
    config.write_text(config.read_text() + 'parameters { key: "shmserve.execution_timeout_secs" '
                      'value: { string_value: "1" } }\n')
    server = start_server(repository=repository)
    [first_pid] = worker_pids(server.pid)
    with grpcclient.InferenceServerClient(server.url) as client:
        assert client.infer("sleeper", _seconds_input(0.25)).as_numpy("SLEPT").tolist() == [0.25]
        started = time.monotonic()
        with pytest.raises(InferenceServerException) as error:
            client.infer("sleeper", _seconds_input(600), client_timeout=15)
        assert time.monotonic() - started < 3
        assert error.value.status() == "StatusCode.UNAVAILABLE"
        assert "sleeper_0_0" in error.value.message()
        assert "execution timeout of 1s" in error.value.message()
        _wait_for(lambda: client.is_model_ready("sleeper"), 10, "sleeper ready again")
        assert client.infer("sleeper", _seconds_input(0.0)).as_numpy("SLEPT").tolist() == [0.0]
    assert not _alive(first_pid)
    assert worker_pids(server.pid) != [first_pid]


def test_a_stopped_worker_is_replaced_after_the_heartbeat_timeout(
        start_server: StartServer) -> None:
    server = start_server(["crash_loop", "simple"], "--worker-heartbeat-timeout-secs", "3")
    with grpcclient.InferenceServerClient(server.url) as client:
        pid = _pid_of(client)
        os.kill(pid, signal.SIGSTOP)
        stopped = time.monotonic()
        _wait_for(lambda: not client.is_model_ready("crash_loop"), 10,
                  "ModelReady false while stopped")
        assert _alive(pid)  # not ready before it is killed
        assert time.monotonic() - stopped < 3
        _wait_for(lambda: not _alive(pid), 10, "the stopped worker killed")
        assert time.monotonic() - stopped < 5.5
        _wait_for(_served_again(client, pid), 10, "serving again")
        assert client.is_model_ready("crash_loop") and client.is_model_ready("simple")
    assert "sent no heartbeat" in server.log()


# --- shutdown -------------------------------------------------------------------------------
def test_sigterm_with_a_hung_instance_ends_within_the_exit_timeout(
        start_server: StartServer) -> None:
    """Draining and stopping share one --exit-timeout-secs (it used to be three of them)."""
    server = start_server(["sleeper", "simple"], "--exit-timeout-secs", "3")
    outcome: dict[str, object] = {}

    def hang() -> None:
        with grpcclient.InferenceServerClient(server.url) as client:
            try:
                client.infer("sleeper", _seconds_input(600), client_timeout=60)
            except InferenceServerException as exc:
                outcome["error"] = exc

    thread = threading.Thread(target=hang, daemon=True)
    thread.start()
    time.sleep(1.0)  # inside execute
    started = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    code = server.process.wait(30)
    elapsed = time.monotonic() - started
    thread.join(10)
    assert code == 0, server.log()
    assert elapsed < 3 + 2.0, (elapsed, server.log())
    error = outcome.get("error")
    assert isinstance(error, InferenceServerException), outcome
    assert error.status() == "StatusCode.UNAVAILABLE"
    assert "sleeper_0_0" in error.message() and "unloaded" in error.message(), error.message()


def test_the_unit_lets_the_whole_exit_timeout_run() -> None:
    from shmserve.daemon.settings import Settings
    unit = (Path(__file__).parent.parent / "systemd" / "shmserve.service").read_text()
    stop = re.search(r"^TimeoutStopSec=(\d+)$", unit, re.MULTILINE)
    assert stop is not None
    default = Settings(model_repository="").exit_timeout_secs
    assert int(stop.group(1)) >= default + 10  # the exit timeout plus room for the exit itself
