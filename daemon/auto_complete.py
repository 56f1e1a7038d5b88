"""Triton's backend auto-completion of a model config, before any worker starts.

Two steps, both during load (models.py ``_prepare``):

* ``infer_backend``: a config (file, "config" override, or none at all) that names neither
  ``backend`` nor ``platform`` gets the backend of the version folder's default model file
  (Triton's ``GetNormalizedModelConfig`` / ``AutoCompleteBackendFields``).
* ``python_auto_complete``: a python model whose ``TritonPythonModel`` has a static
  ``auto_complete_config`` gets it run with Triton's semantics. The supervisor never imports
  user code: the hook runs in a throwaway child of the fork server (workers/auto_complete.py).
  A model file whose source never mentions ``auto_complete_config`` cannot define the hook
  (short of inheriting it from another module), so no child is started for it: loads of
  ordinary python models cost no extra process.
* ``dali_auto_complete``: a dali model whose config leaves inputs, outputs, their data types or
  dims, or max_batch_size unsaid gets them from its pipeline (Triton's DALI backend
  auto-complete), read in the same kind of throwaway child; a complete config starts no child.
* ``onnx_auto_complete``: an onnxruntime model whose config lacks inputs or outputs gets them
  (and max_batch_size, dynamic_batching) from the model's own signature, read in the same kind
  of child (the supervisor never imports onnxruntime). A config naming both inputs and outputs
  is left as it is, as Triton skips it: no extra process.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing.context
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from google.protobuf import json_format

from shmserve.daemon.model_config import config_path, config_to_dict, user_facing
from shmserve.protos import shmserve_model_config_pb2 as mc

if TYPE_CHECKING:
    from shmserve.workers.auto_complete import AutoCompleteResult

HOOK_NAME = "auto_complete_config"
AUTO_COMPLETE_TIMEOUT_SECS = 120.0

#: Triton's default model file names and the backend each implies, in Triton's order.
DEFAULT_MODEL_FILES: tuple[tuple[str, str], ...] = (
    ("model.plan", "tensorrt"),
    ("model.savedmodel", "tensorflow"),
    ("model.graphdef", "tensorflow"),
    ("model.pt", "pytorch"),
    ("model.onnx", "onnxruntime"),
    ("model.py", "python"),
)
_SUFFIX_BACKENDS = {".plan": "tensorrt", ".savedmodel": "tensorflow", ".graphdef": "tensorflow",
                    ".pt": "pytorch", ".onnx": "onnxruntime", ".py": "python"}


class AutoCompleteError(Exception):
    """The config cannot be completed; ``code`` is a gRPC status code name."""

    def __init__(self, message: str, code: str = "INVALID_ARGUMENT") -> None:
        super().__init__(message)
        self.message = message
        self.code = code


def version_dirs(model_dir: Path) -> list[Path]:
    """Version folders, highest first."""
    try:
        entries = [entry for entry in model_dir.iterdir()
                   if entry.is_dir() and entry.name.isdigit() and not entry.name.startswith("0")]
    except OSError:
        return []
    return sorted(entries, key=lambda entry: int(entry.name), reverse=True)


def infer_backend(config: mc.ModelConfig, model_dir: Path, where: str) -> None:
    """Set ``config.backend`` from the default model file when neither backend nor platform
    is named. Raises AutoCompleteError naming the folder(s) searched when nothing matches."""
    if config.backend or config.platform:
        return
    named = config.default_model_filename
    for version_dir in version_dirs(model_dir):
        if named:
            backend = _SUFFIX_BACKENDS.get(Path(named).suffix)
            if backend and (version_dir / named).exists():
                config.backend = backend
                return
            continue
        for filename, backend in DEFAULT_MODEL_FILES:
            if (version_dir / filename).exists():
                config.backend = backend
                return
    looked_for = (f"'{named}'" if named else
                  ", ".join(f"'{filename}'" for filename, _ in DEFAULT_MODEL_FILES))
    folders = [str(d) for d in version_dirs(model_dir)]
    where = (f"version folder(s) {', '.join(folders)}" if folders
             else f"'{model_dir}' (it has no version folder)")
    raise AutoCompleteError(
        f"{where}: must specify 'backend' or 'platform'; neither is set and "
        f"no default model file ({looked_for}) was found in {where} to infer it from")


def python_model_file(config: mc.ModelConfig, model_dir: Path, version: int) -> Path:
    return model_dir / str(version) / (config.default_model_filename or "model.py")


def onnx_model_file(config: mc.ModelConfig, model_dir: Path, version: int) -> Path:
    return model_dir / str(version) / (config.default_model_filename or "model.onnx")


def is_onnx(config: mc.ModelConfig) -> bool:
    return config.backend == "onnxruntime" or (not config.backend
                                               and config.platform == "onnxruntime_onnx")


def onnx_needs_auto_complete(config: mc.ModelConfig) -> bool:
    """Triton's onnxruntime backend skips auto-complete when inputs and outputs are named."""
    return not ((len(config.input) + len(config.batch_input)) > 0 and len(config.output) > 0)


def may_define_hook(model_file: Path) -> bool:
    try:
        return HOOK_NAME.encode() in model_file.read_bytes()
    except OSError:
        return False


