"""The systemd integration: the unit file, sd_notify readiness, drain on SIGTERM, SIGHUP."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient

from shmserve.systemd import unit_text
from shmserve.tests.serverproc import EXAMPLES, ServerProcess, build_repository


def test_unit_file() -> None:
    lines = _unit_settings()
    assert lines["Type"] == "notify"
    assert lines["KillMode"] == "mixed"
    assert lines["KillSignal"] == "SIGTERM"
    assert "kill -HUP $MAINPID" in lines["ExecReload"]
    assert "shmserve serve --model-repository" in lines["ExecStart"]


DOCS = Path(__file__).resolve().parent.parent / "docs" / "systemd.md"
DOCUMENTED_VENV = "/opt/shmserve/.venv"


def _unit_settings() -> dict[str, str]:
    return {line.split("=", 1)[0]: line.split("=", 1)[1]
            for line in unit_text().splitlines() if "=" in line and not line.startswith("#")}


def test_docs_create_the_user_and_venv_the_unit_uses() -> None:
    unit = _unit_settings()
    docs = " ".join(DOCS.read_text().replace("\\\n", " ").split())
    assert unit["User"] == unit["Group"] == "shmserve"
    assert re.search(rf"useradd --system --user-group [^#]*--shell \S+ {unit['User']} ", docs)
    assert unit["ExecStart"].startswith(f"{DOCUMENTED_VENV}/bin/shmserve serve ")
    assert f"python3 -m venv {DOCUMENTED_VENV}" in docs
    assert f"{DOCUMENTED_VENV}/bin/pip install" in docs
    repository = unit["ExecStart"].split("--model-repository ")[1].split()[0]
    assert f"mkdir -p {repository}" in docs


def test_systemd_analyze_verify_passes_on_the_documented_layout(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed on this host")
    # This test run's venv stands in for the documented one (which must hold shmserve).
    venv = Path(sys.prefix)
    assert (venv / "bin" / "shmserve").exists(), "the venv has no shmserve command"
    unit = tmp_path / "shmserve.service"
    unit.write_text(unit_text().replace(DOCUMENTED_VENV, str(venv)))
    done = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "shmserve.service" not in done.stderr, done.stderr


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
