"""Opening an onnxruntime session the way Triton's onnxruntime backend configures it.

onnxruntime is an optional extra (``pip install 'shmserve[onnx]'``): it is imported here, in a
worker or the auto-complete child, never in the supervisor.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from shmserve.workers.backend import BackendError

EXTRA_HINT = "pip install 'shmserve[onnx]'"
DEFAULT_MODEL_FILENAME = "model.onnx"

# optimization { graph { level } }: Triton's mapping (anything else: ORT_ENABLE_ALL).
_GRAPH_LEVELS = {-1: "ORT_ENABLE_BASIC", 1: "ORT_ENABLE_EXTENDED", 2: "ORT_DISABLE_ALL"}
# ORT's pool threads keep spinning for work after a run ends (about 30 ms of CPU per run). A
# worker runs one batch, then waits while the answer and the next request travel through the
# supervisor and the door: spinning threads took the cores that round trip needs (a 64 MiB
# identity through gRPC system shm took 1.76x the direct call). They stop when the run
# returns (ORT's force_spinning_stop; spinning between the operators of a run is kept) unless
# a config sets it "0". These parameters take ORT's own key names, "0" or "1".
SPIN_KEYS = {"session.force_spinning_stop": 1, "session.intra_op.allow_spinning": 1,
             "session.inter_op.allow_spinning": 1}


def import_onnxruntime() -> Any:
    """The onnxruntime module, or a load error that names the extra to install."""
    try:
        return importlib.import_module("onnxruntime")
    except ImportError as exc:
        raise BackendError(f"the onnxruntime backend needs the onnxruntime package, which "
                           f"cannot be imported ({exc}): {EXTRA_HINT}", "UNAVAILABLE") from None


def model_path(config: dict[str, Any], version_path: str, model_name: str) -> Path:
    """``<version>/<default_model_filename or model.onnx>``; a folder of that name holds
    ``model.onnx`` (models with external weights, as Triton accepts). Raises NOT_FOUND."""
    filename = config.get("default_model_filename") or DEFAULT_MODEL_FILENAME
    path = Path(version_path) / filename
    if path.is_dir():
        path = path / DEFAULT_MODEL_FILENAME
    if not path.is_file():
        raise BackendError(f"unable to find '{path}' for model '{model_name}'", "NOT_FOUND")
    return path


def parameter_int(config: dict[str, Any], key: str, default: int) -> int:
    """A config ``parameters`` entry read as Triton's TryParseModelStringParameter does."""
    value = (config.get("parameters") or {}).get(key)
    if isinstance(value, dict):
        value = value.get("string_value")
    if value is None or str(value).strip() == "":
        return default
    try:
        return int(str(value).strip())
    except ValueError:
        raise BackendError(f"parameter '{key}' must be an integer, got '{value}'",
                           "INVALID_ARGUMENT") from None


def session_options(ort: Any, config: dict[str, Any]) -> Any:
    """SessionOptions from the config: graph optimization level, execution mode, threads."""
    options = ort.SessionOptions()
    level = ((config.get("optimization") or {}).get("graph") or {}).get("level", 0)
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel,
                                               _GRAPH_LEVELS.get(int(level), "ORT_ENABLE_ALL"))
    execution_mode = parameter_int(config, "execution_mode", 0)
    if execution_mode not in (0, 1):
        raise BackendError(f"Invalid configuration value provided. Expected values for  "
                           f"execution_mode are 0 or 1 but got {execution_mode} .",
                           "INVALID_ARGUMENT")
    options.execution_mode = (ort.ExecutionMode.ORT_SEQUENTIAL if execution_mode == 0
                              else ort.ExecutionMode.ORT_PARALLEL)
    intra = parameter_int(config, "intra_op_thread_count", 0)
    if intra > 0:
        options.intra_op_num_threads = intra
    inter = parameter_int(config, "inter_op_thread_count", 0)
    if inter > 0:
        options.inter_op_num_threads = inter
    for key, default in SPIN_KEYS.items():
        value = parameter_int(config, key, default)
        if value not in (0, 1):
            raise BackendError(f"parameter '{key}' must be 0 or 1, got {value}",
                               "INVALID_ARGUMENT")
        options.add_session_config_entry(key, str(value))
    return options


def providers(ort: Any, kind: str, gpu_ordinal: int | None) -> list[Any]:
    """CPU for KIND_CPU/KIND_MODEL; CUDA (then CPU for the ops CUDA lacks) for KIND_GPU."""
    if kind != "KIND_GPU":
        return ["CPUExecutionProvider"]
    available = ort.get_available_providers()
    if "CUDAExecutionProvider" not in available:
        raise BackendError(f"a KIND_GPU instance needs onnxruntime's CUDAExecutionProvider "
                           f"(pip install onnxruntime-gpu); this onnxruntime "
                           f"{ort.__version__} has {', '.join(available)}", "UNAVAILABLE")
    return [("CUDAExecutionProvider", {"device_id": gpu_ordinal or 0}), "CPUExecutionProvider"]


def open_session(ort: Any, path: Path, config: dict[str, Any], model_name: str,
                 kind: str = "KIND_CPU", gpu_ordinal: int | None = None) -> Any:
    """An InferenceSession reading the model file where it lies (no copy)."""
    options = session_options(ort, config)
    try:
        return ort.InferenceSession(str(path), sess_options=options,
                                    providers=providers(ort, kind, gpu_ordinal))
    except BackendError:
        raise
    except Exception as exc:
        raise BackendError(f"failed to load model '{model_name}' from '{path}': "
                           f"{type(exc).__name__}: {exc}", "INVALID_ARGUMENT") from None
