"""The ``onnxruntime`` backend: ONNX models, as Triton's onnxruntime backend serves them.

A model selects it with ``platform: "onnxruntime_onnx"`` or ``backend: "onnxruntime"``, or by
shipping ``<version>/model.onnx`` with neither named. Each worker hosts one instance:

* ``model_initialize`` finds the file (``default_model_filename`` or ``model.onnx``; a folder of
  that name holds ``model.onnx``) and imports onnxruntime (an optional extra: ``pip install
  'shmserve[onnx]'``; a missing package fails this model's load only).
* ``instance_initialize`` opens an ``InferenceSession`` on the file where it lies, with the
  session options of the config (signature.py, session.py): CPU provider for ``KIND_CPU``, CUDA
  for ``KIND_GPU``. It then checks the config against the session's inputs and outputs with
  Triton's texts.
* ``execute`` runs through ORT's IO binding. Inputs are bound as OrtValues over the request's
  arrays, which are views of the shared memory the request arrived in (no copy). An output whose
  shape the model fixes before the run (static dims, symbolic dims an input names, the batch
  dimension) is bound to memory we own: the client's region when the request asked for the
  output there (``Request.output_buffers``), so ORT writes it in place and the worker copies
  nothing; otherwise, when large, space the worker lends in its output arena
  (``Request.allocate_output``), sent from there without a copy; small ones a fresh array that
  travels inline. Other outputs ORT allocates, and the worker copies them once. With
  ``max_batch_size > 0`` the requests of a batch are concatenated along dim 0 (one copy), run
  once, and the outputs split back as views. Requests of at most 64 KiB of inputs and no output
  region run through ``session.run``: binding costs more than their copies.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from shmserve.workers.backend import (
    Backend,
    BackendError,
    InstanceSpec,
    ModelSpec,
    Request,
    Response,
)
from shmserve.workers.backends.onnxruntime.session import (
    import_onnxruntime,
    model_path,
    open_session,
)
from shmserve.workers.backends.onnxruntime.signature import (
    SignatureError,
    TensorInfo,
    resolve_shape,
    symbol_sizes,
    validate,
)
from shmserve.workers.cuda_ipc import host_array
from shmserve.workers.sequence_tensors import states

__all__ = ["OnnxRuntimeBackend"]

log = logging.getLogger(__name__)

_NUMPY_TYPES: dict[str, Any] = {
    "tensor(bool)": np.bool_, "tensor(uint8)": np.uint8, "tensor(uint16)": np.uint16,
    "tensor(uint32)": np.uint32, "tensor(uint64)": np.uint64, "tensor(int8)": np.int8,
    "tensor(int16)": np.int16, "tensor(int32)": np.int32, "tensor(int64)": np.int64,
    "tensor(float16)": np.float16, "tensor(float)": np.float32, "tensor(double)": np.float64,
}
_STRING = "tensor(string)"
#: Up to this many input bytes (and no output region) a run goes through ``session.run``.
SMALL_INPUT_BYTES = 64 << 10


@dataclass(slots=True)
class RunRecord:
    """Where the last run's tensors lay (addresses ORT was given and wrote to): how tests see
    that inputs were bound in place and outputs written straight to their destination."""

    inputs: dict[str, int] = field(default_factory=dict)
    outputs: dict[str, int] = field(default_factory=dict)
    in_place: list[str] = field(default_factory=list)   # outputs written into output_buffers
    in_arena: list[str] = field(default_factory=list)   # outputs written into allocate_output's


class _OrtOutput:
    """Keeps ORT's own output buffer alive for as long as the NumPy array viewing it."""

    __slots__ = ("__array_interface__", "_value")

    def __init__(self, value: Any, array: np.ndarray) -> None:
        self._value = value
        self.__array_interface__ = array.__array_interface__


