"""Model control end to end: --model-control-mode none|explicit|poll, --load-model,
RepositoryModelLoad ("config" and "file:" overrides), RepositoryModelUnload, RepositoryIndex,
reload without downtime, draining, against real server processes with tritonclient.grpc.

Most tests share one explicit-mode server (module scope); each uses its own models.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from shmserve.tests.mc_helpers import (
    config_json,
    config_text,
    index,
    infer,
    infer_identity,
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

NOT_ALLOWED = "explicit model load / unload is not allowed"


def _no_arenas(pid: int) -> None:
    deadline = time.monotonic() + 5.0
    while arena_segments(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert arena_segments(pid) == [], "server left arena segments in /dev/shm"


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("shmserve-"))


@dataclass
class Explicit:
    server: ServerProcess
    repo: Path
    tmp: Path                  # the server's TMPDIR (override and agent locations)
    logs: Path                 # model log files
    client: grpcclient.InferenceServerClient


@pytest.fixture(scope="module")
def explicit(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Explicit]:
    base = tmp_path_factory.mktemp("mc_explicit")
    repo = build_repository(base / "repo", ["simple", "identity_fp32", "string_upper"])
    logs = base / "logs"
    logs.mkdir()
    server_tmp = base / "tmp"
    server_tmp.mkdir()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TMPDIR", str(server_tmp))
        server = ServerProcess(repo, "--model-control-mode", "explicit",
                               "--load-model", "simple", "--load-model", "identity_fp32")
    try:
        server.wait_ready()
        client = grpcclient.InferenceServerClient(server.url)
        yield Explicit(server, repo, server_tmp, logs, client)
        client.close()
    finally:
        code = server.stop()
    assert code == 0, server.log()
    _no_arenas(server.pid)
    assert _leftovers(server_tmp) == [], "temporary model locations left behind"


def _status(exc: InferenceServerException) -> str:
    return str(exc.status())


# --- explicit mode: startup, load, unload, index -----------------------------------------

def test_explicit_mode_loads_only_the_named_models(explicit: Explicit) -> None:
    client = explicit.client
    entries = index(client)
    assert entries["simple"] == [{"version": "1", "state": "READY", "reason": ""}]
    assert entries["identity_fp32"] == [{"version": "1", "state": "READY", "reason": ""}]
    # In the repository, never loaded: listed by name only (as Triton).
    assert entries["string_upper"] == [{"version": "", "state": "", "reason": ""}]
    assert client.is_server_ready()
    assert not client.is_model_ready("string_upper")
    error = rpc_error(lambda: client.infer("string_upper", []))
    assert _status(error) == "StatusCode.NOT_FOUND"
    assert error.message() == "Request for unknown model: 'string_upper' is not found"
    ready_only = client.get_model_repository_index(as_json=True)
    assert {m["name"] for m in ready_only["models"]} >= {"simple", "identity_fp32"}


def test_load_infer_unload_and_index_states(explicit: Explicit) -> None:
    client, log = explicit.client, explicit.logs / "mc_basic.log"
    write_model(explicit.repo, "mc_basic", {"offset": "1", "log": str(log)})
    assert index(client)["mc_basic"] == [{"version": "", "state": "", "reason": ""}]
    client.load_model("mc_basic")
    assert index(client)["mc_basic"] == [{"version": "1", "state": "READY", "reason": ""}]
    assert client.is_model_ready("mc_basic") and client.is_model_ready("mc_basic", "1")
    np.testing.assert_array_equal(infer(client, "mc_basic", [1, 2, 3]), [2, 3, 4])

    # Loading a loaded, unchanged model does not reload it (Triton: "unmodified").
    client.load_model("mc_basic")
    assert sum(line.startswith("INIT") for line in read_lines(log)) == 1

    client.unload_model("mc_basic")
    assert index(client)["mc_basic"] == [{"version": "", "state": "UNAVAILABLE",
                                          "reason": "unloaded"}]
    assert any(line.startswith("FINALIZE") for line in read_lines(log))
    assert not client.is_model_ready("mc_basic")
    error = rpc_error(lambda: infer(client, "mc_basic", [1]))
    assert _status(error) == "StatusCode.NOT_FOUND"
    assert error.message() == "Request for unknown model: 'mc_basic' has no available versions"
    error = rpc_error(lambda: infer(client, "mc_basic", [1], version="1"))
    assert error.message() == "Request for unknown model: 'mc_basic' version 1 is not found"

    # Unloading what is not loaded, or not known at all, succeeds (Triton).
    client.unload_model("mc_basic")
    client.unload_model("mc_never_heard_of")
    # And it loads again.
    client.load_model("mc_basic")
    np.testing.assert_array_equal(infer(client, "mc_basic", [5]), [6])
    client.unload_model("mc_basic")


def test_load_errors_use_tritons_texts(explicit: Explicit) -> None:
    client, repo = explicit.client, explicit.repo

    error = rpc_error(lambda: client.load_model("mc_missing"))
    assert _status(error) == "StatusCode.INTERNAL"
    assert error.message().startswith(
        "failed to load 'mc_missing', failed to poll from model repository")
    assert "mc_missing" not in index(client)

    error = rpc_error(lambda: client.load_model("../simple"))
    assert _status(error) == "StatusCode.INVALID_ARGUMENT"
    assert error.message() == ("invalid model name '../simple', model name must not contain "
                               "path traversal characters")

    (repo / "mc_noversion").mkdir()
    (repo / "mc_noversion" / "config.pbtxt").write_text(config_text("mc_noversion"))
    error = rpc_error(lambda: client.load_model("mc_noversion"))
    assert _status(error) == "StatusCode.INTERNAL"
    assert error.message() == "failed to load 'mc_noversion', no version is available"

    write_model(repo, "mc_badinit", {"fail_init": "1"})
    error = rpc_error(lambda: client.load_model("mc_badinit"))
    assert _status(error) == "StatusCode.INVALID_ARGUMENT"
    assert error.message().startswith(
        "load failed for model 'mc_badinit': version 1 is at UNAVAILABLE state: ")
    assert "initialize failed on purpose" in error.message()
    [entry] = index(client)["mc_badinit"]
    assert entry["state"] == "UNAVAILABLE"
    assert "initialize failed on purpose" in entry["reason"]
    error = rpc_error(lambda: infer(client, "mc_badinit", [1]))
    assert error.message() == ("Request for unknown model: 'mc_badinit' has no available "
                               "versions")

    (repo / "mc_badconfig" / "1").mkdir(parents=True)
    (repo / "mc_badconfig" / "config.pbtxt").write_text("name: 'mc_badconfig'\nnot a field\n")
    error = rpc_error(lambda: client.load_model("mc_badconfig"))
    assert _status(error) == "StatusCode.INTERNAL"
    assert error.message().startswith(
        "failed to load 'mc_badconfig', failed to poll from model repository: ")
    [entry] = index(client)["mc_badconfig"]
    assert entry["state"] == "UNAVAILABLE" and "config.pbtxt" in entry["reason"]
    assert "Poll failed for model directory 'mc_badconfig'" in explicit.server.log()
    assert client.is_server_ready()


def test_config_override_then_plain_load_restores_the_repository_config(
        explicit: Explicit) -> None:
    client = explicit.client
    log = explicit.logs / "mc_override.log"
    write_model(explicit.repo, "mc_override", {"offset": "1", "log": str(log)})
    client.load_model("mc_override")
    np.testing.assert_array_equal(infer(client, "mc_override", [10]), [11])

    client.load_model("mc_override", config=config_json("mc_override", {"offset": "7",
                                                                         "log": str(log)}))
    np.testing.assert_array_equal(infer(client, "mc_override", [10]), [17])
    config = client.get_model_config("mc_override", as_json=True)["config"]
    assert config["parameters"]["offset"]["string_value"] == "7"

    # A plain load after an override reloads from the repository, even though its files
    # did not change; a second plain load is then a no-op.
    client.load_model("mc_override")
    np.testing.assert_array_equal(infer(client, "mc_override", [10]), [11])
    inits = sum(line.startswith("INIT") for line in read_lines(log))
    client.load_model("mc_override")
    assert sum(line.startswith("INIT") for line in read_lines(log)) == inits == 3

    error = rpc_error(lambda: client.load_model("mc_override", config="{not json"))
    assert _status(error) == "StatusCode.INTERNAL"
    assert error.message().startswith(
        "failed to load 'mc_override', failed to poll from model repository: "
        "Invalid config override: ")
    error = rpc_error(lambda: client.load_model(
        "mc_override", config=config_json("another_name", {"offset": "3"})))
    assert "failed to poll from model repository" in error.message()
    # Failed loads leave the serving version alone.
    np.testing.assert_array_equal(infer(client, "mc_override", [10]), [11])
    assert states(client, "mc_override") == ["READY"]
    client.unload_model("mc_override")


def test_a_partial_config_override_is_completed_by_the_model(explicit: Explicit) -> None:
    """Triton's simple_grpc_model_control example: the override '{"max_batch_size":"16"}'
    replaces config.pbtxt whole; the backend is inferred from model.py and the example
    model's auto_complete_config declares its tensors."""
    client = explicit.client
    client.load_model("simple", config='{"max_batch_size":"16"}')
    try:
        config = client.get_model_config("simple").config
        assert config.max_batch_size == 16
        assert config.backend == "python"
        assert [(t.name, list(t.dims)) for t in config.input] == [("INPUT0", [16]),
                                                                   ("INPUT1", [16])]
        assert [t.name for t in config.output] == ["OUTPUT0", "OUTPUT1"]
        infer_simple(client, 3)
    finally:
        client.load_model("simple")  # the repository's config again
    assert client.get_model_config("simple").config.max_batch_size == 8
    infer_simple(client)


