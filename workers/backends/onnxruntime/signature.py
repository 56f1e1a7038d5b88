"""An ONNX model's own inputs and outputs against its config: Triton's checks and auto-complete.

Pure logic (no onnxruntime import): the backend and the auto-complete child describe the
session's tensors as :class:`TensorInfo` and call these functions. The error texts are those of
Triton's onnxruntime backend (``ValidateInputs``/``ValidateOutputs``, ``CompareDimsSupported``,
``AutoCompleteMaxBatch``/``AutoCompleteIO``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from shmserve.workers.sequence_tensors import SequenceTensor, control_inputs, states

log = logging.getLogger(__name__)

#: onnxruntime's type strings -> config data types (Triton's OnnxDataTypeToModelConfigDataType).
ORT_TO_CONFIG = {
    "tensor(bool)": "TYPE_BOOL", "tensor(uint8)": "TYPE_UINT8", "tensor(uint16)": "TYPE_UINT16",
    "tensor(uint32)": "TYPE_UINT32", "tensor(uint64)": "TYPE_UINT64",
    "tensor(int8)": "TYPE_INT8", "tensor(int16)": "TYPE_INT16", "tensor(int32)": "TYPE_INT32",
    "tensor(int64)": "TYPE_INT64", "tensor(bfloat16)": "TYPE_BF16",
    "tensor(float16)": "TYPE_FP16", "tensor(float)": "TYPE_FP32", "tensor(double)": "TYPE_FP64",
    "tensor(string)": "TYPE_STRING",
}
CONFIG_TO_ORT = {config: ort for ort, config in ORT_TO_CONFIG.items()}

#: Triton's default-max-batch-size backend setting (tritonserver passes 4 unless told).
DEFAULT_MAX_BATCH_SIZE = 4


class SignatureError(Exception):
    """Config and model disagree; ``code`` is a gRPC status code name."""

    def __init__(self, message: str, code: str = "INVALID_ARGUMENT") -> None:
        super().__init__(message)
        self.message = message
        self.code = code


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """One input or output as the session reports it. ``dims`` has -1 for a dynamic dimension;
    ``symbols`` the dimension's symbolic name where the model gives one (None otherwise)."""

    name: str
    ort_type: str                        # onnxruntime's type string, e.g. "tensor(float)"
    dims: tuple[int, ...]
    symbols: tuple[str | None, ...]

    @classmethod
    def from_ort(cls, node: Any) -> TensorInfo:
        """From an onnxruntime ``NodeArg`` (``session.get_inputs()`` items)."""
        shape = node.shape if isinstance(node.shape, list) else []
        dims = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in shape)
        symbols = tuple(d if isinstance(d, str) and d else None for d in shape)
        return cls(str(node.name), str(node.type), dims, symbols)

    @property
    def config_type(self) -> str:
        return ORT_TO_CONFIG.get(self.ort_type, "TYPE_INVALID")


def shape_string(dims: list[int] | tuple[int, ...]) -> str:
    """Triton's ShapeToString: ``[-1,3,4]``."""
    return "[" + ",".join(str(d) for d in dims) + "]"


def _provides(info: TensorInfo) -> str:
    """``TYPE_`` + TRITONSERVER_DataTypeString of the model's type (STRING is BYTES there)."""
    config_type = info.config_type
    return "TYPE_BYTES" if config_type == "TYPE_STRING" else config_type


def _config_dims(entry: dict[str, Any]) -> list[int]:
    reshape = entry.get("reshape")
    if isinstance(reshape, dict):
        return [int(d) for d in reshape.get("shape") or []]
    return [int(d) for d in entry.get("dims") or []]


