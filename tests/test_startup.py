"""Start-up and operator semantics, as tritonserver's: --exit-on-error, --strict-readiness,
the "ready" line, failed reloads, load-failure logging, worker titles, --metrics-address."""

from __future__ import annotations

import re
import socket
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from shmserve.tests.conftest import StartServer
from shmserve.tests.mc_helpers import (
    config_text,
    index,
    infer,
    rpc_error,
    write_model,
)
from shmserve.tests.serverproc import free_port, worker_pids
from shmserve.workers.lineage import SUPERVISOR_ENV

INIT_FAILS_REASON = "weights file is corrupt"


def test_a_model_failing_at_startup_stops_the_server(start_server: StartServer) -> None:
    server = start_server(["simple", "init_fails"], wait=False)
    code = server.process.wait(60)
    log = server.log()
    assert code != 0, log
    assert "1 model(s) failed to load at start-up (init_fails)" in log
    assert "shmserve ready" not in log


def test_exit_on_error_false_keeps_a_strict_server_unready(start_server: StartServer) -> None:
    server = start_server(["simple", "init_fails"], "--exit-on-error", "false", wait=False)
    server.wait_started()
    with grpcclient.InferenceServerClient(server.url) as client:
        assert client.is_server_live()
        assert not client.is_server_ready()
        assert client.is_model_ready("simple") and not client.is_model_ready("init_fails")
    # The ready line counts READY models only.
    assert "shmserve ready: 1 model(s); 1 failed to load" in server.log()
    assert server.process.poll() is None


def test_not_strict_server_is_ready_beside_a_failed_model(start_server: StartServer) -> None:
    server = start_server(["simple", "init_fails"], "--exit-on-error", "false",
                          "--strict-readiness", "false", wait=False)
    server.wait_started()
    with grpcclient.InferenceServerClient(server.url) as client:
        assert client.is_server_ready()
        assert not client.is_model_ready("init_fails")


def test_a_failed_startup_model_loaded_later_makes_the_server_ready(
        start_server: StartServer, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    write_model(repo, "mc_late", {"fail_init": "1"})
    server = start_server(None, "--exit-on-error", "false", "--model-control-mode", "explicit",
                          "--load-model", "mc_late", repository=repo, wait=False)
    server.wait_started()
    with grpcclient.InferenceServerClient(server.url) as client:
        assert not client.is_server_ready()
        (repo / "mc_late" / "config.pbtxt").write_text(config_text("mc_late", {"offset": "1"}))
        client.load_model("mc_late")
        assert client.is_server_ready()
        np.testing.assert_array_equal(infer(client, "mc_late", [1]), [2])


def test_each_load_failure_is_logged_once_with_its_reason(start_server: StartServer) -> None:
    server = start_server(["simple", "init_fails", "broken_config"], "--exit-on-error", "false",
                          wait=False)
    server.wait_started()
    lines = server.log().splitlines()
    corrupt = [line for line in lines if INIT_FAILS_REASON in line]
    assert len(corrupt) == 1, corrupt
    assert "init_fails" in corrupt[0]
    broken = [line for line in lines if "data_typo" in line]
    assert len(broken) == 1 and "broken_config" in broken[0], broken


def test_config_errors_do_not_name_internal_types(start_server: StartServer,
                                                  tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "mc_typo" / "1").mkdir(parents=True)
    (repo / "mc_typo" / "config.pbtxt").write_text('name: "mc_typo"\nbackend: "python"\n'
                                                   "max_batch_sise: 4\n")
    server = start_server(None, "--exit-on-error", "false", "--model-control-mode", "explicit",
                          "--load-model", "mc_typo", repository=repo, wait=False)
    server.wait_started()
    with grpcclient.InferenceServerClient(server.url) as client:
        [entry] = index(client)["mc_typo"]
        assert 'Message type "ModelConfig" has no field named "max_batch_sise"' in \
            entry["reason"]
        write_model(repo, "mc_ok")
        error = rpc_error(lambda: client.load_model(
            "mc_ok", config='{"name": "mc_ok", "input": [{"data_type": "TYPE_NOPE"}]}'))
        assert "Invalid config override" in error.message()
        messages = [error.message(), entry["reason"], server.log()]
    for text in messages:
        assert "shmserve.inference" not in text


def test_a_failed_reload_says_the_old_version_keeps_serving(start_server: StartServer,
                                                            tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    write_model(repo, "mc_reload", {"offset": "1"})
    server = start_server(None, "--model-control-mode", "explicit", "--load-model",
                          "mc_reload", repository=repo)
    with grpcclient.InferenceServerClient(server.url) as client:
        (repo / "mc_reload" / "config.pbtxt").write_text(
            config_text("mc_reload", {"fail_init": "1"}))
        error = rpc_error(lambda: client.load_model("mc_reload"))
        assert "initialize failed on purpose" in error.message()
        [entry] = index(client)["mc_reload"]
        assert entry["state"] == "READY"
        assert entry["reason"].startswith("reload failed; the previous load keeps serving: ")
        assert "initialize failed on purpose" in entry["reason"]
        np.testing.assert_array_equal(infer(client, "mc_reload", [1]), [2])
        # A bad config on reload says so too.
        (repo / "mc_reload" / "config.pbtxt").write_text("not a config\n")
        rpc_error(lambda: client.load_model("mc_reload"))
        [entry] = index(client)["mc_reload"]
        assert entry["state"] == "READY" and entry["reason"].startswith("reload failed")
        # A good reload clears it.
        (repo / "mc_reload" / "config.pbtxt").write_text(config_text("mc_reload",
                                                                     {"offset": "5"}))
        client.load_model("mc_reload")
        assert index(client)["mc_reload"] == [{"version": "1", "state": "READY", "reason": ""}]
        np.testing.assert_array_equal(infer(client, "mc_reload", [1]), [6])
    log = server.log()
    assert re.search(r"failed to load 'mc_reload' version 1: .*initialize failed on purpose.*"
                     r"\(version\(s\) \[1\] of the previous load keep serving\)", log)
    assert re.search(r"Poll failed for model directory 'mc_reload': .*"
                     r"\(version\(s\) \[1\] of the previous load keep serving\)", log)


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def test_workers_carry_a_readable_title(start_server: StartServer) -> None:
    server = start_server(["simple"])
    [worker] = worker_pids(server.pid)
    title = _read(f"/proc/{worker}/cmdline").replace(b"\0", b" ").strip()
    assert title == b"shmserve worker simple simple_0_0", title
    assert _read(f"/proc/{worker}/comm").strip() == b"simple_0_0"
    # The title must not overwrite the environment: a later start finds a dead server's
    # leftover workers by the supervisor pid they carry there (daemon/leftovers.py).
    marker = f"{SUPERVISOR_ENV}={server.pid}".encode()
    assert marker in _read(f"/proc/{worker}/environ").split(b"\0")


def _metrics_answer(host: str, port: int) -> str:
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as answer:
        return str(answer.read().decode())


def test_metrics_address_defaults_to_the_grpc_address(start_server: StartServer) -> None:
    port = free_port()
    start_server(["simple"], "--metrics-port", str(port))
    assert "nv_inference_request_success" in _metrics_answer("127.0.0.1", port)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.2", port), timeout=5).close()


def test_metrics_address_moves_the_metrics_endpoint(start_server: StartServer) -> None:
    port = free_port()
    server = start_server(["simple"], "--metrics-port", str(port), "--metrics-address",
                          "127.0.0.2")
    assert f"Started Metrics Service at 127.0.0.2:{port}" in server.log()
    assert "nv_inference_request_success" in _metrics_answer("127.0.0.2", port)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
