"""Repository agents wired into model loading, end to end, against real server processes.

Two recording agents (``rec_a``, ``rec_b``) live in a ``--repoagent-directory``; they and
the mc_tunable model append to one log file, so the order of LOAD, initialize,
LOAD_COMPLETE, UNLOAD, finalize and UNLOAD_COMPLETE is observed across processes. ``rec_b``
can copy the model to a temporary location and rewrite its config.pbtxt (the server must
re-read it). The built-in ``checksum`` and ``decrypt`` agents run on real models, the
encrypted one made with the ``shmserve encrypt-model`` command line.
"""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from shmserve.tests.mc_helpers import (
    index,
    infer,
    infer_simple,
    model_py,
    read_lines,
    rpc_error,
    states,
    wait_until,
    write_model,
)
from shmserve.tests.serverproc import ServerProcess, arena_segments, build_repository

StartServer = Callable[..., ServerProcess]

RECORDING_AGENT = '''\
"""Test agent: records each action; on LOAD may fail, or relocate the model with a new offset."""

import os
import re
import shutil

from shmserve.repoagents import Action, AgentContext, AgentError, RepoAgent


class Agent(RepoAgent):
    def handle(self, action: Action, model: AgentContext) -> None:
        params = model.parameters
        with open(params["log"], "a") as f:
            f.write(f"{model.agent_name}:{action.value}\\n")
        if action is not Action.LOAD:
            return
        if params.get("fail") == "LOAD":
            raise AgentError(f"{model.agent_name} refuses to load {model.model_name}")
        offset = params.get("offset")
        if offset is None:
            return
        target = model.acquire_temporary_location()
        for entry in os.listdir(model.location):
            source = os.path.join(model.location, entry)
            if os.path.isdir(source):
                shutil.copytree(source, os.path.join(target, entry))
            else:
                shutil.copy2(source, os.path.join(target, entry))
        config = os.path.join(target, "config.pbtxt")
        with open(config) as f:
            text = f.read()
        text = re.sub(r'(key: "offset" value: \\{ string_value: ")[^"]*', r"\\g<1>" + offset,
                      text)
        with open(config, "w") as f:
            f.write(text)
        with open(params["log"], "a") as f:
            f.write(f"{model.agent_name}:TEMP {target}\\n")
        model.set_location(target)
'''

LOAD_ORDER = ["rec_a:LOAD", "rec_b:LOAD", "INIT", "rec_b:LOAD_COMPLETE", "rec_a:LOAD_COMPLETE"]
UNLOAD_ORDER = ["rec_a:UNLOAD", "rec_b:UNLOAD", "FINALIZE", "rec_b:UNLOAD_COMPLETE",
                "rec_a:UNLOAD_COMPLETE"]
PLAINTEXT_MARKER = b"class TritonPythonModel"
BAD_MD5 = "0" * 32


def write_agents(directory: Path) -> Path:
    for name in ("rec_a", "rec_b"):
        (directory / name).mkdir(parents=True)
        (directory / name / "agent.py").write_text(RECORDING_AGENT)
    return directory


def recording_agents(log: Path, b_offset: str | None = None, a_fails: bool = False
                     ) -> list[tuple[str, dict[str, str]]]:
    a = {"log": str(log), **({"fail": "LOAD"} if a_fails else {})}
    b = {"log": str(log), **({"offset": b_offset} if b_offset is not None else {})}
    return [("rec_a", a), ("rec_b", b)]


def events(log: Path) -> list[str]:
    """The log reduced to agent actions and INIT/FINALIZE (details and TEMP lines dropped)."""
    out = []
    for line in read_lines(log):
        word = line.split()[0]
        if not word.endswith(":TEMP"):
            out.append(word)
    return out


def temp_locations(log: Path) -> list[Path]:
    return [Path(line.split(" ", 1)[1]) for line in read_lines(log) if ":TEMP " in line]