def _compare_dims(model: str, name: str, model_dims: tuple[int, ...], dims: list[int],
                  max_batch_size: int, exact: bool) -> None:
    """Triton's CompareDimsSupported."""
    if max_batch_size > 0:
        if not model_dims or model_dims[0] != -1:
            raise SignatureError(
                f"model '{model}', tensor '{name}': for the model to support batching the "
                f"shape should have at least 1 dimension and the first dimension must be -1; "
                f"but shape expected by the model is {shape_string(model_dims)}")
        full = [-1, *dims]
        if not _dims_match(model_dims, full, exact):
            raise SignatureError(
                f"model '{model}', tensor '{name}': the model expects {len(model_dims)} "
                f"dimensions (shape {shape_string(model_dims)}) but the model configuration "
                f"specifies {len(full)} dimensions (an initial batch dimension because "
                f"max_batch_size > 0 followed by the explicit tensor shape, making complete "
                f"shape {shape_string(full)})")
    elif not _dims_match(model_dims, dims, exact):
        raise SignatureError(
            f"model '{model}', tensor '{name}': the model expects {len(model_dims)} dimensions "
            f"(shape {shape_string(model_dims)}) but the model configuration specifies "
            f"{len(dims)} dimensions (shape {shape_string(dims)})")


def _dims_match(model_dims: tuple[int, ...], dims: list[int], exact: bool) -> bool:
    if len(model_dims) != len(dims):
        return False
    return all(model_dim == dim for model_dim, dim in zip(model_dims, dims, strict=True)
               if exact or model_dim != -1)


def validate(model: str, config: dict[str, Any], inputs: list[TensorInfo],
             outputs: list[TensorInfo]) -> None:
    """Raise SignatureError where the config's inputs or outputs do not fit the model. A
    sequence model's control and state inputs are model inputs too."""
    max_batch_size = int(config.get("max_batch_size") or 0)
    config_inputs = list(config.get("input") or [])
    controls = control_inputs(config)
    expected = len(config_inputs) + len(controls) + len(states(config))
    if len(inputs) != expected:
        raise SignatureError(f"unable to load model '{model}', configuration expects "
                             f"{expected} inputs, model provides {len(inputs)}")
    by_name = {i.name: i for i in inputs}
    _validate_kind(model, "input", config_inputs, by_name, max_batch_size)
    for control in controls:
        _validate_control(model, control, by_name, max_batch_size)
    _validate_kind(model, "output", list(config.get("output") or []),
                   {o.name: o for o in outputs}, max_batch_size)


def _validate_control(model: str, control: SequenceTensor, infos: dict[str, TensorInfo],
                      max_batch_size: int) -> None:
    """Triton's ValidateBooleanSequenceControl / ValidateTypedSequenceControl."""
    info = infos.get(control.name)
    if info is None:
        raise SignatureError(f"configuration specified sequence control '{control.name}', but "
                             f"model does not provide that input", "INTERNAL")
    dims = info.dims[1:] if max_batch_size > 0 else info.dims
    if dims != (1,):
        raise SignatureError(f"unable to load model '{model}', sequence control "
                             f"'{control.name}' in model has dims {shape_string(dims)} but "
                             f"dims [1] is expected")
    if CONFIG_TO_ORT.get(control.data_type) != info.ort_type:
        raise SignatureError(f"unable to load model '{model}', sequence control "
                             f"'{control.name}', the model expects data-type "
                             f"{info.ort_type[len('tensor('):-1].upper()} but the model "
                             f"configuration specifies data-type {control.data_type}")


def _validate_kind(model: str, kind: str, entries: list[dict[str, Any]],
                   infos: dict[str, TensorInfo], max_batch_size: int) -> None:
    for entry in entries:
        name = str(entry.get("name", ""))
        data_type = str(entry.get("data_type", "TYPE_INVALID"))
        if kind == "input" and entry.get("optional") and max_batch_size != 0:
            raise SignatureError(f"unable to load model '{model}', optional input '{name}' is "
                                 f"not supported for models that support batching")
        info = infos.get(name)
        if info is None:
            allowed = ", ".join(sorted(infos))
            raise SignatureError(f"unexpected inference {kind} '{name}', allowed {kind}s are: "
                                 f"{allowed}")
        if data_type not in CONFIG_TO_ORT:
            raise SignatureError(f"unsupported datatype {data_type} for {kind} '{name}' for "
                                 f"model '{model}'", "INTERNAL")
        if CONFIG_TO_ORT[data_type] != info.ort_type:
            raise SignatureError(f"unable to load model '{model}', configuration expects "
                                 f"datatype {data_type} for {kind} '{name}', model provides "
                                 f"{_provides(info)}")
        dims = _config_dims(entry)
        if info.dims:
            _compare_dims(model, name, info.dims, dims, max_batch_size, exact=kind == "output")
        elif any(dim != 1 for dim in dims):
            raise SignatureError(
                f"unable to load model '{model}', scalar tensor '{name}', should only provide 1 "
                f"in the model configuration when the model doesn't support batching. Model "
                f"configuration provided: {shape_string(dims)}.")