class OnnxRuntimeBackend(Backend):
    """Hosts one ONNX Runtime session."""

    #: Ask the worker for the client-region destinations of the outputs (Request.output_buffers).
    wants_output_buffers = True

    def __init__(self) -> None:
        self._model: ModelSpec | None = None
        self._instance: InstanceSpec | None = None
        self._ort: Any = None
        self._path: Path | None = None
        self._session: Any = None
        self._binding: Any = None
        self._inputs: list[TensorInfo] = []
        self._outputs: dict[str, TensorInfo] = {}
        self._output_order: list[str] = []
        self._state_outputs: list[str] = []   # a sequence model's implicit-state outputs
        self._max_batch = 0
        self._prebind = True     # off once ORT refused a shape we predicted
        self.last_run = RunRecord()

    # -- lifecycle ----------------------------------------------------------------------------

    def model_initialize(self, model: ModelSpec) -> None:
        self._path = model_path(model.config, model.version_path, model.name)
        self._ort = import_onnxruntime()
        self._model = model
        self._max_batch = int(model.config.get("max_batch_size") or 0)
        self._output_order = [str(entry["name"]) for entry in model.config.get("output") or []]
        self._state_outputs = [state.output.name for state in states(model.config)]

    def instance_initialize(self, model: ModelSpec, instance: InstanceSpec) -> None:
        if self._ort is None or self._path is None:
            raise BackendError("instance_initialize called before model_initialize")
        self._instance = instance
        ordinal = None
        if instance.kind == "KIND_GPU":
            from shmserve.workers.cuda_ipc import local_ordinal
            ordinal = local_ordinal(instance.device_id)
        session = open_session(self._ort, self._path, model.config, model.name, instance.kind,
                               ordinal)
        inputs = [TensorInfo.from_ort(node) for node in session.get_inputs()]
        outputs = [TensorInfo.from_ort(node) for node in session.get_outputs()]
        try:
            validate(model.name, model.config, inputs, outputs)
        except SignatureError as exc:
            raise BackendError(exc.message, exc.code) from None
        self._session = session
        self._binding = session.io_binding()
        self._inputs = inputs
        self._outputs = {info.name: info for info in outputs}
        log.info("model '%s' instance '%s': onnxruntime %s session on %s", model.name,
                 instance.name, self._ort.__version__, ", ".join(session.get_providers()))

    def instance_finalize(self) -> None:
        self._binding = None
        self._session = None

    def model_finalize(self) -> None:
        self._model = None

    # -- execute ------------------------------------------------------------------------------

    def execute(self, requests: list[Request]) -> list[Response]:
        if self._session is None:
            error = BackendError(f"model instance '{self._label()}' is not initialized",
                                 "UNAVAILABLE")
            return [Response(error=error) for _ in requests]
        if self._max_batch > 0 and len(requests) > 1 and self._can_concatenate(requests):
            return self._run_batched(requests)
        return [self._run_one(request) for request in requests]

    def _run_one(self, request: Request) -> Response:
        try:
            outputs = self._run(request.inputs, self._wanted(request), request.output_buffers, None,
                                request.allocate_output)
            return Response(outputs=outputs)
        except BackendError as exc:
            return Response(error=exc)
        except Exception as exc:
            return Response(error=self._failure(exc))

    def _wanted(self, request: Request) -> list[str]:
        """The outputs to compute: those asked for (all by default) and the states' next
        values (the worker keeps them, and sends them only when asked)."""
        names = request.requested_outputs or self._output_order
        missing = [name for name in self._state_outputs if name not in names]
        return [*names, *missing] if missing else names

    def _can_concatenate(self, requests: list[Request]) -> bool:
        first = requests[0]
        names = set(first.inputs)
        wanted = set(first.requested_outputs or self._output_order)
        for request in requests:
            if set(request.inputs) != names:
                return False
            if set(request.requested_outputs or self._output_order) != wanted:
                return False
            for name, value in request.inputs.items():
                if not isinstance(value, np.ndarray) or value.ndim == 0:
                    return False
                if value.shape[1:] != first.inputs[name].shape[1:]:
                    return False
        return True

    def _run_batched(self, requests: list[Request]) -> list[Response]:
        first = requests[0]
        sizes = [int(next(iter(request.inputs.values())).shape[0]) for request in requests]
        total = sum(sizes)
        names = self._wanted(first)
        try:
            batched = {name: np.concatenate([request.inputs[name] for request in requests])
                       for name in first.inputs}
            outputs = self._run(batched, names, None, total, first.allocate_output)
            bounds = np.cumsum(sizes)[:-1]
            split: dict[str, list[np.ndarray]] = {}
            for name, value in outputs.items():
                if value.ndim == 0 or value.shape[0] != total:
                    raise BackendError(
                        f"output '{name}' of model '{self._label()}' has shape "
                        f"{list(value.shape)}; expected a batch dimension of {total} (the "
                        f"{len(requests)} requests of the batch)")
                split[name] = np.split(value, bounds)
        except BackendError as exc:
            return [Response(error=exc) for _ in requests]
        except Exception as exc:
            error = self._failure(exc)
            return [Response(error=error) for _ in requests]
        return [Response(outputs={name: parts[index] for name, parts in split.items()})
                for index in range(len(requests))]

    def _run(self, inputs: dict[str, Any], names: list[str],
             buffers: dict[str, memoryview] | None, batch: int | None,
             allocate: Callable[[int], memoryview | None] | None = None) -> dict[str, Any]:
        """One ORT run; returns the outputs ``names``. Small requests with no destination
        region go through ``session.run`` (binding costs more than copying a few bytes);
        the others through the IO binding."""
        small = buffers is None and sum(getattr(value, "nbytes", 0)
                                        for value in inputs.values()) <= SMALL_INPUT_BYTES
        if small or self._has_strings(inputs, names):
            return self._run_plain(inputs, names)
        binding = self._binding
        binding.clear_binding_inputs()
        binding.clear_binding_outputs()
        record = RunRecord()
        spans: list[tuple[int, int]] = []
        for name, value in inputs.items():
            array = _host_array(value, name)
            if not array.flags.c_contiguous or not array.flags.aligned:
                array = np.ascontiguousarray(array)
                if not array.flags.aligned:
                    array = array.copy()
            ort_value = self._ort.OrtValue.ortvalue_from_numpy(array)
            binding.bind_ortvalue_input(name, ort_value)
            record.inputs[name] = int(ort_value.data_ptr())
            spans.append((_address(array), array.nbytes))
        sizes = symbol_sizes(self._inputs, {n: tuple(np.shape(v)) for n, v in inputs.items()})
        bound: dict[str, np.ndarray] = {}
        for name in names:
            info = self._outputs.get(name)
            if info is None:
                raise BackendError(f"unexpected inference output '{name}' for model "
                                   f"'{self._label()}'", "INVALID_ARGUMENT")
            dtype = _NUMPY_TYPES[info.ort_type]
            shape = resolve_shape(info, sizes, batch) if self._prebind else None
            if shape is None:
                binding.bind_output(name, "cpu")       # ORT allocates: copied once later
                continue
            target = _destination(buffers, name, shape, np.dtype(dtype), spans)
            if target is not None:
                record.in_place.append(name)
            elif allocate is not None:
                target = _lent(allocate, shape, np.dtype(dtype))
                if target is not None:
                    record.in_arena.append(name)
            if target is None:
                target = np.empty(shape, dtype)
            address = _address(target)
            binding.bind_output(name, "cpu", 0, dtype, shape, address)
            record.outputs[name] = address
            bound[name] = target
        try:
            self._session.run_with_iobinding(binding)
        except Exception as exc:
            if not bound or "shape" not in str(exc).lower():
                raise
            # A shape we predicted from the model's dims was wrong (a symbolic dim the model
            # computes differently): let ORT allocate from now on.
            log.warning("model '%s': output shapes cannot be predicted (%s); outputs are "
                        "copied once from now on", self._label(), exc)
            self._prebind = False
            return self._run(inputs, names, None, batch, allocate)
        results: dict[str, Any] = {}
        values = binding.get_outputs()
        for name, value in zip(names, values, strict=True):
            if name in bound:
                results[name] = bound[name]
                continue
            results[name] = np.asarray(_OrtOutput(value, value.numpy()))
            record.outputs[name] = int(value.data_ptr())
        self.last_run = record
        return results

    def _has_strings(self, inputs: dict[str, Any], names: list[str]) -> bool:
        """ORT binds no string tensors: such runs go through ``session.run``."""
        if any(getattr(value, "dtype", None) == np.object_ for value in inputs.values()):
            return True
        return any(name in self._outputs and self._outputs[name].ort_type == _STRING
                   for name in names)

    def _run_plain(self, inputs: dict[str, Any], names: list[str]) -> dict[str, Any]:
        for name in names:
            if name not in self._outputs:
                raise BackendError(f"unexpected inference output '{name}' for model "
                                   f"'{self._label()}'", "INVALID_ARGUMENT")
        feed = {}
        for name, value in inputs.items():
            array = _host_array(value, name)
            feed[name] = _as_str(array) if array.dtype == np.object_ else array
        values = self._session.run(names, feed)
        self.last_run = RunRecord()
        return {name: _as_bytes(value) if value.dtype == np.object_ else value
                for name, value in zip(names, values, strict=True)}

    # -- helpers ------------------------------------------------------------------------------

    def _failure(self, exc: Exception) -> BackendError:
        text = str(exc).strip().splitlines()
        summary = text[-1] if text else type(exc).__name__
        return BackendError(f"onnx runtime error for model '{self._label()}': {summary}")

    def _label(self) -> str:
        if self._instance is not None:
            return self._instance.name
        return self._model.name if self._model is not None else "<unloaded>"


