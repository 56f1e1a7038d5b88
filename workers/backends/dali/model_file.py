"""Finding a DALI model's pipeline in its version folder, as Triton's DALI backend does.

In Triton's order (dali_model.h ``LoadModel``):

1. ``<version>/<default_model_filename or model.dali>`` read as a serialized pipeline;
2. failing that, the same file, when its name ends in ``.py``, imported and its one
   ``@autoserialize``-decorated ``pipeline_def`` serialized;
3. failing that, ``<version>/dali.py`` the same way.

Triton runs the autoserialization in a ``python3 -c`` subprocess; here it runs in the calling
process (the worker, or the throwaway auto-complete child), which is already separate from the
supervisor. The pipeline function is called with ``device_id`` of the instance that will run
it (None: CPU only), because DALI 2.x cannot even serialize a ``device_id=0`` pipeline without
CUDA, and the device is replaced at deserialization anyway.
"""

from __future__ import annotations

import importlib.util
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shmserve.workers.backend import BackendError
from shmserve.workers.backends.dali.pipeline_def import PipelineDefError, read_pipeline

DEFAULT_MODEL_FILENAME = "model.dali"
FALLBACK_MODEL_FILENAME = "dali.py"
DALI_EXTRA_HINT = "install the optional extra: pip install 'shmserve[dali]'"


@dataclass(frozen=True, slots=True)
class LoadedPipeline:
    serialized: bytes
    path: Path            # the file it came from
    autoserialized: bool


def import_dali() -> Any:
    """``nvidia.dali``, or a load error naming the extra that installs it."""
    try:
        import nvidia.dali as dali
    except ImportError as exc:
        raise BackendError(f"the dali backend needs NVIDIA DALI in the worker ({exc}); "
                           f"{DALI_EXTRA_HINT}", "UNAVAILABLE") from None
    return dali


def _read_serialized(path: Path) -> bytes | None:
    try:
        data = path.read_bytes()
        read_pipeline(data)
    except (OSError, PipelineDefError):
        return None
    return data


def _autoserialize(path: Path, device_id: int | None) -> bytes:
    """Import ``path`` and serialize its one ``@autoserialize`` pipeline definition."""
    import_dali()
    from nvidia.dali._utils.autoserialize import _discover_autoserialize

    module_name = f"shmserve_dali_model_{uuid.uuid4().hex}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise RuntimeError(f"cannot import '{path}'")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
        functions = _discover_autoserialize(module, visited=[])
    finally:
        sys.modules.pop(module_name, None)
    if len(functions) != 1:
        found = "none" if not functions else f"{len(functions)}: {functions}"
        raise RuntimeError(f"Precisely one autoserialize function must exist in the module. "
                           f"Found {found}.")
    pipeline = functions[0](device_id=device_id)
    serialized = pipeline.serialize()
    return serialized if isinstance(serialized, bytes) else bytes(serialized, "latin-1")


def load_pipeline(model_name: str, version_path: Path, default_filename: str | None,
                  device_id: int | None) -> LoadedPipeline:
    """The serialized pipeline of a model version; BackendError naming every file tried."""
    default = version_path / (default_filename or DEFAULT_MODEL_FILENAME)
    fallback = version_path / FALLBACK_MODEL_FILENAME
    serialized = _read_serialized(default)
    if serialized is not None:
        return LoadedPipeline(serialized, default, autoserialized=False)
    reasons: list[str] = []
    candidates = [path for path in (default, fallback) if path.suffix == ".py"]
    for path in dict.fromkeys(candidates):
        if not path.is_file():
            continue
        try:
            return LoadedPipeline(_autoserialize(path, device_id), path, autoserialized=True)
        except BackendError:
            raise
        except BaseException as exc:  # the model file's code may raise anything
            reasons.append(f"{path.name}: {type(exc).__name__}: {exc}")
    detail = f" ({'; '.join(reasons)})" if reasons else ""
    raise BackendError(
        f"unable to load model '{model_name}': Failed to load model file. The program looked in "
        f"the following locations: {default}, {fallback}. Please make sure that the model "
        f"exists in any of the locations and is properly serialized or can be properly "
        f"serialized.{detail}", "INVALID_ARGUMENT")
