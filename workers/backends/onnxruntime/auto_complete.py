"""Completing an ONNX model's config from the model (Triton's onnxruntime AutoCompleteConfig).

Runs in the auto-complete child of the fork server (workers/auto_complete.py), never in the
supervisor: it opens a session on the model file to read its inputs and outputs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from shmserve.workers.backend import BackendError
from shmserve.workers.backends.onnxruntime.session import import_onnxruntime, open_session
from shmserve.workers.backends.onnxruntime.signature import (
    DEFAULT_MAX_BATCH_SIZE,
    SignatureError,
    TensorInfo,
    auto_complete,
)


def onnx_auto_complete(config: dict[str, Any], model_file: str,
                       default_max_batch_size: int = DEFAULT_MAX_BATCH_SIZE) -> dict[str, Any]:
    """The config completed from the model at ``model_file``; raises BackendError."""
    path = Path(model_file)
    if path.is_dir():
        path = path / "model.onnx"
    name = str(config.get("name") or path.parent.parent.name)
    if not path.is_file():
        raise BackendError(f"unable to find '{path}' for model '{name}'", "NOT_FOUND")
    ort = import_onnxruntime()
    # Auto-complete only reads the signature: no graph optimization, one thread.
    quick = {"optimization": {"graph": {"level": 2}},
             "parameters": {"intra_op_thread_count": {"string_value": "1"}}}
    session = open_session(ort, path, quick, name)
    inputs = [TensorInfo.from_ort(node) for node in session.get_inputs()]
    outputs = [TensorInfo.from_ort(node) for node in session.get_outputs()]
    try:
        return auto_complete(name, config, inputs, outputs, default_max_batch_size)
    except SignatureError as exc:
        raise BackendError(exc.message, exc.code) from None