def _host_array(value: Any, name: str) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    if hasattr(value, "detach") and hasattr(value, "cpu"):    # a torch tensor (CUDA region)
        return host_array(value)  # large ones through pinned memory
    raise BackendError(f"input '{name}' is a {type(value).__name__}, not an array",
                       "INVALID_ARGUMENT")


def _destination(buffers: dict[str, memoryview] | None, name: str, shape: list[int],
                 dtype: np.dtype, inputs: list[tuple[int, int]]) -> np.ndarray | None:
    """The client-region destination of an output as an array ORT can write, or None when the
    output has none, does not fit, is misaligned or overlaps an input."""
    if not buffers or name not in buffers:
        return None
    buffer = buffers[name]
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if nbytes == 0 or nbytes > buffer.nbytes or buffer.readonly:
        return None
    target = np.ndarray(shape, dtype, buffer)
    start = _address(target)
    if start % dtype.itemsize:
        return None
    for begin, size in inputs:
        if start < begin + size and begin < start + nbytes:
            return None
    return target


def _address(array: np.ndarray) -> int:
    """Where the array's data starts (``.ctypes.data`` costs microseconds)."""
    return int(array.__array_interface__["data"][0])


def _lent(allocate: Callable[[int], memoryview | None], shape: list[int],
          dtype: np.dtype) -> np.ndarray | None:
    """An output array in the memory the worker lends (its output arena), or None."""
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    memory = allocate(nbytes) if nbytes else None
    if memory is None:
        return None
    return np.ndarray(shape, dtype, memory)


def _as_str(array: np.ndarray) -> np.ndarray:
    """BYTES elements as ORT's string tensors want them (str)."""
    out = np.empty(array.shape, dtype=np.object_)
    out.reshape(-1)[:] = [item.decode("utf-8", "replace") if isinstance(item, bytes)
                          else str(item) for item in array.reshape(-1)]
    return out


def _as_bytes(array: np.ndarray) -> np.ndarray:
    out = np.empty(array.shape, dtype=np.object_)
    out.reshape(-1)[:] = [item.encode("utf-8") if isinstance(item, str) else bytes(item)
                          for item in array.reshape(-1)]
    return out
