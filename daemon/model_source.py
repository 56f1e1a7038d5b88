"""Where a model's files come from: names, config.pbtxt, versions, overrides, fingerprints.

Plain functions over the repository's files; the ModelManager (models.py) drives them. Problems
are PollError: Triton's "failed to poll from model repository".
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from google.protobuf import text_format

from shmserve.daemon.errors import invalid_argument
from shmserve.daemon.model_config import (
    CONFIG_FILE,
    ConfigError,
    complete_config,
    config_path,
    config_to_dict,
    read_config,
    select_versions,
)
from shmserve.protos import shmserve_model_config_pb2 as mc

FINGERPRINT_SKIP_DIRS = {"__pycache__"}

Fingerprint = tuple[tuple[str, int, int], ...]


class PollError(Exception):
    """A model that cannot even be prepared for loading (Triton's "failed to poll")."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


def validate_name(name: str) -> None:
    """Triton's ValidateModelName (model_repository_manager.cc)."""
    if not name:
        raise invalid_argument("model name must not be empty")
    if not name.strip(" \t\n\v\f\r"):
        raise invalid_argument("model name must not contain only whitespace characters")
    if ".." in name or "/" in name or "\0" in name:
        raise invalid_argument(f"invalid model name '{name}', model name must not contain "
                               f"path traversal characters")


def read_repository_config(model_dir: Path, config_name: str = "") -> mc.ModelConfig:
    try:
        return read_config(model_dir, missing_ok=True, config_name=config_name)
    except ConfigError as exc:
        raise PollError(str(exc)) from None


def complete_for(config: mc.ModelConfig, config_dir: Path, named_dir: Path,
                 gpu_ids: list[int], overridden: bool = False, config_name: str = "") -> None:
    """Fill defaults and validate; the model is named after ``named_dir`` (the repository
    folder) even when the config was read from an agent's temporary location. Messages
    name where the config came from (a file, or the "config" load parameter)."""
    try:
        complete_config(config, named_dir, gpu_ids, config_name)
    except ConfigError as exc:
        text = str(exc)
        written = str(config_path(named_dir, config_name))
        if overridden:
            text = text.replace(written, "load parameter 'config'")
        elif config_dir != named_dir:
            text = text.replace(written, str(config_path(config_dir, config_name)))
        raise PollError(text) from None


def select_model_versions(model_dir: Path, config: mc.ModelConfig) -> list[int]:
    try:
        return select_versions(model_dir, config)
    except OSError as exc:
        raise PollError(f"cannot list versions of '{model_dir}': {exc.strerror}") from None


def agent_config_reader(location: str, config_name: str = "") -> dict[str, Any]:
    """What agents after the first see: the config at the previous agent's location."""
    return config_to_dict(read_config(Path(location), config_name=config_name))


def fingerprint(model_dir: Path) -> Fingerprint:
    """(relative path, mtime_ns, size) of every file; Python's bytecode caches excluded
    (the python backend writes them next to model.py and they must not look like edits)."""
    entries = []
    for root, dirs, names in os.walk(model_dir):
        dirs[:] = [d for d in dirs if d not in FINGERPRINT_SKIP_DIRS]
        for file_name in names:
            path = os.path.join(root, file_name)
            try:
                info = os.stat(path)
            except OSError:
                continue
            entries.append((os.path.relpath(path, model_dir), info.st_mtime_ns, info.st_size))
    return tuple(sorted(entries))


def write_override_files(model_dir: Path, files: Mapping[str, bytes],
                          config: mc.ModelConfig) -> None:
    """Triton's LocalizeRepoAgent: config.pbtxt from the "config" override, then each
    "file:<path>" under the model directory (which it may not leave)."""
    try:
        model_dir.mkdir(parents=True, mode=0o700)
        (model_dir / CONFIG_FILE).write_text(text_format.MessageToString(config))
        root = os.path.realpath(model_dir)
        for relative, content in files.items():
            key = f"file:{relative}"
            target = os.path.realpath(os.path.join(root, relative))
            if not target.startswith(root + os.sep):
                raise PollError(f"Invalid file parameter '{key}' with normalized path "
                                f"'{target}' must stay within model directory.")
            parent = os.path.dirname(target)
            if os.path.exists(parent) and not os.path.isdir(parent):
                raise PollError(f"Invalid file parameter '{key}', directory has been created "
                                f"as a file")
            os.makedirs(parent, exist_ok=True)
            with open(target, "wb") as f:
                f.write(content)
    except OSError as exc:
        raise PollError(f"failed to write model file override: {exc}") from None


def remove_dir(path: str | None) -> None:
    if path and os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
