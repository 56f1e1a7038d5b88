"""Repository agents: lifecycle order, resolution, checksum, decrypt. Real files, real agents."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import stat
import sys
import textwrap
import tracemalloc
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from shmserve.repoagents import (
    AgentChain,
    AgentError,
    AgentImportError,
    AgentNotFound,
    AgentStateError,
    ChainState,
    agents_from_config,
    resolve_agent,
)
from shmserve.repoagents.checksum import ChecksumAgent, file_digest
from shmserve.repoagents.decrypt import (
    DecryptAgent,
    decrypt_file,
    encrypt_file,
    encrypt_model,
    key_id,
    main,
    parse_key,
    write_key_file,
)

DOCS = Path(__file__).resolve().parent.parent / "docs" / "repoagents.md"

RECORDER = textwrap.dedent(
    '''
    """Records every action it sees into the file named by its "log" parameter."""
    from shmserve.repoagents import Action, AgentContext, AgentError, RepoAgent


    class Agent(RepoAgent):
        def handle(self, action: Action, model: AgentContext) -> None:
            with open(model.parameters["log"], "a") as f:
                f.write(f"{model.agent_name} {action.value} {model.location}\\n")
            if model.parameters.get("fail_on") == action.value:
                raise AgentError(f"{model.agent_name} refuses {action.value}")
            if action is Action.LOAD and model.parameters.get("temp") == "yes":
                path = model.acquire_temporary_location()
                with open(model.parameters["log"], "a") as f:
                    f.write(f"{model.agent_name} TEMP {path}\\n")
    '''
)

CONFIG = 'name: "m"\nbackend: "python"\nmax_batch_size: 8\n'
MODEL_PY = b"class TritonPythonModel:\n    pass\n"


# ------------------------------------------------------------------------------------------
# fixtures and helpers


@pytest.fixture
def agent_dir(tmp_path: Path) -> Path:
    d = tmp_path / "repoagents"
    for name in ("rec_a", "rec_b", "rec_c"):
        (d / name).mkdir(parents=True)
        (d / name / "agent.py").write_text(RECORDER)
    return d


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    d = tmp_path / "models" / "m"
    (d / "1").mkdir(parents=True)
    (d / "config.pbtxt").write_text(CONFIG)
    (d / "1" / "model.py").write_bytes(MODEL_PY)
    return d


@pytest.fixture
def temp_root(tmp_path: Path) -> Path:
    d = tmp_path / "agent-tmp"
    d.mkdir()
    return d


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "keys" / "model.key"
    path.parent.mkdir()
    write_key_file(str(path))
    return path


def read_log(path: Path) -> list[str]:
    """'<agent> <ACTION>' lines of a recorder log."""
    if not path.exists():
        return []
    return [" ".join(line.split()[:2]) for line in path.read_text().splitlines()]


def log_entries(path: Path, kind: str) -> list[str]:
    """The third column of the lines of one kind (TEMP paths, LOAD locations)."""
    return [
        line.split(" ", 2)[2]
        for line in path.read_text().splitlines()
        if line.split(" ", 2)[1] == kind
    ]


def recorders(log: Path, *names: str, **extra: dict[str, str]) -> list[tuple[str, dict[str, str]]]:
    return [(name, {"log": str(log), **extra.get(name, {})}) for name in names]


def all_files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


# ------------------------------------------------------------------------------------------
# lifecycle order


def test_two_agents_full_lifecycle_order(tmp_path: Path, agent_dir: Path, model_dir: Path) -> None:
    log = tmp_path / "log"
    chain = AgentChain.create("m", recorders(log, "rec_a", "rec_b"), str(agent_dir))
    assert chain.names == ("rec_a", "rec_b")
    location = chain.load(str(model_dir), [1], {"name": "m"})
    assert location == str(model_dir)
    assert chain.state is ChainState.LOADED
    chain.load_complete()
    chain.unload()
    chain.unload()  # a repeated UNLOAD is ignored, as in Triton
    chain.unload_complete()
    chain.unload_complete()  # and so is a repeated UNLOAD_COMPLETE
    assert read_log(log) == [
        "rec_a LOAD",
        "rec_b LOAD",
        "rec_b LOAD_COMPLETE",
        "rec_a LOAD_COMPLETE",
        "rec_a UNLOAD",
        "rec_b UNLOAD",
        "rec_b UNLOAD_COMPLETE",
        "rec_a UNLOAD_COMPLETE",
    ]
    assert chain.state is ChainState.UNLOADED


def test_three_agents_full_lifecycle_order(
    tmp_path: Path, agent_dir: Path, model_dir: Path
) -> None:
    log = tmp_path / "log"
    chain = AgentChain.create("m", recorders(log, "rec_a", "rec_b", "rec_c"), str(agent_dir))
    chain.load(str(model_dir), [1], {})
    chain.load_complete()
    chain.unload()
    chain.unload_complete()
    assert read_log(log) == [
        "rec_a LOAD",
        "rec_b LOAD",
        "rec_c LOAD",
        "rec_c LOAD_COMPLETE",
        "rec_b LOAD_COMPLETE",
        "rec_a LOAD_COMPLETE",
        "rec_a UNLOAD",
        "rec_b UNLOAD",
        "rec_c UNLOAD",
        "rec_c UNLOAD_COMPLETE",
        "rec_b UNLOAD_COMPLETE",
        "rec_a UNLOAD_COMPLETE",
    ]


def test_load_fail_after_successful_load_is_reverse_and_removes_temporaries(
    tmp_path: Path, agent_dir: Path, model_dir: Path, temp_root: Path
) -> None:
    log = tmp_path / "log"
    agents = recorders(log, "rec_a", "rec_b", "rec_c", rec_a={"temp": "yes"}, rec_c={"temp": "yes"})
    chain = AgentChain.create("m", agents, str(agent_dir), temp_root=str(temp_root))
    chain.load(str(model_dir), [1], {})
    temps = log_entries(log, "TEMP")
    assert len(temps) == 2 and all(os.path.isdir(t) for t in temps)
    chain.load_fail()  # e.g. a worker failed to initialize
    chain.load_fail()  # idempotent
    assert read_log(log) == [
        "rec_a LOAD",
        "rec_a TEMP",
        "rec_b LOAD",
        "rec_c LOAD",
        "rec_c TEMP",
        "rec_c LOAD_FAIL",
        "rec_b LOAD_FAIL",
        "rec_a LOAD_FAIL",
    ]
    assert not any(os.path.exists(t) for t in temps)
    assert list(temp_root.iterdir()) == []
    with pytest.raises(AgentStateError):
        chain.load_complete()


def test_failing_agent_blocks_the_load_and_the_next_agent_is_never_called(
    tmp_path: Path, agent_dir: Path, model_dir: Path, temp_root: Path
) -> None:
    log = tmp_path / "log"
    agents = recorders(
        log,
        "rec_a",
        "rec_b",
        "rec_c",
        rec_a={"temp": "yes"},
        rec_b={"fail_on": "LOAD"},
    )
    chain = AgentChain.create("m", agents, str(agent_dir), temp_root=str(temp_root))
    with pytest.raises(AgentError) as info:
        chain.load(str(model_dir), [1], {})
    assert info.value.message == "rec_b refuses LOAD"
    assert info.value.agent == "rec_b"
    # Triton: the failing agent was invoked with LOAD, so it gets LOAD_FAIL (first), then
    # the earlier ones in reverse; the agent after it is never created nor called.
    assert read_log(log) == [
        "rec_a LOAD",
        "rec_a TEMP",
        "rec_b LOAD",
        "rec_b LOAD_FAIL",
        "rec_a LOAD_FAIL",
    ]
    assert list(temp_root.iterdir()) == []
    assert chain.state is ChainState.LOAD_FAILED
    chain.load_fail()  # the supervisor may call it again: a no-op
    chain.close()
    assert len(read_log(log)) == 5


def test_first_agent_failing_is_the_only_one_called(
    tmp_path: Path, agent_dir: Path, model_dir: Path
) -> None:
    log = tmp_path / "log"
    agents = recorders(log, "rec_a", "rec_b", rec_a={"fail_on": "LOAD"})
    chain = AgentChain.create("m", agents, str(agent_dir))
    with pytest.raises(AgentError, match="rec_a refuses LOAD"):
        chain.load(str(model_dir), [1], {})
    assert read_log(log) == ["rec_a LOAD", "rec_a LOAD_FAIL"]


def test_errors_after_load_are_logged_not_raised(
    tmp_path: Path, agent_dir: Path, model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    log = tmp_path / "log"
    agents = recorders(
        log,
        "rec_a",
        "rec_b",
        rec_a={"fail_on": "UNLOAD"},
        rec_b={"fail_on": "LOAD_COMPLETE"},
    )
    chain = AgentChain.create("m", agents, str(agent_dir))
    chain.load(str(model_dir), [1], {})
    with caplog.at_level(logging.ERROR, logger="shmserve.repoagents"):
        chain.load_complete()
        chain.unload()
    chain.unload_complete()
    assert read_log(log) == [
        "rec_a LOAD",
        "rec_b LOAD",
        "rec_b LOAD_COMPLETE",
        "rec_a LOAD_COMPLETE",
        "rec_a UNLOAD",
        "rec_b UNLOAD",
        "rec_b UNLOAD_COMPLETE",
        "rec_a UNLOAD_COMPLETE",
    ]
    messages = [r.getMessage() for r in caplog.records]
    assert any("rec_b refuses LOAD_COMPLETE" in m for m in messages)
    assert any("rec_a refuses UNLOAD" in m for m in messages)


def test_out_of_order_actions_are_refused(tmp_path: Path, agent_dir: Path, model_dir: Path) -> None:
    chain = AgentChain.create("m", recorders(tmp_path / "log", "rec_a"), str(agent_dir))
    with pytest.raises(AgentStateError):
        chain.unload()
    chain.load(str(model_dir), [1], {})
    with pytest.raises(AgentStateError):
        chain.load(str(model_dir), [1], {})
    with pytest.raises(AgentStateError):
        chain.unload()  # UNLOAD before LOAD_COMPLETE
    with pytest.raises(AgentStateError):
        chain.unload_complete()


def test_close_finishes_an_open_lifecycle(
    tmp_path: Path, agent_dir: Path, model_dir: Path, temp_root: Path
) -> None:
    log = tmp_path / "log"
    agents = recorders(log, "rec_a", "rec_b", rec_b={"temp": "yes"})
    chain = AgentChain.create("m", agents, str(agent_dir), temp_root=str(temp_root))
    chain.load(str(model_dir), [1], {})
    chain.load_complete()
    chain.close()
    chain.close()
    assert read_log(log)[-4:] == [
        "rec_a UNLOAD",
        "rec_b UNLOAD",
        "rec_b UNLOAD_COMPLETE",
        "rec_a UNLOAD_COMPLETE",
    ]
    assert list(temp_root.iterdir()) == []


def test_no_agents_is_a_pass_through(model_dir: Path) -> None:
    chain = AgentChain.from_config("m", {"name": "m"}, None)
    assert len(chain) == 0
    assert chain.load(str(model_dir), [1], {}) == str(model_dir)
    chain.load_complete()
    chain.unload()
    chain.unload_complete()


def test_unexpected_exception_in_an_agent_becomes_an_agent_error(
    tmp_path: Path, model_dir: Path
) -> None:
    d = tmp_path / "agents" / "buggy"
    d.mkdir(parents=True)
    (d / "agent.py").write_text(
        "from shmserve.repoagents import Action, RepoAgent\n"
        "class Agent(RepoAgent):\n"
        "    def handle(self, action, model):\n"
        "        if action is Action.LOAD:\n"
        "            raise KeyError('oops')\n"
    )
    chain = AgentChain.create("m", [("buggy", {})], str(tmp_path / "agents"))
    with pytest.raises(AgentError, match=r"repository agent 'buggy' failed on .*KeyError"):
        chain.load(str(model_dir), [1], {})


# ------------------------------------------------------------------------------------------
# locations


def test_documented_example_agent_rewrites_config_in_a_private_location(
    tmp_path: Path, agent_dir: Path, model_dir: Path, temp_root: Path
) -> None:
    text = DOCS.read_text()
    match = re.search(r"<!-- example-agent -->\s*```python\n(.*?)```", text, re.S)
    assert match, "docs/repoagents.md lost its example agent"
    (agent_dir / "pbtxt_override").mkdir()
    (agent_dir / "pbtxt_override" / "agent.py").write_text(match.group(1))

    log = tmp_path / "log"
    agents = [
        ("pbtxt_override", {"max_batch_size": "32"}),
        *recorders(log, "rec_a"),
    ]
    original = all_files(model_dir)
    chain = AgentChain.create("m", agents, str(agent_dir), temp_root=str(temp_root))
    location = chain.load(str(model_dir), [1], {"name": "m", "max_batch_size": 8})

    assert location != str(model_dir)
    assert Path(location).parent == temp_root
    assert stat.S_IMODE(os.stat(location).st_mode) == 0o700
    config = (Path(location) / "config.pbtxt").read_text()
    assert "max_batch_size: 32" in config and "max_batch_size: 8" not in config
    assert (Path(location) / "1" / "model.py").read_bytes() == MODEL_PY
    # the next agent started from the new location
    assert log_entries(log, "LOAD") == [location]
    assert all_files(model_dir) == original  # the repository itself is untouched

    chain.load_complete()
    chain.unload()
    assert os.path.isdir(location)
    chain.unload_complete()
    assert not os.path.exists(location)


def test_set_location_only_during_load(tmp_path: Path, model_dir: Path) -> None:
    d = tmp_path / "agents" / "late"
    d.mkdir(parents=True)
    (d / "agent.py").write_text(
        "from shmserve.repoagents import Action, RepoAgent\n"
        "class Agent(RepoAgent):\n"
        "    def handle(self, action, model):\n"
        "        if action is Action.LOAD_COMPLETE:\n"
        "            model.set_location(model.location)\n"
    )
    chain = AgentChain.create("m", [("late", {})], str(tmp_path / "agents"))
    chain.load(str(model_dir), [1], {})
    chain.load_complete()  # the agent's error is logged, not raised
    assert chain.state is ChainState.COMPLETE


def test_config_reader_gives_later_agents_the_config_at_the_previous_location(
    tmp_path: Path, model_dir: Path
) -> None:
    d = tmp_path / "agents" / "seer"
    d.mkdir(parents=True)
    (d / "agent.py").write_text(
        "from shmserve.repoagents import Action, RepoAgent\n"
        "SEEN = []\n"
        "class Agent(RepoAgent):\n"
        "    def handle(self, action, model):\n"
        "        if action is Action.LOAD:\n"
        "            SEEN.append(dict(model.config))\n"
    )
    chain = AgentChain.create("m", [("seer", {}), ("seer", {})], str(tmp_path / "agents"))

    def reader(path: str) -> dict[str, Any]:
        return {"read_from": path}

    chain.load(str(model_dir), [1], {"name": "m"}, config_reader=reader)
    factory, _origin = resolve_agent("seer", str(tmp_path / "agents"))
    seen = sys.modules[factory.__module__].SEEN
    assert seen == [{"name": "m"}, {"read_from": str(model_dir)}]


def test_agents_from_config_accepts_both_json_forms() -> None:
    config = {
        "model_repository_agents": {
            "agents": [
                {"name": "checksum", "parameters": {"MD5:1/model.py": "abc"}},
                {"name": "decrypt", "parameters": [{"key": "key_env", "value": "K"}]},
                {"name": "plain"},
            ]
        }
    }
    assert agents_from_config(config) == [
        ("checksum", {"MD5:1/model.py": "abc"}),
        ("decrypt", {"key_env": "K"}),
        ("plain", {}),
    ]
    assert agents_from_config({}) == []


def test_chains_run_concurrently_from_a_thread_pool(
    tmp_path: Path, agent_dir: Path, model_dir: Path, key_file: Path, temp_root: Path
) -> None:
    encrypted = tmp_path / "enc" / "m"
    encrypt_model(str(model_dir), str(encrypted), key_file=str(key_file))

    def one(i: int) -> bytes:
        chain = AgentChain.create(
            "m", [("decrypt", {"key_file": str(key_file)})], None, temp_root=str(temp_root)
        )
        location = chain.load(str(encrypted), [1], {})
        data = (Path(location) / "1" / "model.py").read_bytes()
        chain.load_complete()
        chain.unload()
        chain.unload_complete()
        return data

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(one, range(16)))
    assert results == [MODEL_PY] * 16
    assert list(temp_root.iterdir()) == []


# ------------------------------------------------------------------------------------------
# resolution


def test_not_found_and_import_failure_are_different_errors(tmp_path: Path, agent_dir: Path) -> None:
    with pytest.raises(AgentNotFound, match="unable to find repository agent 'nope'") as nf:
        AgentChain.create("m", [("nope", {})], str(agent_dir))
    assert not isinstance(nf.value, AgentImportError)
    assert str(agent_dir / "nope" / "agent.py") in nf.value.message
    with pytest.raises(AgentNotFound):
        AgentChain.create("m", [("nope", {})], None)

    (agent_dir / "broken").mkdir()
    (agent_dir / "broken" / "agent.py").write_text("import not_a_module_anywhere_xyz\n")
    with pytest.raises(AgentImportError, match="not_a_module_anywhere_xyz") as ie:
        AgentChain.create("m", [("broken", {})], str(agent_dir))
    assert not isinstance(ie.value, AgentNotFound)
    assert "ModuleNotFoundError" in ie.value.message

    (agent_dir / "syntax").mkdir()
    (agent_dir / "syntax" / "agent.py").write_text("class Agent(:\n")
    with pytest.raises(AgentImportError, match="SyntaxError"):
        AgentChain.create("m", [("syntax", {})], str(agent_dir))

    (agent_dir / "noclass").mkdir()
    (agent_dir / "noclass" / "agent.py").write_text("x = 1\n")
    with pytest.raises(AgentImportError, match="does not define a class named 'Agent'"):
        AgentChain.create("m", [("noclass", {})], str(agent_dir))

    (agent_dir / "nohandle").mkdir()
    (agent_dir / "nohandle" / "agent.py").write_text("class Agent:\n    pass\n")
    with pytest.raises(AgentImportError, match="has no handle"):
        AgentChain.create("m", [("nohandle", {})], str(agent_dir))


def test_a_missing_agent_fails_before_any_agent_runs(tmp_path: Path, agent_dir: Path) -> None:
    log = tmp_path / "log"
    with pytest.raises(AgentNotFound):
        AgentChain.create("m", [*recorders(log, "rec_a"), ("missing", {})], str(agent_dir))
    assert read_log(log) == []


@pytest.mark.parametrize("name", ["../rec_a", "a/b", ".hidden", "", "x y"])
def test_unsafe_agent_names_are_refused(agent_dir: Path, name: str) -> None:
    with pytest.raises(AgentNotFound, match="invalid repository agent name"):
        AgentChain.create("m", [(name, {})], str(agent_dir))


def test_builtins_resolve_and_a_triton_agent_directory_is_skipped(tmp_path: Path) -> None:
    factory, origin = resolve_agent("checksum", None)
    assert factory is ChecksumAgent
    assert origin in (
        "built-in shmserve.repoagents.checksum:ChecksumAgent",
        "entry point shmserve.repoagents.checksum:ChecksumAgent",
    )
    factory, _origin = resolve_agent("decrypt", None)
    assert factory is DecryptAgent
    # A Triton install has <dir>/checksum/libtritonrepoagent_checksum.so and no agent.py
    (tmp_path / "checksum").mkdir()
    (tmp_path / "checksum" / "libtritonrepoagent_checksum.so").write_bytes(b"\x7fELF")
    factory, _origin = resolve_agent("checksum", str(tmp_path))
    assert factory is ChecksumAgent


def test_agent_directory_wins_and_may_import_its_siblings(tmp_path: Path) -> None:
    d = tmp_path / "checksum"
    d.mkdir()
    (d / "helpers.py").write_text("GREETING = 'local checksum'\n")
    (d / "agent.py").write_text(
        "from shmserve.repoagents import RepoAgent\n"
        "from . import helpers\n"
        "class Agent(RepoAgent):\n"
        "    greeting = helpers.GREETING\n"
    )
    factory, origin = resolve_agent("checksum", str(tmp_path))
    assert factory.greeting == "local checksum"
    assert origin == str(d / "agent.py")
    # imported once per file version
    again, _ = resolve_agent("checksum", str(tmp_path))
    assert again is factory


def test_entry_points_resolve_and_their_import_errors_are_import_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    site = tmp_path / "site"
    dist = site / "fake_agents-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-agents\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[shmserve.repoagents]\n"
        "ep_good = fake_agents_mod:GoodAgent\n"
        "ep_bad = fake_agents_broken_mod:Agent\n"
    )
    (site / "fake_agents_mod.py").write_text(
        "from shmserve.repoagents import RepoAgent\nclass GoodAgent(RepoAgent):\n    pass\n"
    )
    (site / "fake_agents_broken_mod.py").write_text("raise RuntimeError('cannot start')\n")
    monkeypatch.syspath_prepend(str(site))
    try:
        factory, origin = resolve_agent("ep_good", None)
        assert factory.__name__ == "GoodAgent"
        assert "fake_agents_mod:GoodAgent" in origin
        with pytest.raises(AgentImportError, match="RuntimeError: cannot start"):
            resolve_agent("ep_bad", None)
    finally:
        for mod in ("fake_agents_mod", "fake_agents_broken_mod"):
            sys.modules.pop(mod, None)


# ------------------------------------------------------------------------------------------
# checksum


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def checksum_load(model_dir: Path, parameters: dict[str, str]) -> str:
    chain = AgentChain.create("m", [("checksum", parameters)], None)
    location = chain.load(str(model_dir), [1], {})
    chain.load_complete()
    chain.unload()
    chain.unload_complete()
    return location


def checksum_error(model_dir: Path, parameters: dict[str, str]) -> str:
    chain = AgentChain.create("m", [("checksum", parameters)], None)
    with pytest.raises(AgentError) as info:
        chain.load(str(model_dir), [1], {})
    assert info.value.agent == "checksum"
    return info.value.message


def test_checksum_ok_md5_any_case_and_sha256(model_dir: Path) -> None:
    weights = os.urandom(3 << 20)
    (model_dir / "1" / "weights.bin").write_bytes(weights)
    params = {
        "MD5:1/model.py": md5(MODEL_PY),
        "md5:config.pbtxt": md5(CONFIG.encode()),
        "SHA256:1/weights.bin": hashlib.sha256(weights).hexdigest(),
        "Sha256:1/model.py": hashlib.sha256(MODEL_PY).hexdigest(),
    }
    assert checksum_load(model_dir, params) == str(model_dir)


def test_checksum_mismatch_has_tritons_exact_text(model_dir: Path) -> None:
    expect = "0" * 32
    got = md5(MODEL_PY)
    assert checksum_error(model_dir, {"MD5:1/model.py": expect}) == (
        f"Mismatched MD5 hash for file 1/model.py, expect: {expect}, got: {got}"
    )
    sha = hashlib.sha256(MODEL_PY).hexdigest()
    assert checksum_error(model_dir, {"sha256:1/model.py": "ab"}) == (
        f"Mismatched SHA256 hash for file 1/model.py, expect: ab, got: {sha}"
    )
    # compared exactly, as in Triton: an uppercase digest does not match
    assert checksum_error(model_dir, {"MD5:1/model.py": got.upper()}).startswith(
        "Mismatched MD5 hash for file 1/model.py"
    )


def test_checksum_bad_key_unsupported_algorithm_and_missing_file(model_dir: Path) -> None:
    assert checksum_error(model_dir, {"1/model.py": "x"}) == "failed to parse key: 1/model.py"
    assert checksum_error(model_dir, {"SHA1:1/model.py": "x"}) == (
        "Unsupported checksum algorithm: SHA1"
    )
    assert checksum_error(model_dir, {"MD5:1/missing.bin": "x"}) == (
        "failed to open text file for read 1/missing.bin: No such file or directory"
    )
    assert checksum_error(model_dir, {"MD5:1": "x"}) == (
        "failed to open text file for read 1: Is a directory"
    )
    assert checksum_error(model_dir, {"MD5:../m/config.pbtxt": "x"}) == (
        "failed to open text file for read ../m/config.pbtxt: path escapes the model directory"
    )
    assert checksum_error(model_dir, {"MD5:/etc/hostname": "x"}).endswith(
        "path escapes the model directory"
    )


def test_checksum_stops_at_the_first_problem(model_dir: Path) -> None:
    params = {"MD5:1/model.py": "bad", "nocolon": "x"}
    assert checksum_error(model_dir, params).startswith("Mismatched MD5 hash")


def test_checksum_large_sparse_file_is_hashed_in_chunks(model_dir: Path) -> None:
    size = 50 << 20
    path = model_dir / "1" / "big.bin"
    with open(path, "wb") as f:
        f.truncate(size - 5)
        f.seek(size - 5)
        f.write(b"tail!")
    expected_md5 = hashlib.md5()
    expected_sha = hashlib.sha256()
    zeros = bytes(1 << 20)
    remaining = size - 5
    while remaining:
        n = min(remaining, len(zeros))
        expected_md5.update(zeros[:n])
        expected_sha.update(zeros[:n])
        remaining -= n
    expected_md5.update(b"tail!")
    expected_sha.update(b"tail!")

    tracemalloc.start()
    try:
        assert file_digest(str(path), "md5") == expected_md5.hexdigest()
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"hashing held {peak} bytes: the file was read whole"

    checksum_load(
        model_dir,
        {"MD5:1/big.bin": expected_md5.hexdigest(), "SHA256:1/big.bin": expected_sha.hexdigest()},
    )


def test_checksum_only_acts_on_load(model_dir: Path) -> None:
    chain = AgentChain.create("m", [("checksum", {"MD5:1/model.py": md5(MODEL_PY)})], None)
    chain.load(str(model_dir), [1], {})
    (model_dir / "1" / "model.py").unlink()
    chain.load_complete()
    chain.unload()
    chain.unload_complete()
    assert chain.state is ChainState.UNLOADED


# ------------------------------------------------------------------------------------------
# decrypt


@pytest.fixture
def plain_model(tmp_path: Path) -> Iterator[tuple[Path, bytes]]:
    """A model whose weights contain a unique marker, to look for plaintext leaks."""
    d = tmp_path / "plain" / "m"
    (d / "1" / "sub").mkdir(parents=True)
    marker = b"PLAINTEXT-MARKER-" + os.urandom(8).hex().encode()
    (d / "config.pbtxt").write_text(CONFIG)
    (d / "1" / "model.py").write_bytes(MODEL_PY + b"# " + marker + b"\n")
    (d / "1" / "sub" / "weights.bin").write_bytes(os.urandom((3 << 20) + 7) + marker)
    (d / "1" / "empty.txt").write_bytes(b"")
    yield d, marker


def test_decrypt_round_trip_serves_the_right_bytes_from_a_private_location(
    tmp_path: Path, plain_model: tuple[Path, bytes], key_file: Path, temp_root: Path
) -> None:
    plain, marker = plain_model
    encrypted = tmp_path / "repo" / "m"
    result = encrypt_model(str(plain), str(encrypted), key_file=str(key_file))
    assert sorted(result.encrypted) == ["1/empty.txt", "1/model.py", "1/sub/weights.bin"]
    assert result.agent_config_added

    repo_before = all_files(encrypted)
    assert sorted(repo_before) == [
        "1/empty.txt.enc",
        "1/model.py.enc",
        "1/sub/weights.bin.enc",
        "config.pbtxt",
    ]
    assert not any(marker in data for data in repo_before.values())

    # the appended section is valid config and names the agent with the absolute key path
    config_text = repo_before["config.pbtxt"].decode()
    assert config_text.startswith(CONFIG)
    model_config_pb2 = pytest.importorskip("shmserve.protos.shmserve_model_config_pb2")
    from google.protobuf import json_format, text_format

    message = text_format.Parse(config_text, model_config_pb2.ModelConfig())
    config = json_format.MessageToDict(message, preserving_proto_field_name=True)
    assert agents_from_config(config) == [("decrypt", {"key_file": str(key_file)})]

    chain = AgentChain.from_config("m", config, None, temp_root=str(temp_root))
    location = Path(chain.load(str(encrypted), [1], config))
    assert location.parent == temp_root
    assert stat.S_IMODE(location.stat().st_mode) == 0o700
    served = all_files(location)
    assert served.pop("config.pbtxt") == repo_before["config.pbtxt"]  # plaintext, copied
    expected = all_files(plain)
    del expected["config.pbtxt"]
    assert served == expected
    assert stat.S_IMODE((location / "1" / "model.py").stat().st_mode) == 0o600
    assert all_files(encrypted) == repo_before  # no plaintext written into the repository

    chain.load_complete()
    chain.unload()
    assert location.is_dir()
    chain.unload_complete()
    assert not location.exists()
    assert list(temp_root.iterdir()) == []
    assert all_files(encrypted) == repo_before


def test_decrypt_location_is_removed_when_a_later_agent_fails(
    tmp_path: Path,
    plain_model: tuple[Path, bytes],
    key_file: Path,
    agent_dir: Path,
    temp_root: Path,
) -> None:
    plain, _marker = plain_model
    encrypted = tmp_path / "repo" / "m"
    encrypt_model(str(plain), str(encrypted), key_file=str(key_file))
    log = tmp_path / "log"
    agents = [
        ("decrypt", {"key_file": str(key_file)}),
        *recorders(log, "rec_a", rec_a={"fail_on": "LOAD"}),
    ]
    chain = AgentChain.create("m", agents, str(agent_dir), temp_root=str(temp_root))
    with pytest.raises(AgentError, match="rec_a refuses LOAD"):
        chain.load(str(encrypted), [1], {})
    (decrypted,) = log_entries(log, "LOAD")
    assert Path(decrypted).parent == temp_root
    assert not os.path.exists(decrypted)
    assert list(temp_root.iterdir()) == []


def test_decrypt_wrong_key_fails_clearly_and_cleans_up(
    tmp_path: Path, plain_model: tuple[Path, bytes], key_file: Path, temp_root: Path
) -> None:
    plain, _marker = plain_model
    encrypted = tmp_path / "repo" / "m"
    encrypt_model(str(plain), str(encrypted), key_file=str(key_file))
    other = tmp_path / "keys" / "other.key"
    write_key_file(str(other))
    chain = AgentChain.create(
        "m", [("decrypt", {"key_file": str(other)})], None, temp_root=str(temp_root)
    )
    with pytest.raises(AgentError) as info:
        chain.load(str(encrypted), [1], {})
    assert info.value.message.startswith("failed to decrypt '1/empty.txt.enc': wrong key")
    assert info.value.agent == "decrypt"
    assert list(temp_root.iterdir()) == []


@pytest.mark.parametrize("offset", [40, -1, -20])
def test_decrypt_tampered_ciphertext_fails_naming_the_file(
    tmp_path: Path,
    plain_model: tuple[Path, bytes],
    key_file: Path,
    temp_root: Path,
    offset: int,
) -> None:
    plain, _marker = plain_model
    encrypted = tmp_path / "repo" / "m"
    encrypt_model(str(plain), str(encrypted), key_file=str(key_file))
    target = encrypted / "1" / "sub" / "weights.bin.enc"
    data = bytearray(target.read_bytes())
    data[offset] ^= 0x01
    target.write_bytes(bytes(data))
    chain = AgentChain.create(
        "m", [("decrypt", {"key_file": str(key_file)})], None, temp_root=str(temp_root)
    )
    with pytest.raises(AgentError) as info:
        chain.load(str(encrypted), [1], {})
    assert info.value.message.startswith(
        "failed to decrypt '1/sub/weights.bin.enc': authentication failed"
    )
    assert list(temp_root.iterdir()) == []


def test_decrypt_detects_truncation_extension_and_swapped_files(
    tmp_path: Path, key_file: Path
) -> None:
    key = parse_key(key_file.read_bytes(), "test")
    src = tmp_path / "data.bin"
    payload = os.urandom(16 * 5)  # an exact multiple of the chunk size
    src.write_bytes(payload)
    enc = tmp_path / "data.bin.enc"
    encrypt_file(key, str(src), str(enc), chunk_size=16)
    out = tmp_path / "out.bin"
    decrypt_file(key, str(enc), str(out), name="data.bin")
    assert out.read_bytes() == payload
    out.unlink()

    sealed = enc.read_bytes()
    chunk = 16 + 16
    header = len(sealed) - 5 * chunk
    cases = {
        "truncated": sealed[:-chunk],
        "extended": sealed + sealed[header : header + chunk],
        "reordered": sealed[:header]
        + sealed[header + chunk : header + 2 * chunk]
        + sealed[header : header + chunk]
        + sealed[header + 2 * chunk :],
    }
    for what, blob in cases.items():
        bad = tmp_path / f"{what}.enc"
        bad.write_bytes(blob)
        with pytest.raises(AgentError, match="authentication failed"):
            decrypt_file(key, str(bad), str(out), name="data.bin")
        assert not out.exists(), what
    # the same ciphertext under another file name is refused
    with pytest.raises(AgentError, match="authentication failed"):
        decrypt_file(key, str(enc), str(out), name="other.bin")


@pytest.mark.parametrize("size", [0, 1, 15, 16, 17, 64])
def test_encrypt_decrypt_file_sizes(tmp_path: Path, key_file: Path, size: int) -> None:
    key = parse_key(key_file.read_text(), "test")
    src = tmp_path / "f"
    src.write_bytes(os.urandom(size))
    encrypt_file(key, str(src), str(tmp_path / "f.enc"), chunk_size=16)
    decrypt_file(key, str(tmp_path / "f.enc"), str(tmp_path / "g"), name="f")
    assert (tmp_path / "g").read_bytes() == src.read_bytes()


def test_decrypt_with_key_from_environment_and_encrypted_config(
    tmp_path: Path,
    plain_model: tuple[Path, bytes],
    key_file: Path,
    temp_root: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    plain, marker = plain_model
    monkeypatch.setenv("SHMSERVE_TEST_MODEL_KEY", key_file.read_text().strip())
    encrypted = tmp_path / "repo" / "m"
    encrypt_model(
        str(plain), str(encrypted), key_env="SHMSERVE_TEST_MODEL_KEY", encrypt_config=True
    )
    stub = (encrypted / "config.pbtxt").read_text()
    assert "backend" not in stub and 'name: "m"' in stub
    assert 'key: "key_env" value: "SHMSERVE_TEST_MODEL_KEY"' in stub
    assert (encrypted / "config.pbtxt.enc").exists()

    chain = AgentChain.create(
        "m", [("decrypt", {"key_env": "SHMSERVE_TEST_MODEL_KEY"})], None, temp_root=str(temp_root)
    )
    location = Path(chain.load(str(encrypted), [1], {}))
    assert (location / "config.pbtxt").read_text() == CONFIG  # the encrypted one wins
    assert all_files(location) == all_files(plain)
    assert not any(marker in data for data in all_files(encrypted).values())
    chain.close()
    assert not location.exists()

    monkeypatch.delenv("SHMSERVE_TEST_MODEL_KEY")
    chain = AgentChain.create("m", [("decrypt", {"key_env": "SHMSERVE_TEST_MODEL_KEY"})], None)
    with pytest.raises(AgentError, match="'SHMSERVE_TEST_MODEL_KEY' holding the key is not set"):
        chain.load(str(encrypted), [1], {})


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        ({}, "exactly one of the parameters 'key_file' or 'key_env'"),
        ({"key_file": "/a", "key_env": "B"}, "exactly one of the parameters"),
        ({"key_file": "relative.key"}, "key_file must be an absolute path"),
        ({"key_file": "/nonexistent/dir/x.key"}, "cannot read key file '/nonexistent/dir/x.key'"),
        ({"key": "x"}, "unknown parameter(s) 'key'"),
    ],
)
def test_decrypt_parameter_errors(
    model_dir: Path, parameters: dict[str, str], message: str
) -> None:
    chain = AgentChain.create("m", [("decrypt", parameters)], None)
    with pytest.raises(AgentError) as info:
        chain.load(str(model_dir), [1], {})
    assert message in info.value.message


def test_keys_parse_in_every_documented_form(tmp_path: Path) -> None:
    key = os.urandom(32)
    path = tmp_path / "k"
    write_key_file(str(path), key)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert parse_key(path.read_bytes(), "file") == key
    assert parse_key(key.hex(), "hex") == key
    assert parse_key(key, "raw") == key
    with pytest.raises(ValueError, match="invalid key in short"):
        parse_key("abcd", "short")
    assert key_id(key) != key_id(os.urandom(32))
    with pytest.raises(FileExistsError):
        write_key_file(str(path))


def test_encrypt_model_cli(
    tmp_path: Path,
    plain_model: tuple[Path, bytes],
    temp_root: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    plain, marker = plain_model
    key = tmp_path / "cli.key"
    assert main(["--generate-key", str(key)]) == 0
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert main(["--generate-key", str(key)]) == 1  # never overwritten
    assert "already exists" in capsys.readouterr().err

    out = tmp_path / "out" / "m"
    assert main([str(plain), str(out), "--key-file", str(key)]) == 0
    assert "added the decrypt repository agent" in capsys.readouterr().out
    assert not any(marker in data for data in all_files(out).values())
    assert main([str(plain), str(out), "--key-file", str(key)]) == 1  # destination not empty
    assert "not an empty directory" in capsys.readouterr().err
    assert main([str(plain)]) == 2
    assert main([]) == 2
    assert main(["--help"]) == 0
    capsys.readouterr()

    chain = AgentChain.create(
        "m", [("decrypt", {"key_file": str(key)})], None, temp_root=str(temp_root)
    )
    location = Path(chain.load(str(out), [1], {}))
    assert all_files(location)["1/sub/weights.bin"] == (plain / "1/sub/weights.bin").read_bytes()
    chain.close()

    # --generate-key with SRC DST encrypts with the new key
    out2 = tmp_path / "out2" / "m"
    key2 = tmp_path / "cli2.key"
    assert main(["--generate-key", str(key2), str(plain), str(out2)]) == 0
    assert str(key2) in (out2 / "config.pbtxt").read_text()