def test_file_override_loads_a_model_from_the_request(explicit: Explicit) -> None:
    client = explicit.client
    files = {"file:1/model.py": model_py()}
    client.load_model("mc_files", config=config_json("mc_files", {"offset": "3"}),
                      files=files)
    np.testing.assert_array_equal(infer(client, "mc_files", [1, 1]), [4, 4])
    [location] = [p for p in explicit.tmp.iterdir()
                  if p.name.startswith("shmserve-override-mc_files-")]
    assert (location / "mc_files" / "1" / "model.py").read_bytes() == files["file:1/model.py"]
    assert (location / "mc_files" / "config.pbtxt").is_file()
    assert not (explicit.repo / "mc_files").exists()

    # Triton: a file override needs the "config" parameter; paths stay inside the model.
    error = rpc_error(lambda: client.load_model("mc_files2", files=files))
    assert _status(error) == "StatusCode.INTERNAL"
    assert error.message() == (
        "failed to load 'mc_files2', failed to poll from model repository: Load parameter "
        "'config' must be specified for model file override")
    error = rpc_error(lambda: client.load_model(
        "mc_files2", config=config_json("mc_files2"),
        files={"file:../../escape.py": b"print('escaped')\n", **files}))
    assert "Invalid file parameter 'file:../../escape.py' with normalized path" in \
        error.message()
    assert "must stay within model directory." in error.message()
    assert not list(explicit.tmp.rglob("escape.py"))
    error = rpc_error(lambda: client.load_model(  # a name longer than NAME_MAX (Triton 2.51)
        "mc_files2", config=config_json("mc_files2"), files={"file:1/" + "x" * 300: b""}))
    assert _status(error) == "StatusCode.INTERNAL"
    assert error.message().startswith(
        "failed to load 'mc_files2', failed to poll from model repository")
    assert [p.name for p in explicit.tmp.iterdir()
            if p.name.startswith("shmserve-override-mc_files2")] == []

    client.unload_model("mc_files")
    assert not location.exists()