async def python_auto_complete(config: mc.ModelConfig, model_file: Path,
                               context: multiprocessing.context.ForkServerContext
                               ) -> mc.ModelConfig:
    """Run the hook in a child of ``context`` (the fork server); return the completed config."""
    from shmserve.workers.auto_complete import run_auto_complete
    if not config.name:
        config.name = model_file.parent.parent.name
    return await _complete_in_child(config, HOOK_NAME, run_auto_complete,
                                    (config_to_dict(config), str(model_file), "python"), context)


async def onnx_auto_complete(config: mc.ModelConfig, model_file: Path,
                             context: multiprocessing.context.ForkServerContext,
                             default_max_batch_size: int = 4) -> mc.ModelConfig:
    """Complete an ONNX model's config from its signature in a child of ``context``
    (``default_max_batch_size``: --backend-config default-max-batch-size)."""
    from shmserve.workers.auto_complete import run_auto_complete
    if not config.name:
        config.name = model_file.parent.parent.name
    return await _complete_in_child(config, "auto-complete", run_auto_complete,
                                    (config_to_dict(config), str(model_file), "onnxruntime",
                                     default_max_batch_size), context)


def dali_needs_completion(config: mc.ModelConfig, model_dir: Path,
                          config_json: str | None, config_name: str = "") -> bool:
    """Whether a dali model's config leaves something for its pipeline to fill in: no inputs or
    outputs, one without a data type or dims, or no max_batch_size. A complete config is only
    validated against the pipeline, by the worker."""
    if not _states_max_batch_size(config_path(model_dir, config_name), config_json):
        return True
    if not config.input or not config.output:
        return True
    return any(entry.data_type == mc.TYPE_INVALID or not entry.dims
               for entry in [*config.input, *config.output])


_MAX_BATCH_FIELD = re.compile(r"^\s*max_batch_size\s*:", re.MULTILINE)
_COMMENT = re.compile(r"#[^\n]*")


def states_max_batch_size(config_text: str) -> bool:
    """Whether a config.pbtxt sets max_batch_size at its top level (Triton's DALI backend reads
    the file for this: in the parsed config an absent field and 0 look the same)."""
    depth = 0
    for line in _COMMENT.sub("", config_text).splitlines():
        if depth == 0 and _MAX_BATCH_FIELD.match(line):
            return True
        depth += line.count("{") + line.count("[") - line.count("}") - line.count("]")
    return False


def _states_max_batch_size(config_file: Path, config_json: str | None) -> bool:
    """Whether the config as written sets max_batch_size."""
    if config_json is not None:
        try:
            return isinstance(parsed := json.loads(config_json), dict) \
                and "max_batch_size" in parsed
        except ValueError:
            return False
    try:
        return states_max_batch_size(config_file.read_text(errors="replace"))
    except OSError:
        return False


async def dali_auto_complete(config: mc.ModelConfig, model_dir: Path, version: int,
                             config_json: str | None,
                             context: multiprocessing.context.ForkServerContext,
                             config_name: str = "") -> mc.ModelConfig:
    """A dali model's inputs, outputs and max_batch_size from its pipeline, read in a child of
    ``context`` (a ``dali.py`` pipeline is user code)."""
    from shmserve.workers.auto_complete import run_dali_auto_complete
    if not config.name:
        config.name = model_dir.name
    given = _states_max_batch_size(config_path(model_dir, config_name), config_json)
    return await _complete_in_child(
        config, "DALI auto-complete", run_dali_auto_complete,
        (config_to_dict(config), str(model_dir / str(version)), given), context)


async def _complete_in_child(config: mc.ModelConfig, what: str, target: Callable[..., None],
                             args: tuple[Any, ...],
                             context: multiprocessing.context.ForkServerContext
                             ) -> mc.ModelConfig:
    """``target(sender, *args)`` in a throwaway child; its one answer parsed as the config."""
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=target, args=(sender, *args),
                              name=f"shmserve-autocomplete-{config.name}", daemon=True)
    loop = asyncio.get_running_loop()
    try:
        await loop.run_in_executor(None, process.start)
        sender.close()
        ready = await loop.run_in_executor(None, receiver.poll, AUTO_COMPLETE_TIMEOUT_SECS)
        result: AutoCompleteResult | None = None
        if ready:
            try:
                result = await loop.run_in_executor(None, receiver.recv)
            except EOFError:
                result = None
        if result is None:
            exit_code = process.exitcode
            raise AutoCompleteError(
                f"{what} of model '{config.name}' did not answer "
                + (f"within {AUTO_COMPLETE_TIMEOUT_SECS:g}s" if not ready
                   else f"(the process exited with code {exit_code})"), "INTERNAL")
    finally:
        receiver.close()
        if process.is_alive():
            process.kill()
        await loop.run_in_executor(None, process.join, 5.0)
    if result.config is None:
        raise AutoCompleteError(result.error_message, result.error_code or "INTERNAL")
    completed = mc.ModelConfig()
    try:
        json_format.ParseDict(result.config, completed)
    except json_format.ParseError as exc:
        raise AutoCompleteError(f"{what} of model '{config.name}' produced an "
                                f"invalid config: {user_facing(str(exc))}") from None
    return completed
