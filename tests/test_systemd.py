"""The systemd integration: the unit file, sd_notify readiness, drain on SIGTERM, SIGHUP."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient

from shmserve.systemd import unit_text
from shmserve.tests.serverproc import EXAMPLES, ServerProcess, build_repository


def test_unit_file() -> None:
    lines = {line.split("=", 1)[0]: line.split("=", 1)[1]
             for line in unit_text().splitlines() if "=" in line and not line.startswith("#")}
    assert lines["Type"] == "notify"
    assert lines["KillMode"] == "mixed"
    assert lines["KillSignal"] == "SIGTERM"
    assert "kill -HUP $MAINPID" in lines["ExecReload"]
    assert "shmserve serve --model-repository" in lines["ExecStart"]


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(30)
    yield sock, path
    sock.close()


def _messages_until(sock: socket.socket, wanted: str) -> list[str]:
    seen: list[str] = []
    while not any(wanted in message for message in seen):
        seen.append(sock.recv(4096).decode())
    return seen


def test_sd_notify_ready_stopping_and_reload(tmp_path: Path,
                                             notify_socket: tuple[socket.socket, str]) -> None:
    sock, path = notify_socket
    repo = build_repository(tmp_path / "repo", ["simple"])
    os.environ["NOTIFY_SOCKET"] = path
    try:
        server = ServerProcess(repo)
    finally:
        del os.environ["NOTIFY_SOCKET"]
    try:
        ready = _messages_until(sock, "READY=1")
        assert f"MAINPID={server.pid}" in ready[-1]
        with grpcclient.InferenceServerClient(server.url) as client:
            assert client.is_model_ready("simple")  # READY=1 came after the models loaded
            shutil.copytree(EXAMPLES / "identity_fp32", repo / "identity_fp32")
            server.process.send_signal(signal.SIGHUP)
            reload = _messages_until(sock, "READY=1")
            assert any("RELOADING=1" in message for message in reload)
            deadline = time.monotonic() + 20
            while not client.is_model_ready("identity_fp32") and time.monotonic() < deadline:
                time.sleep(0.05)
            assert client.is_model_ready("identity_fp32")
        server.process.send_signal(signal.SIGTERM)
        assert any("STOPPING=1" in m for m in _messages_until(sock, "STOPPING=1"))
        assert server.process.wait(30) == 0
    finally:
        server.stop()