# --- reload, drain, concurrency ---------------------------------------------------------

@dataclass
class Hammer:
    """Threads sending requests until stopped; every failure is kept."""

    calls: Mapping[str, Callable[[grpcclient.InferenceServerClient], object]]
    url: str
    threads_per_model: int = 1
    successes: dict[str, int] = field(default_factory=dict)
    failures: list[tuple[str, str]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __enter__(self) -> Hammer:
        for name, call in self.calls.items():
            self.successes[name] = 0
            for _ in range(self.threads_per_model):
                thread = threading.Thread(target=self._run, args=(name, call), daemon=True)
                thread.start()
                self._threads.append(thread)
        return self

    def _run(self, name: str, call: Callable[[grpcclient.InferenceServerClient], object]
             ) -> None:
        client = grpcclient.InferenceServerClient(self.url)
        try:
            while not self._stop.is_set():
                try:
                    call(client)
                except Exception as exc:
                    with self._lock:
                        self.failures.append((name, repr(exc)))
                else:
                    with self._lock:
                        self.successes[name] += 1
        finally:
            client.close()

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self.successes)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)


def test_load_unload_reload_under_concurrent_inference_fail_nothing(
        explicit: Explicit) -> None:
    client, repo = explicit.client, explicit.repo
    write_model(repo, "mc_churn", {"offset": "1"})
    calls = {"simple": infer_simple, "identity_fp32": infer_identity}
    with Hammer(calls, explicit.server.url, threads_per_model=2) as hammer:

        def progress() -> None:
            """Both models keep answering between the steps."""
            before = hammer.counts()
            wait_until(lambda: all(hammer.counts()[m] > before[m] + 2 for m in calls), 30,
                       "requests to complete")

        progress()
        client.load_model("string_upper")
        progress()
        # Reload simple with a config override (two instances instead of one).
        simple = client.get_model_config("simple", as_json=True)["config"]
        simple["instance_group"][0]["count"] = 2
        client.load_model("simple", config=json.dumps(simple))
        config = client.get_model_config("simple", as_json=True)["config"]
        assert int(config["instance_group"][0]["count"]) == 2
        progress()
        # Reload identity_fp32 because its files changed.
        model_file = repo / "identity_fp32" / "1" / "model.py"
        model_file.write_text(model_file.read_text() + "\n# changed\n")
        client.load_model("identity_fp32")
        progress()
        # Load and unload other models meanwhile.
        client.load_model("mc_churn")
        np.testing.assert_array_equal(infer(client, "mc_churn", [1]), [2])
        client.unload_model("mc_churn")
        client.unload_model("string_upper")
        progress()
        # Back to the repository's config for simple.
        client.load_model("simple")
        config = client.get_model_config("simple", as_json=True)["config"]
        assert int(config["instance_group"][0]["count"]) == 1
        progress()
    assert hammer.failures == [], hammer.failures[:5]
    assert all(count > 10 for count in hammer.successes.values()), hammer.successes
    assert states(client, "simple") == ["READY"]
    assert states(client, "identity_fp32") == ["READY"]


