"""``model_warmup`` in config.pbtxt: synthetic requests each instance runs before it is ready.

As Triton: each sample is run ``count`` times (at least once) through the backend's execute,
after the instance initialized and before the worker reports READY; a sample whose execution
fails (an exception, or an error response) fails the load with "failed to run warmup sample
'<name>': <reason>". Input data is zeros, random values, or the raw bytes of a file in the
model's ``warmup/`` folder (``input_data_file``). With ``batch_size`` > 0 on a batching model,
the batch dimension is prepended to each input's dims.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from shmserve.protos.datatypes import to_numpy_dtype
from shmserve.workers.backend import Backend, BackendError, ModelSpec, Request

WARMUP_FOLDER = "warmup"


def _datatype(config_type: str) -> str:
    return "BYTES" if config_type == "TYPE_STRING" else config_type.removeprefix("TYPE_")


def _input(model: ModelSpec, sample: str, name: str, spec: Mapping[str, Any],
           batch: int | None) -> Any:
    datatype = _datatype(str(spec.get("data_type", "TYPE_INVALID")))
    shape = ([batch] if batch is not None else []) + [int(d) for d in spec.get("dims", [])]
    if any(d < 0 for d in shape):
        raise BackendError(f"failed to run warmup sample '{sample}': input '{name}' has a "
                           f"variable-size dimension in {shape}; warm-up dims must be fixed")
    count = int(np.prod(shape)) if shape else 1
    if datatype == "BYTES":
        if spec.get("random_data"):
            values = [np.random.bytes(8) for _ in range(count)]
        elif spec.get("input_data_file"):
            values = [_file_bytes(model, sample, str(spec["input_data_file"]))] * count
        else:
            values = [b""] * count
        return np.array(values, dtype=np.object_).reshape(shape)
    dtype = to_numpy_dtype(datatype)
    if spec.get("input_data_file"):
        raw = _file_bytes(model, sample, str(spec["input_data_file"]))
        needed = count * dtype.itemsize
        if len(raw) < needed:
            raise BackendError(f"failed to run warmup sample '{sample}': file "
                               f"'{spec['input_data_file']}' has {len(raw)} bytes, input "
                               f"'{name}' needs {needed}")
        return np.frombuffer(raw[:needed], dtype=dtype).reshape(shape).copy()
    if spec.get("random_data"):
        if dtype.kind == "f":
            return np.random.random_sample(shape).astype(dtype)
        if dtype.kind == "b":
            return np.random.randint(0, 2, size=shape).astype(dtype)
        return np.random.randint(0, 100, size=shape).astype(dtype)
    return np.zeros(shape, dtype=dtype)


def _file_bytes(model: ModelSpec, sample: str, file_name: str) -> bytes:
    path = Path(model.repository_path) / WARMUP_FOLDER / file_name
    try:
        return path.read_bytes()
    except OSError as exc:
        raise BackendError(f"failed to run warmup sample '{sample}': cannot read input data "
                           f"file '{path}': {exc.strerror}") from None


def run_warmup(backend: Backend, model: ModelSpec) -> None:
    """Run every sample; raise BackendError on the first failure."""
    config = model.config
    batching = int(config.get("max_batch_size", 0) or 0) > 0
    outputs = [str(output["name"]) for output in config.get("output", [])]
    for index, sample in enumerate(config.get("model_warmup", [])):
        name = str(sample.get("name") or f"sample_{index}")
        batch_size = int(sample.get("batch_size", 0) or 0)
        batch = max(batch_size, 1) if batching else None
        inputs = {input_name: _input(model, name, input_name, spec, batch)
                  for input_name, spec in (sample.get("inputs") or {}).items()}
        for _ in range(max(int(sample.get("count", 0) or 0), 1)):
            request = Request(f"warmup_{name}", inputs, list(outputs))
            try:
                (response,) = backend.execute([request])
            except BackendError as exc:
                raise BackendError(f"failed to run warmup sample '{name}': {exc.message}",
                                   exc.code) from None
            except Exception as exc:
                raise BackendError(f"failed to run warmup sample '{name}': "
                                   f"{type(exc).__name__}: {exc}") from None
            if response.error is not None:
                raise BackendError(f"failed to run warmup sample '{name}': "
                                   f"{response.error.message}", response.error.code)
