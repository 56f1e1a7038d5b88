"""The command line: one settings table behind `serve`'s options, real subcommands, --help,
--version. Pure parsing, plus the installed `shmserve` entry point run as a user would."""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

from shmserve.daemon import admin_shm, cli
from shmserve.daemon.settings import Settings, SettingSpec, setting_fields
from shmserve.repoagents import decrypt


def _shmserve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shmserve.daemon", *args],
                          capture_output=True, text=True, timeout=60)


def _serve_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    cli.add_setting_arguments(parser)
    return parser


def test_every_setting_has_one_table_row_and_flags_come_from_it() -> None:
    rows = setting_fields()
    assert [item.name for item, _ in rows] == [f.name for f in dataclasses.fields(Settings)]
    assert all(isinstance(spec, SettingSpec) and spec.help for _, spec in rows)
    flags = [flag for _, spec in rows if spec.flag is not None
             for flag in (spec.flag, *spec.aliases)]
    assert len(flags) == len(set(flags))
    options = {option for action in _serve_parser()._actions for option in action.option_strings}
    assert options - {"-h", "--help"} == set(flags)
    # The lead's two settings are in the table (main adds their behaviour).
    assert {"--allow-client-shm", "--shm-allow-foreign-owners"} <= set(flags)


def test_tritonserver_aliases_mean_the_same_setting() -> None:
    """KServe's Triton runtime passes --model-store (tritonserver's older name)."""
    args = _serve_parser().parse_args(["--model-store=/mnt/models"])
    assert args.model_repository == "/mnt/models"


def test_defaults_of_the_parser_are_the_dataclass_defaults(monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    for _, spec in setting_fields():
        if spec.env is not None:
            monkeypatch.delenv(spec.env, raising=False)
    parsed = cli.settings_from_args(_serve_parser().parse_args(["--model-repository", "/m"]))
    assert parsed == Settings(model_repository="/m")
    assert parsed.exit_on_error is True and parsed.strict_readiness is True
    assert parsed.allow_client_shm is False and parsed.shm_allow_foreign_owners is False
    assert parsed.metrics_address == "" and parsed.load_models == []


def test_flags_parse_to_typed_settings() -> None:
    args = _serve_parser().parse_args([
        "--model-repository", "/m", "--grpc-port", "0", "--exit-on-error=false",
        "--strict-readiness", "no", "--load-model", "a", "--load-model", "b",
        "--grpc-restricted-protocol", "health,inference:key=v", "--pipeline-depth", "0",
        "--repository-poll-secs", "0.5", "--allow-client-shm", "true"])
    settings = cli.settings_from_args(args)
    assert settings.grpc_port == 0
    assert settings.exit_on_error is False and settings.strict_readiness is False
    assert settings.load_models == ["a", "b"]
    assert settings.restricted_protocols == [({"health", "inference"}, "key", "v")]
    assert settings.pipeline_depth == 1  # clamped, as before
    assert settings.repository_poll_secs == 0.5 and settings.allow_client_shm is True
    with pytest.raises(SystemExit):
        _serve_parser().parse_args(["--model-repository", "/m", "--exit-on-error", "maybe"])


def test_environment_variables_give_defaults_and_flags_win(monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    monkeypatch.setenv("SHMSERVE_LOCAL_RING_BYTES", "65536")
    monkeypatch.setenv("SHMSERVE_LOCAL_STALL_SECS", "2.5")
    parser = _serve_parser()
    settings = cli.settings_from_args(parser.parse_args(["--model-repository", "/m"]))
    assert settings.local_ring_bytes == 65536 and settings.local_stall_secs == 2.5
    settings = cli.settings_from_args(parser.parse_args(
        ["--model-repository", "/m", "--local-ring-bytes", "4096"]))
    assert settings.local_ring_bytes == 4096


def test_help_lists_each_subcommand_on_one_line() -> None:
    done = subprocess.run([sys.executable, "-m", "shmserve.daemon", "--help"],
                          capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, COLUMNS="80"))
    assert done.returncode == 0
    lines = done.stdout.splitlines()
    summaries = {"serve": "run the server on a model repository", "shm": admin_shm.SUMMARY,
                 "encrypt-model": decrypt.ENCRYPT_SUMMARY}
    for command, summary in summaries.items():
        [line] = [line for line in lines if re.match(rf"^\s+{command}\s", line)]
        assert line.split(None, 1)[1].strip() == summary, line


def test_version() -> None:
    done = _shmserve("--version")
    assert done.returncode == 0
    assert done.stdout.strip() == f"shmserve {version('shmserve')}"


def test_serve_help_shows_defaults_and_environment() -> None:
    done = _shmserve("serve", "--help")
    assert done.returncode == 0
    text = " ".join(done.stdout.split())
    assert "--grpc-port N gRPC port (0 = any free) (default: 8001)" in text
    assert "--exit-on-error [BOOL]" in text and "(default: true)" in text
    assert "--metrics-address ADDRESS" in text
    assert "env SHMSERVE_LOCAL_RING_BYTES" in text


def test_subcommands_are_real_and_unknown_ones_fail() -> None:
    assert _shmserve("nonsense").returncode == 2
    assert _shmserve("shm").returncode == 2          # ls or clean is required
    done = _shmserve("shm", "--help")
    assert done.returncode == 0 and "ls" in done.stdout and "clean" in done.stdout
    done = _shmserve("encrypt-model", "--help")
    assert done.returncode == 0 and "--key-file" in done.stdout
    assert _shmserve("encrypt-model").returncode == 2


def test_missing_or_wrong_repository_fails_at_once(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    done = _shmserve("serve", "--model-repository", str(missing), "--grpc-port", "0",
                     "--metrics-port", "0")
    assert done.returncode != 0
    assert str(missing) in done.stderr and "does not exist" in done.stderr
    assert "ready" not in done.stderr
    a_file = tmp_path / "file"
    a_file.write_text("x")
    done = _shmserve("serve", "--model-repository", str(a_file), "--grpc-port", "0",
                     "--metrics-port", "0")
    assert done.returncode != 0 and "is not a directory" in done.stderr


def test_installed_entry_point_runs() -> None:
    entry = Path(sys.executable).parent / "shmserve"
    if not entry.exists():
        found = shutil.which("shmserve")
        assert found, "the shmserve console script is not installed"
        entry = Path(found)
    done = subprocess.run([str(entry), "--version"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0 and done.stdout.startswith("shmserve ")