def test_reload_serves_the_old_version_until_the_new_one_is_ready(explicit: Explicit) -> None:
    client = explicit.client
    log = explicit.logs / "mc_slow.log"
    write_model(explicit.repo, "mc_slow", {"offset": "1", "log": str(log)})
    client.load_model("mc_slow")
    [old_pid] = [line.split()[1] for line in read_lines(log) if line.startswith("INIT")]

    seen: list[tuple[float, int]] = []    # (when the request was sent, answer)

    def call(c: grpcclient.InferenceServerClient) -> None:
        sent = time.monotonic()
        seen.append((sent, int(infer(c, "mc_slow", [0])[0])))

    with Hammer({"mc_slow": call}, explicit.server.url) as hammer:
        wait_until(lambda: hammer.counts()["mc_slow"] > 3, 30, "first answers")
        started = time.monotonic()
        client.load_model("mc_slow", config=config_json(
            "mc_slow", {"offset": "2", "init_delay": "1.0", "log": str(log)}))
        finished = time.monotonic()
        wait_until(lambda: any(t > finished for t, _ in seen[-3:]), 30, "answers after")
    assert hammer.failures == [], hammer.failures[:5]
    assert finished - started >= 1.0
    during = [value for t, value in seen if started < t < started + 0.5]
    assert during and set(during) == {1}, "the old version must answer during the reload"
    assert all(value == 2 for t, value in seen if t > finished)
    values = [value for _, value in seen]
    assert values == sorted(values), "once switched, requests never go back to the old one"
    # The old generation drains and its worker finalizes.
    wait_until(lambda: f"FINALIZE {old_pid}" in read_lines(log), 15, "old worker to stop")
    client.unload_model("mc_slow")


