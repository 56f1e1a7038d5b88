"""Responses checked against the model's config, as Triton checks what a backend returns.

An output under a name the config does not declare, with another datatype, or with a shape
outside the declared dims is the model's error: the request fails with INTERNAL and a
message that names the model and its file (the client did nothing wrong), and the worker logs
it. Outputs that are not NumPy arrays (torch tensors) are checked by name and shape only.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from shmserve.protos.datatypes import from_numpy_dtype

_CONFIG_TYPES = {"TYPE_STRING": "BYTES"}


def _datatype(config_type: str) -> str:
    return _CONFIG_TYPES.get(config_type, config_type.removeprefix("TYPE_"))


def _config_name(datatype: str) -> str:
    return "TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}"


class OutputChecker:
    """Built once per model from its config; ``problem(name, value)`` per returned output."""

    def __init__(self, config: Mapping[str, Any], model_file: str) -> None:
        self._model = str(config.get("name", ""))
        self._file = model_file
        self._batched = int(config.get("max_batch_size", 0) or 0) > 0
        self._declared: dict[str, tuple[str, list[int] | None]] = {}
        for output in config.get("output", []):
            dims = None if output.get("reshape") else [int(d) for d in output.get("dims", [])]
            self._declared[str(output["name"])] = (
                _datatype(str(output.get("data_type", "TYPE_INVALID"))), dims)
        # Implicit state outputs (sequence_batching.state) are the model's outputs too.
        for state in (config.get("sequence_batching") or {}).get("state", []) or []:
            name = str(state.get("output_name", ""))
            if name and name not in self._declared:
                self._declared[name] = (_datatype(str(state.get("data_type", "TYPE_INVALID"))),
                                        [int(d) for d in state.get("dims", [])])
        self._numpy_types: dict[np.dtype, str] = {}

    def problem(self, name: str, value: Any) -> str | None:
        declared = self._declared.get(name)
        if declared is None:
            return self._blame(f"returned output '{name}', which is not declared in its "
                               f"configuration (declared outputs: "
                               f"{', '.join(sorted(self._declared)) or 'none'})")
        datatype, dims = declared
        if isinstance(value, np.ndarray):
            actual = self._numpy_types.get(value.dtype)
            if actual is None:
                try:
                    actual = from_numpy_dtype(value.dtype)
                except (ValueError, TypeError, KeyError):
                    actual = str(value.dtype)
                if value.dtype.kind not in "SU":
                    self._numpy_types[value.dtype] = actual
            if actual != datatype:
                # The datatype text of Triton's framework backends (e.g. pytorch_backend).
                return self._blame(f"returned a bad output: configuration expects datatype "
                                   f"{_config_name(datatype)} for output '{name}', model "
                                   f"provides {_config_name(actual)}")
        shape = getattr(value, "shape", None)
        if dims is not None and shape is not None and not self._shape_fits(list(shape), dims):
            expected = ["-1", *map(str, dims)] if self._batched else list(map(str, dims))
            return self._blame(f"returned output '{name}' with shape "
                               f"[{','.join(str(int(d)) for d in shape)}], which does not match "
                               f"the configured dims [{','.join(expected)}]")
        return None

    def _shape_fits(self, shape: list[int], dims: list[int]) -> bool:
        if self._batched:
            if not shape:
                return False
            shape = shape[1:]
        if len(shape) != len(dims):
            return False
        return all(want == -1 or int(have) == want for have, want in zip(shape, dims, strict=True))

    def _blame(self, what: str) -> str:
        return (f"model '{self._model}' ({self._file}) {what}; this is an error in the model, "
                f"not in the request")