def needs_auto_complete(config: dict[str, Any]) -> bool:
    """Triton skips auto-complete when the config already names inputs and outputs."""
    inputs = len(config.get("input") or []) + len(config.get("batch_input") or [])
    return not (inputs > 0 and len(config.get("output") or []) > 0)


def auto_complete(model: str, config: dict[str, Any], inputs: list[TensorInfo],
                  outputs: list[TensorInfo],
                  default_max_batch_size: int = DEFAULT_MAX_BATCH_SIZE) -> dict[str, Any]:
    """The config completed from the model, as Triton's AutoCompleteConfig does it."""
    completed = dict(config)
    has_inputs = bool(config.get("input"))
    has_outputs = bool(config.get("output"))
    if has_inputs and has_outputs:
        return completed
    batching = all(info.dims and info.dims[0] == -1 for info in [*inputs, *outputs])
    max_batch_size = int(completed.get("max_batch_size") or 0)
    if batching:
        if max_batch_size == 0:
            max_batch_size = max(default_max_batch_size, 0)
            completed["max_batch_size"] = max_batch_size
            log.warning("autofilled max_batch_size to %d for model '%s' since batching is "
                        "supporrted but no max_batch_size is specified in model configuration. "
                        "Must specify max_batch_size to utilize autofill with a larger max "
                        "batch size", max_batch_size, model)
        if (max_batch_size > 1 and "sequence_batching" not in completed
                and "dynamic_batching" not in completed):
            completed["dynamic_batching"] = {}
    elif max_batch_size != 0:
        raise SignatureError(f"autofill failed for model '{model}': model does not support "
                             f"batching while non-zero max_batch_size is specified")
    if not has_inputs:
        completed["input"] = [_completed_io(info, max_batch_size) for info in inputs]
    if not has_outputs:
        completed["output"] = [_completed_io(info, max_batch_size) for info in outputs]
    return completed


def _completed_io(info: TensorInfo, max_batch_size: int) -> dict[str, Any]:
    dims = list(info.dims[1:] if max_batch_size > 0 else info.dims)
    entry: dict[str, Any] = {"name": info.name, "data_type": info.config_type}
    if not dims:
        dims = [1]
        if max_batch_size > 0:
            entry["reshape"] = {"shape": []}
    entry["dims"] = dims
    return entry


def resolve_shape(info: TensorInfo, sizes: dict[str, int], batch: int | None
                  ) -> list[int] | None:
    """The output's shape before the run, when the model fixes it: static dimensions, symbolic
    ones also named by an input (``sizes``: symbol -> the request's size), and the batch
    dimension of a batching model (``batch``). None when some dimension is only known after
    the run."""
    shape: list[int] = []
    for position, (dim, symbol) in enumerate(zip(info.dims, info.symbols, strict=True)):
        if dim >= 0:
            shape.append(dim)
        elif symbol is not None and symbol in sizes:
            shape.append(sizes[symbol])
        elif position == 0 and batch is not None:
            shape.append(batch)
        else:
            return None
    return shape


def symbol_sizes(inputs: list[TensorInfo], shapes: dict[str, tuple[int, ...]]
                 ) -> dict[str, int]:
    """Symbolic dimension name -> its size in this run's inputs (a symbol two inputs give
    different sizes is left out: ORT will refuse the run)."""
    sizes: dict[str, int] = {}
    conflicting: set[str] = set()
    for info in inputs:
        shape = shapes.get(info.name)
        if shape is None or len(shape) != len(info.symbols):
            continue
        for symbol, size in zip(info.symbols, shape, strict=True):
            if symbol is None:
                continue
            if sizes.setdefault(symbol, int(size)) != int(size):
                conflicting.add(symbol)
    for symbol in conflicting:
        del sizes[symbol]
    return sizes