def test_failed_reload_keeps_the_old_version_serving(explicit: Explicit) -> None:
    client, repo = explicit.client, explicit.repo
    write_model(repo, "mc_keep", {"offset": "5"})
    client.load_model("mc_keep")

    error = rpc_error(lambda: client.load_model(
        "mc_keep", config=config_json("mc_keep", {"offset": "6", "fail_init": "1"})))
    assert _status(error) == "StatusCode.INVALID_ARGUMENT"
    assert error.message().startswith(
        "load failed for model 'mc_keep': version 1 is at UNAVAILABLE state: ")
    np.testing.assert_array_equal(infer(client, "mc_keep", [0]), [5])
    [entry] = index(client)["mc_keep"]
    assert entry["version"] == "1" and entry["state"] == "READY"
    assert entry["reason"].startswith("reload failed; the previous load keeps serving: ")
    assert "initialize failed on purpose" in entry["reason"]

    # Broken on disk: the reload fails, the old one serves; fixed: the next load works.
    (repo / "mc_keep" / "config.pbtxt").write_text(
        config_text("mc_keep", {"offset": "8", "fail_init": "1"}))
    rpc_error(lambda: client.load_model("mc_keep"))
    np.testing.assert_array_equal(infer(client, "mc_keep", [0]), [5])
    (repo / "mc_keep" / "config.pbtxt").write_text(config_text("mc_keep", {"offset": "9"}))
    client.load_model("mc_keep")
    np.testing.assert_array_equal(infer(client, "mc_keep", [0]), [9])
    assert index(client)["mc_keep"] == [{"version": "1", "state": "READY", "reason": ""}]
    client.unload_model("mc_keep")


def test_unload_drains_in_flight_requests(explicit: Explicit) -> None:
    client = explicit.client
    log = explicit.logs / "mc_drain.log"
    write_model(explicit.repo, "mc_drain", {"offset": "1", "exec_delay": "0.4",
                                            "log": str(log)})
    client.load_model("mc_drain")
    done: list[tuple[float, object]] = []
    lock = threading.Lock()

    def callback(result: object, error: object) -> None:
        with lock:
            done.append((time.monotonic(), error if error is not None else result))

    async_client = grpcclient.InferenceServerClient(explicit.server.url)
    try:
        for value in range(3):
            data = np.array([value], dtype=np.int32)
            tensor = grpcclient.InferInput("INPUT0", [1], "INT32")
            tensor.set_data_from_numpy(data)
            async_client.async_infer("mc_drain", [tensor], callback, client_timeout=30.0)
        time.sleep(0.15)  # one executing, two queued
        client.unload_model("mc_drain")
        unloaded = time.monotonic()
        wait_until(lambda: len(done) == 3, 10, "the in-flight requests")
    finally:
        async_client.close()
    results = [answer for _, answer in done if isinstance(answer, grpcclient.InferResult)]
    assert len(results) == 3, done
    assert sorted(int(r.as_numpy("OUTPUT0")[0]) for r in results) == [1, 2, 3]
    assert all(t <= unloaded for t, _ in done), "unload returned before the requests drained"
    assert any(line.startswith("FINALIZE") for line in read_lines(log))
    assert rpc_error(lambda: infer(client, "mc_drain", [1])).message() == \
        "Request for unknown model: 'mc_drain' has no available versions"


# --- other modes ------------------------------------------------------------------------

def test_none_mode_loads_everything_and_rejects_load_unload(start_server: StartServer) -> None:
    server = start_server(["simple", "identity_fp32"])
    client = grpcclient.InferenceServerClient(server.url)
    try:
        assert states(client, "simple") == ["READY"]
        assert states(client, "identity_fp32") == ["READY"]
        for call in (lambda: client.load_model("simple"),
                     lambda: client.unload_model("simple")):
            error = rpc_error(call)
            assert _status(error) == "StatusCode.UNAVAILABLE"
            assert NOT_ALLOWED in error.message()
        infer_simple(client)

        # SIGHUP (systemd's ExecReload) rescans the repository in none mode.
        write_model(server.repository, "mc_hup", {"offset": "1"}, atomic=True)
        os.rename(server.repository / "identity_fp32", server.repository.parent / "gone")
        server.process.send_signal(signal.SIGHUP)
        wait_until(lambda: "identity_fp32" not in index(client), 20, "identity_fp32 to go")
        wait_until(lambda: states(client, "mc_hup") == ["READY"], 20, "mc_hup to load")
        np.testing.assert_array_equal(infer(client, "mc_hup", [1]), [2])
        infer_simple(client)
    finally:
        client.close()