def init_pids(log: Path) -> list[str]:
    return [line.split()[1] for line in read_lines(log) if line.startswith("INIT")]


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def files_containing(root: Path, needle: bytes) -> list[Path]:
    found = []
    for path in root.rglob("*"):
        if path.is_file() and needle in path.read_bytes():
            found.append(path)
    return found


def encrypt(source: Path, target: Path, key: Path, *extra: str) -> None:
    """`shmserve encrypt-model` through the real command line."""
    key_args = ["--key-file", str(key)] if key.exists() else ["--generate-key", str(key)]
    done = subprocess.run([sys.executable, "-m", "shmserve.daemon", "encrypt-model",
                           str(source), str(target), *key_args, *extra],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr


@dataclass
class AgentServer:
    server: ServerProcess
    repo: Path
    tmp: Path
    logs: Path
    client: grpcclient.InferenceServerClient


@pytest.fixture(scope="module")
def agent_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentServer]:
    base = tmp_path_factory.mktemp("mc_agents")
    agents_dir = write_agents(base / "repoagents")
    logs = base / "logs"
    logs.mkdir()
    server_tmp = base / "tmp"
    server_tmp.mkdir()
    repo = build_repository(base / "repo", ["simple"])

    log = logs / "mc_agents.log"
    write_model(repo, "mc_agents", {"offset": "1", "log": str(log)},
                agents=recording_agents(log, b_offset="42"))
    log = logs / "mc_agents_initfail.log"
    write_model(repo, "mc_agents_initfail", {"fail_init": "1", "log": str(log)},
                agents=recording_agents(log, b_offset="2"))
    log = logs / "mc_agents_loadfail.log"
    write_model(repo, "mc_agents_loadfail", {"log": str(log)},
                agents=recording_agents(log, a_fails=True))

    plain = base / "plain"
    plain.mkdir()
    write_model(plain, "mc_cksum_bad", {"offset": "1"})
    actual = md5(plain / "mc_cksum_bad" / "1" / "model.py")
    write_model(repo, "mc_cksum_bad", {"offset": "1"},
                agents=[("checksum", {"MD5:1/model.py": BAD_MD5})])
    write_model(repo, "mc_cksum_good", {"offset": "3"}, agents=[("checksum", {
        "MD5:1/model.py": actual,
        "SHA256:1/model.py": hashlib.sha256(model_py()).hexdigest()})])

    key = base / "keys" / "model.key"
    key.parent.mkdir()
    write_model(plain, "mc_secret", {"offset": "4", "log": str(logs / "mc_secret.log")})
    encrypt(plain / "mc_secret", repo / "mc_secret", key)
    write_model(plain, "mc_secret_cfg", {"offset": "6"})
    encrypt(plain / "mc_secret_cfg", repo / "mc_secret_cfg", key, "--encrypt-config")

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TMPDIR", str(server_tmp))
        server = ServerProcess(repo, "--model-control-mode", "explicit", "--repoagent-directory",
                               str(agents_dir), "--load-model", "simple",
                               "--load-model", "mc_cksum_bad", "--exit-on-error", "false")
    try:
        server.wait_started()
        client = grpcclient.InferenceServerClient(server.url)
        yield AgentServer(server, repo, server_tmp, logs, client)
        client.close()
    finally:
        code = server.stop()
    assert code == 0, server.log()
    deadline = time.monotonic() + 5.0
    while arena_segments(server.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert arena_segments(server.pid) == []
    assert [p.name for p in server_tmp.iterdir() if p.name.startswith("shmserve-")] == []


def _status(exc: InferenceServerException) -> str:
    return str(exc.status())


def test_agents_run_in_order_and_their_config_is_reread(agent_server: AgentServer) -> None:
    client = agent_server.client
    log = agent_server.logs / "mc_agents.log"
    client.load_model("mc_agents")
    assert events(log) == LOAD_ORDER

    # rec_b rewrote config.pbtxt (offset 1 -> 42) in its temporary location: re-read.
    np.testing.assert_array_equal(infer(client, "mc_agents", [1, 2]), [43, 44])
    config = client.get_model_config("mc_agents", as_json=True)["config"]
    assert config["parameters"]["offset"]["string_value"] == "42"
    [location] = temp_locations(log)
    assert stat.S_IMODE(location.stat().st_mode) == 0o700
    init = next(line for line in read_lines(log) if line.startswith("INIT"))
    assert f"repository={location}" in init, "workers must load from the agents' location"
    assert (agent_server.repo / "mc_agents" / "config.pbtxt").read_text().count('"1"') == 1

    # Reload (files changed): a new chain loads, then the old chain unloads.
    config_file = agent_server.repo / "mc_agents" / "config.pbtxt"
    config_file.write_text(config_file.read_text() + "# touched\n")
    client.load_model("mc_agents")
    wait_until(lambda: len(events(log)) == 3 * 5, 15, "the old generation to retire")
    assert events(log) == LOAD_ORDER * 2 + UNLOAD_ORDER
    old_pid, new_pid = init_pids(log)
    assert f"FINALIZE {old_pid}" in read_lines(log)
    old_location, new_location = temp_locations(log)
    assert not old_location.exists() and new_location.exists()
    np.testing.assert_array_equal(infer(client, "mc_agents", [0]), [42])

    client.unload_model("mc_agents")
    assert events(log) == LOAD_ORDER * 2 + UNLOAD_ORDER * 2
    assert f"FINALIZE {new_pid}" in read_lines(log)
    assert not new_location.exists(), "temporary locations are released at unload"


def test_initialize_failure_sends_load_fail_in_reverse_order(
        agent_server: AgentServer) -> None:
    client = agent_server.client
    log = agent_server.logs / "mc_agents_initfail.log"
    error = rpc_error(lambda: client.load_model("mc_agents_initfail"))
    assert _status(error) == "StatusCode.INVALID_ARGUMENT"
    assert error.message().startswith(
        "load failed for model 'mc_agents_initfail': version 1 is at UNAVAILABLE state: ")
    assert [e for e in events(log) if e != "FINALIZE"] == [
        "rec_a:LOAD", "rec_b:LOAD", "INIT", "rec_b:LOAD_FAIL", "rec_a:LOAD_FAIL"]
    [location] = temp_locations(log)
    assert not location.exists()
    [entry] = index(client)["mc_agents_initfail"]
    assert entry["state"] == "UNAVAILABLE"
    assert "initialize failed on purpose" in entry["reason"]


def test_agent_load_failure_stops_the_chain(agent_server: AgentServer) -> None:
    client = agent_server.client
    log = agent_server.logs / "mc_agents_loadfail.log"
    error = rpc_error(lambda: client.load_model("mc_agents_loadfail"))
    assert _status(error) == "StatusCode.INTERNAL"
    assert error.message() == (
        "failed to load 'mc_agents_loadfail', failed to poll from model repository: "
        "rec_a refuses to load mc_agents_loadfail")
    assert events(log) == ["rec_a:LOAD", "rec_a:LOAD_FAIL"], "rec_b must never be called"
    assert index(client)["mc_agents_loadfail"] == [{
        "version": "", "state": "UNAVAILABLE",
        "reason": "rec_a refuses to load mc_agents_loadfail"}]


def test_checksum_mismatch_keeps_the_model_out_while_others_serve(
        agent_server: AgentServer) -> None:
    client = agent_server.client
    actual = md5(agent_server.repo / "mc_cksum_bad" / "1" / "model.py")
    text = f"Mismatched MD5 hash for file 1/model.py, expect: {BAD_MD5}, got: {actual}"
    # Loaded at startup (--load-model): refused, with Triton's text in the index and log.
    assert index(client)["mc_cksum_bad"] == [{"version": "", "state": "UNAVAILABLE",
                                              "reason": text}]
    assert f"Poll failed for model directory 'mc_cksum_bad': {text}" in \
        agent_server.server.log()
    assert not client.is_server_ready(), "strict readiness: a start-up model failed"
    assert client.is_model_ready("simple")
    infer_simple(client)
    error = rpc_error(lambda: infer(client, "mc_cksum_bad", [1]))
    assert _status(error) == "StatusCode.NOT_FOUND"
    assert error.message() == "Request for unknown model: 'mc_cksum_bad' is not found"
    error = rpc_error(lambda: client.load_model("mc_cksum_bad"))
    assert _status(error) == "StatusCode.INTERNAL"
    assert error.message() == ("failed to load 'mc_cksum_bad', failed to poll from model "
                               f"repository: {text}")

    client.load_model("mc_cksum_good")
    np.testing.assert_array_equal(infer(client, "mc_cksum_good", [1]), [4])
    client.unload_model("mc_cksum_good")


def test_encrypted_model_serves_and_its_plaintext_never_persists(
        agent_server: AgentServer) -> None:
    client, repo, server_tmp = agent_server.client, agent_server.repo, agent_server.tmp
    for name in ("mc_secret", "mc_secret_cfg"):
        stored = sorted(str(p.relative_to(repo / name)) for p in (repo / name).rglob("*")
                        if p.is_file())
        assert "1/model.py" not in stored and "1/model.py.enc" in stored
        assert files_containing(repo / name, PLAINTEXT_MARKER) == []
    # --encrypt-config: the plaintext config is a stub without the model's parameters.
    assert "offset" not in (repo / "mc_secret_cfg" / "config.pbtxt").read_text()

    client.load_model("mc_secret")
    client.load_model("mc_secret_cfg")
    np.testing.assert_array_equal(infer(client, "mc_secret", [1, 2]), [5, 6])
    np.testing.assert_array_equal(infer(client, "mc_secret_cfg", [1]), [7])
    locations = [p for p in server_tmp.iterdir() if p.name.startswith("shmserve-repoagent-")]
    assert len(locations) == 2
    for location in locations:
        assert stat.S_IMODE(location.stat().st_mode) == 0o700
        assert (location / "1" / "model.py").read_bytes() == model_py()
    init = read_lines(agent_server.logs / "mc_secret.log")[0]
    assert any(f"repository={location}" in init for location in locations)

    client.unload_model("mc_secret")
    client.unload_model("mc_secret_cfg")
    for location in locations:
        assert not location.exists(), "decrypted files must be gone after unload"
    assert files_containing(server_tmp, PLAINTEXT_MARKER) == []
    assert files_containing(repo / "mc_secret", PLAINTEXT_MARKER) == []
    assert files_containing(repo / "mc_secret_cfg", PLAINTEXT_MARKER) == []
    assert states(client, "mc_secret") == ["UNAVAILABLE"]


def test_server_shutdown_finishes_every_agent_lifecycle(start_server: StartServer,
                                                        tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch
                                                        ) -> None:
    agents_dir = write_agents(tmp_path / "repoagents")
    log = tmp_path / "mc_shut.log"
    repo = build_repository(tmp_path / "repo", [])
    write_model(repo, "mc_shut", {"offset": "1", "log": str(log)},
                agents=recording_agents(log, b_offset="5"))
    server_tmp = tmp_path / "server_tmp"
    server_tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(server_tmp))
    server = start_server(None, "--repoagent-directory", str(agents_dir), repository=repo)
    monkeypatch.delenv("TMPDIR")
    client = grpcclient.InferenceServerClient(server.url)
    try:
        np.testing.assert_array_equal(infer(client, "mc_shut", [1]), [6])
    finally:
        client.close()
    [location] = temp_locations(log)
    assert location.exists()
    assert server.stop() == 0, server.log()
    assert events(log) == LOAD_ORDER + UNLOAD_ORDER
    assert not location.exists()
    assert [p.name for p in server_tmp.iterdir() if p.name.startswith("shmserve-")] == []
    assert os.path.isdir(repo / "mc_shut")