def test_load_model_wildcard(start_server: StartServer) -> None:
    server = start_server(None, "--model-control-mode", "explicit", "--load-model", "*")
    client = grpcclient.InferenceServerClient(server.url)
    try:
        for name in ("simple", "identity_fp32", "string_upper"):
            assert states(client, name) == ["READY"]
    finally:
        client.close()
    bad = start_server(["simple"], "--model-control-mode", "explicit", "--load-model", "*",
                       "--load-model", "simple", wait=False)
    assert bad.process.wait(30) != 0
    assert "Wildcard model name '*' must be the ONLY startup model if specified at all." in \
        bad.log()


def test_poll_mode_follows_added_changed_and_removed_models(start_server: StartServer,
                                                            tmp_path: Path) -> None:
    repo = build_repository(tmp_path / "poll_repo", ["simple"])
    write_model(repo, "mc_p1", {"offset": "1"})
    server = start_server(None, "--model-control-mode", "poll", "--repository-poll-secs",
                          "0.2", repository=repo)
    client = grpcclient.InferenceServerClient(server.url)
    try:
        np.testing.assert_array_equal(infer(client, "mc_p1", [0]), [1])
        error = rpc_error(lambda: client.load_model("mc_p1"))
        assert _status(error) == "StatusCode.UNAVAILABLE"
        assert error.message() == ("explicit model load / unload is not allowed if polling "
                                   "is enabled")

        # Added.
        write_model(repo, "mc_p2", {"offset": "2"}, atomic=True)
        wait_until(lambda: int(infer(client, "mc_p2", [0])[0]) == 2, 20, "mc_p2 to load")

        # Changed, while both it and simple are under load: nothing fails.
        calls: dict[str, Callable[[grpcclient.InferenceServerClient], object]] = {
            "simple": infer_simple, "mc_p1": lambda c: infer(c, "mc_p1", [0])}
        with Hammer(calls, server.url) as hammer:
            wait_until(lambda: all(n > 3 for n in hammer.counts().values()), 20, "traffic")
            staged = repo / "mc_p1" / "config.pbtxt.new"
            staged.write_text(config_text("mc_p1", {"offset": "11"}))
            os.replace(staged, repo / "mc_p1" / "config.pbtxt")
            wait_until(lambda: int(infer(client, "mc_p1", [0])[0]) == 11, 20, "mc_p1 reload")
        assert hammer.failures == [], hammer.failures[:5]

        # Removed.
        os.rename(repo / "mc_p1", tmp_path / "mc_p1_removed")
        wait_until(lambda: "mc_p1" not in index(client), 20, "mc_p1 to leave the index")
        error = rpc_error(lambda: infer(client, "mc_p1", [0]))
        assert _status(error) == "StatusCode.NOT_FOUND"

        # A broken change keeps the old version; a broken new model stays out.
        (repo / "mc_p2" / "config.pbtxt").write_text(
            config_text("mc_p2", {"offset": "3", "fail_init": "1"}))
        write_model(repo, "mc_p3", {"fail_init": "1"}, atomic=True)
        wait_until(lambda: "failed to load 'mc_p2' version 1" in server.log(), 20,
                   "the failed reload")
        wait_until(lambda: states(client, "mc_p3") == ["UNAVAILABLE"], 20, "mc_p3 to fail")
        np.testing.assert_array_equal(infer(client, "mc_p2", [0]), [2])
        assert states(client, "mc_p2") == ["READY"]
        assert "initialize failed on purpose" in index(client)["mc_p3"][0]["reason"]
        infer_simple(client)
    finally:
        client.close()
