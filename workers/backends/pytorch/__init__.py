"""The ``pytorch`` backend: TorchScript models, as Triton's PyTorch (libtorch) backend runs them.

A model selects it with ``platform: "pytorch_libtorch"`` or ``backend: "pytorch"``. Each worker
hosts one instance:

* ``model_initialize`` checks ``<version>/<default_model_filename or model.pt>`` exists, imports
  torch (an optional extra, never imported before a pytorch model loads) and reads the config.
* ``instance_initialize`` loads the file with ``torch.jit.load`` on the instance's device: the
  worker of a ``KIND_GPU`` instance is pinned with ``CUDA_VISIBLE_DEVICES``, so its GPU is
  ``cuda:0`` there; ``KIND_CPU`` loads on the CPU; ``KIND_MODEL`` keeps the devices saved in
  the file. It then binds config inputs/outputs to ``forward`` (Triton's naming conventions):

  - every input is named after a ``forward`` argument: passed by name (any config order);
  - every input is named ``<anything>__<index>`` (``INPUT__0``): passed by position;
  - otherwise (no name matches an argument): passed in config order.
  - outputs named ``<anything>__<index>`` pick that element of the returned tuple; otherwise
    the returned tuple is in config order. A returned dict is matched by output name.

* A sequence model's control and implicit-state inputs go to ``forward`` at the positions their
  ``<name>__<index>`` names give, and a state's new value is the returned tuple's element its
  output name gives (Triton's rules; sequence_io.py). The worker keeps it per sequence.
* ``execute`` runs under ``torch.inference_mode()`` (``INFERENCE_MODE: "false"`` -> no_grad).
  With ``max_batch_size > 0`` the requests of a batch are concatenated along dim 0, run once,
  and the outputs split back (views, no copy); requests whose non-batch shapes differ run one at
  a time. Inputs already on the instance's GPU (CUDA shared memory) are used in place; host
  inputs are moved once. Outputs are returned as torch tensors: the worker writes them to a
  CUDA region device-to-device or moves them to host once.

Parameters honoured (config.pbtxt ``parameters``): INFERENCE_MODE, DISABLE_OPTIMIZED_EXECUTION,
INTRA_OP_THREAD_COUNT, INTER_OP_THREAD_COUNT.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shmserve.protos.datatypes import CONFIG_TO_V2
from shmserve.workers.backend import (
    Backend,
    BackendError,
    InstanceSpec,
    ModelSpec,
    Request,
    Response,
)
from shmserve.workers.backends.pytorch.sequence_io import (
    SequenceTensors,
    named_index,
    sequence_tensors,
)
from shmserve.workers.cuda_ipc import (
    datatype_of_torch,
    import_torch,
    is_torch_tensor,
    local_ordinal,
    torch_dtype,
)

__all__ = ["DEFAULT_MODEL_FILENAME", "PyTorchBackend"]

log = logging.getLogger(__name__)

DEFAULT_MODEL_FILENAME = "model.pt"

FORWARD_ARGUMENT = "forward argument names"
NAMED_INDEX = "<name>__<index>"
CONFIG_ORDER = "config order"


@dataclass(slots=True)
class _Tensor:
    name: str
    datatype: str          # KServe v2 name: FP32, BYTES, ...


def _parameter(config: dict[str, Any], key: str) -> str | None:
    value = (config.get("parameters") or {}).get(key)
    if isinstance(value, dict):
        value = value.get("string_value")
    return None if value is None else str(value).strip()


def _flag(config: dict[str, Any], key: str, default: bool) -> bool:
    value = _parameter(config, key)
    if value is None or value == "":
        return default
    return value.lower() in ("true", "1", "yes", "on")


def _tensors(config: dict[str, Any], kind: str) -> list[_Tensor]:
    tensors = []
    for entry in config.get(kind) or []:
        data_type = str(entry.get("data_type", "TYPE_INVALID"))
        tensors.append(_Tensor(str(entry["name"]), CONFIG_TO_V2.get(data_type, data_type)))
    return tensors


def _named_indices(names: list[str]) -> list[int] | None:
    """The indices of ``<name>__<index>`` names, or None when not every name has one."""
    indices = []
    for name in names:
        index = named_index(name)
        if index is None:
            return None
        indices.append(index)
    return indices


def _signature(arguments: list[str]) -> str:
    return f"forward({', '.join(arguments)})"


class PyTorchBackend(Backend):
    """Hosts one TorchScript model instance."""

    def __init__(self) -> None:
        self._model: ModelSpec | None = None
        self._instance: InstanceSpec | None = None
        self._path: Path | None = None
        self._torch: Any = None
        self._module: Any = None
        self._device: Any = None
        self._inputs: list[_Tensor] = []
        self._outputs: list[_Tensor] = []
        self._max_batch = 0
        self._input_convention = CONFIG_ORDER
        self._input_positions: dict[str, int] = {}
        self._output_positions: dict[str, int] | None = None
        self._output_names: list[str] = []
        self._sequence = SequenceTensors()
        self._inference_mode = True
        self._optimized_execution = True

    # -- lifecycle ----------------------------------------------------------------------------

    def model_initialize(self, model: ModelSpec) -> None:
        config = model.config
        filename = config.get("default_model_filename") or DEFAULT_MODEL_FILENAME
        path = Path(model.version_path) / filename
        if not path.is_file():
            raise BackendError(f"unable to find '{path}' for model '{model.name}' (the pytorch "
                               f"backend loads a TorchScript file, saved with "
                               f"torch.jit.save)", "NOT_FOUND")
        self._torch = import_torch()
        self._model = model
        self._path = path
        self._inputs = _tensors(config, "input")
        self._outputs = _tensors(config, "output")
        self._max_batch = int(config.get("max_batch_size") or 0)
        self._sequence = sequence_tensors(config, model.name)
        self._inference_mode = _flag(config, "INFERENCE_MODE", True)
        self._optimized_execution = not _flag(config, "DISABLE_OPTIMIZED_EXECUTION", False)
        datatypes = [tensor.datatype for tensor in self._inputs + self._outputs]
        datatypes += [*self._sequence.input_types.values(),
                      *self._sequence.state_output_types.values()]
        for datatype in datatypes:
            if datatype != "BYTES":
                torch_dtype(datatype)            # fails early on a type torch cannot hold
        self._set_threads(config)

    def _set_threads(self, config: dict[str, Any]) -> None:
        torch = self._torch
        for key, setter in (("INTRA_OP_THREAD_COUNT", torch.set_num_threads),
                            ("INTER_OP_THREAD_COUNT", torch.set_num_interop_threads)):
            value = _parameter(config, key)
            if not value:
                continue
            if not value.isdigit() or int(value) < 1:
                raise BackendError(f"model '{self._label()}': parameter {key} must be a "
                                   f"positive integer, got '{value}'", "INVALID_ARGUMENT")
            try:
                setter(int(value))
            except RuntimeError as exc:       # inter-op threads can only be set once
                log.warning("%s=%s ignored: %s", key, value, exc)

    def instance_initialize(self, model: ModelSpec, instance: InstanceSpec) -> None:
        torch = self._torch
        if torch is None or self._path is None:
            raise BackendError("instance_initialize called before model_initialize")
        self._instance = instance
        self._device = self._instance_device(instance)
        try:
            with warnings.catch_warnings():
                # TorchScript is deprecated in recent torch (a Deprecation- or FutureWarning);
                # Triton's backend still loads it.
                warnings.simplefilter("ignore", DeprecationWarning)
                warnings.simplefilter("ignore", FutureWarning)  # torch >= 2.10 says so
                module = torch.jit.load(str(self._path), map_location=self._device)
        except Exception as exc:
            raise BackendError(f"failed to load model '{model.name}' from '{self._path}': "
                               f"{type(exc).__name__}: {exc}") from exc
        module.eval()
        if self._device is None:                # KIND_MODEL: the devices saved in the file
            self._device = _first_device(module, torch)
        self._module = module
        self._bind_inputs(module)
        self._bind_outputs()
        log.info("model '%s' instance '%s' loaded on %s; inputs by %s",
                 model.name, instance.name, self._device, self._input_convention)

    def _instance_device(self, instance: InstanceSpec) -> Any:
        torch = self._torch
        if instance.kind == "KIND_GPU":
            if not torch.cuda.is_available():
                raise BackendError(f"instance '{instance.name}' is KIND_GPU but PyTorch sees no "
                                   f"CUDA device (torch {torch.__version__}, CUDA build: "
                                   f"{torch.version.cuda})", "UNAVAILABLE")
            ordinal = local_ordinal(instance.device_id)
            if ordinal is None or ordinal >= torch.cuda.device_count():
                raise BackendError(f"instance '{instance.name}': GPU {instance.device_id} is "
                                   f"not visible to this worker", "UNAVAILABLE")
            return torch.device("cuda", ordinal)
        if instance.kind == "KIND_MODEL":
            return None
        return torch.device("cpu")

    def _bind_inputs(self, module: Any) -> None:
        """Triton's rules for passing config inputs to ``forward``; errors name the problem."""
        self._bind_config_inputs(module)
        extras = self._sequence.inputs
        if not extras:
            return
        positions = {**self._input_positions, **extras}
        if sorted(positions.values()) != list(range(len(positions))):
            raise BackendError(f"unable to load model '{self._label()}': input positions "
                               f"{sorted(positions.values())} must be 0..{len(positions) - 1}, "
                               f"each once (a sequence control or state input takes the "
                               f"position its '<name>__<index>' name gives)",
                               "INVALID_ARGUMENT")
        self._input_positions = positions

    def _bind_config_inputs(self, module: Any) -> None:
        arguments = _forward_arguments(module)
        names = [tensor.name for tensor in self._inputs]
        extras = self._sequence.inputs
        model = self._label()
        if arguments is None:                   # no schema to check against: positional
            indices = _named_indices(names)
            self._input_convention = NAMED_INDEX if indices is not None else CONFIG_ORDER
            self._input_positions = dict(zip(names, indices or range(len(names)), strict=True))
            return
        all_names = [argument for argument, _ in arguments]
        required = [argument for argument, has_default in arguments if not has_default]
        signature = _signature(all_names)
        matching = [name for name in names if name in all_names]
        if names and len(matching) == len(names):
            missing = [argument for argument in required
                       if argument not in names and argument not in extras]
            if missing:
                raise BackendError(f"unable to load model '{model}': {signature} needs "
                                   f"argument '{missing[0]}', which is not an input in the "
                                   f"model configuration", "INVALID_ARGUMENT")
            self._input_convention = FORWARD_ARGUMENT
            self._input_positions = {name: all_names.index(name) for name in names}
            return
        if matching:
            stray = next(name for name in names if name not in all_names)
            raise BackendError(f"unable to load model '{model}': input '{stray}' is not an "
                               f"argument of {signature}; name every input after a forward() "
                               f"argument, or every input '<name>__<index>'",
                               "INVALID_ARGUMENT")
        expected = len(names) + len(extras)
        if not len(required) <= expected <= len(all_names):
            raise BackendError(f"unable to load model '{model}', configuration expects "
                               f"{expected} inputs, model provides {len(all_names)} "
                               f"({signature})", "INVALID_ARGUMENT")
        indices = _named_indices(names)
        if indices is None:
            self._input_convention = CONFIG_ORDER
            self._input_positions = {name: index for index, name in enumerate(names)}
            return
        if not extras and sorted(indices) != list(range(len(names))):
            raise BackendError(f"unable to load model '{model}': input indices "
                               f"{sorted(indices)} must be 0..{len(names) - 1}, each once "
                               f"({signature})", "INVALID_ARGUMENT")
        self._input_convention = NAMED_INDEX
        self._input_positions = dict(zip(names, indices, strict=True))

    def _bind_outputs(self) -> None:
        names = [tensor.name for tensor in self._outputs]
        indices = _named_indices(names)
        if indices is not None and len(set(indices)) != len(indices):
            raise BackendError(f"unable to load model '{self._label()}': output indices "
                               f"{indices} are not unique", "INVALID_ARGUMENT")
        positions = (dict(zip(names, indices, strict=True)) if indices is not None
                     else {name: index for index, name in enumerate(names)})
        # A state's new value is the tuple element its output name gives; it may also be a
        # declared output (then clients may ask for it).
        for name, index in self._sequence.state_outputs.items():
            positions.setdefault(name, index)
        self._output_positions = positions
        self._output_names = list(positions)

    def instance_finalize(self) -> None:
        self._module = None
        torch = self._torch
        if torch is not None and self._device is not None and self._device.type == "cuda":
            with contextlib.suppress(Exception):
                torch.cuda.empty_cache()

    def model_finalize(self) -> None:
        self._module = None
        self._model = None

    # -- execute ------------------------------------------------------------------------------

    def execute(self, requests: list[Request]) -> list[Response]:
        if self._module is None:
            error = BackendError(f"model instance '{self._label()}' is not initialized",
                                 "UNAVAILABLE")
            return [Response(error=error) for _ in requests]
        with self._grad_mode():
            if self._max_batch > 0 and len(requests) > 1 and self._can_concatenate(requests):
                return self._run_batched(requests)
            return [self._run_one(request) for request in requests]

    @contextlib.contextmanager
    def _grad_mode(self) -> Iterator[None]:
        torch = self._torch
        mode = torch.inference_mode() if self._inference_mode else torch.no_grad()
        with mode, torch.jit.optimized_execution(self._optimized_execution):
            yield

    def _can_concatenate(self, requests: list[Request]) -> bool:
        first = requests[0].inputs
        for request in requests:
            if set(request.inputs) != set(first):
                return False
            for name, value in request.inputs.items():
                if _is_bytes(value) or len(value.shape) == 0:
                    return False
                if tuple(value.shape[1:]) != tuple(first[name].shape[1:]):
                    return False
        return True

    def _run_one(self, request: Request) -> Response:
        try:
            outputs = self._forward(request.inputs)
            return Response(outputs=self._outputs_by_name(outputs))
        except BackendError as exc:
            return Response(error=exc)
        except Exception as exc:
            log.exception("model '%s' failed", self._label())
            return Response(error=self._failure(exc))

    def _run_batched(self, requests: list[Request]) -> list[Response]:
        torch = self._torch
        names = list(requests[0].inputs)
        sizes = [int(next(iter(request.inputs.values())).shape[0]) for request in requests]
        total = sum(sizes)
        try:
            batched = {name: self._concatenate([request.inputs[name] for request in requests],
                                               self._datatype(name))
                       for name in names}
            outputs = self._outputs_by_name(self._forward(batched, already_placed=True))
            split: dict[str, list[Any]] = {}
            for name, value in outputs.items():
                if not is_torch_tensor(value) or value.dim() == 0 or value.shape[0] != total:
                    shape = list(value.shape) if hasattr(value, "shape") else "?"
                    raise BackendError(
                        f"output '{name}' of model '{self._label()}' has shape {shape}; "
                        f"expected a batch dimension of {total} (the {len(requests)} requests "
                        f"of the batch)")
                split[name] = list(torch.split(value, sizes, dim=0))
        except BackendError as exc:
            return [Response(error=exc) for _ in requests]
        except Exception as exc:
            log.exception("model '%s' failed on a batch of %d", self._label(), len(requests))
            error = self._failure(exc)
            return [Response(error=error) for _ in requests]
        return [Response(outputs={name: parts[index] for name, parts in split.items()})
                for index in range(len(requests))]

    def _concatenate(self, values: list[Any], datatype: str) -> Any:
        torch = self._torch
        if all(isinstance(value, np.ndarray) for value in values):
            # One host gather, then at most one host-to-device copy.
            return self._to_device(np.concatenate(values, axis=0), datatype)
        return torch.cat([self._to_device(value, datatype) for value in values], dim=0)

    def _forward(self, inputs: dict[str, Any], already_placed: bool = False) -> Any:
        arguments: dict[str, Any] = {}
        for name, value in inputs.items():
            if name not in self._input_positions:
                raise BackendError(f"unexpected inference input '{name}' for model "
                                   f"'{self._label()}'", "INVALID_ARGUMENT")
            datatype = self._datatype(name)
            arguments[name] = value if already_placed else self._to_device(value, datatype)
        module = self._module
        if self._input_convention == FORWARD_ARGUMENT and not self._sequence.inputs:
            return module(**arguments)
        by_position = sorted(arguments, key=lambda n: self._input_positions[n])
        positions = [self._input_positions[name] for name in by_position]
        if positions != list(range(len(positions))):
            missing = sorted(set(range(max(positions, default=-1) + 1)) - set(positions))
            raise BackendError(f"model '{self._label()}' needs its input at position "
                               f"{missing[0]}, which the request does not have",
                               "INVALID_ARGUMENT")
        return module(*[arguments[name] for name in by_position])

    def _to_device(self, value: Any, datatype: str) -> Any:
        """A request input as forward() takes it: a tensor on the instance's device.

        NumPy arrays become tensors over the same memory (host instances: no copy) and are moved
        once to a GPU. BYTES inputs become ``List[str]`` (Triton's convention), flattened.
        """
        torch = self._torch
        if is_torch_tensor(value):
            return value.to(self._device) if value.device != self._device else value
        array = np.asarray(value)
        if datatype == "BYTES" or array.dtype == np.object_:
            return [item.decode("utf-8", "replace") if isinstance(item, bytes) else str(item)
                    for item in array.reshape(-1).tolist()]
        if not array.flags.writeable or not array.flags.c_contiguous:
            array = np.array(array, copy=True, order="C")  # tiny inline inputs; torch wants
            # memory it may write
        if datatype == "BF16":
            tensor = torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
        else:
            tensor = torch.from_numpy(array)
        return tensor.to(self._device) if tensor.device != self._device else tensor

    def _outputs_by_name(self, result: Any) -> dict[str, Any]:
        names = self._output_names
        model = self._label()
        if isinstance(result, dict):
            found: dict[str, Any] = {}
            for name in names:
                if name not in result:
                    raise BackendError(f"model '{model}' returned no output '{name}' (it "
                                       f"returned {sorted(result)})")
                found[name] = result[name]
            return self._checked(found)
        values = list(result) if isinstance(result, (tuple, list)) and not _is_str_list(result) \
            else [result]
        assert self._output_positions is not None
        found = {}
        for name in names:
            position = self._output_positions[name]
            if position >= len(values):
                raise BackendError(f"model '{model}' returned {len(values)} output(s); output "
                                   f"'{name}' needs position {position}")
            found[name] = values[position]
        return self._checked(found)

    def _checked(self, outputs: dict[str, Any]) -> dict[str, Any]:
        checked: dict[str, Any] = {}
        expected = {**self._sequence.state_output_types,
                    **{tensor.name: tensor.datatype for tensor in self._outputs}}
        for name, value in outputs.items():
            want = expected[name]
            if _is_str_list(value):
                if want != "BYTES":
                    raise BackendError(f"output '{name}' of model '{self._label()}' is a list "
                                       f"of strings; the configuration expects {want}")
                out = np.empty(len(value), dtype=np.object_)
                out[:] = [item.encode("utf-8") for item in value]
                checked[name] = out
                continue
            if not is_torch_tensor(value):
                raise BackendError(f"output '{name}' of model '{self._label()}' is a "
                                   f"{type(value).__name__}, not a tensor")
            got = datatype_of_torch(value.dtype)
            if got != want:
                raise BackendError(f"unexpected datatype TYPE_{got} for inference output "
                                   f"'{name}', expecting TYPE_{want}", "INVALID_ARGUMENT")
            checked[name] = value.detach()
        return checked

    # -- helpers ------------------------------------------------------------------------------

    def _datatype(self, name: str) -> str:
        for tensor in self._inputs:
            if tensor.name == name:
                return tensor.datatype
        sequence_type = self._sequence.input_types.get(name)
        if sequence_type is not None:
            return sequence_type
        raise BackendError(f"unexpected inference input '{name}' for model '{self._label()}'",
                           "INVALID_ARGUMENT")

    def _failure(self, exc: Exception) -> BackendError:
        text = str(exc).strip().splitlines()
        summary = text[-1] if text else type(exc).__name__
        return BackendError(f"PyTorch execute failure for model '{self._label()}': "
                            f"{type(exc).__name__}: {summary}")

    def _label(self) -> str:
        if self._instance is not None:
            return self._instance.name
        return self._model.name if self._model is not None else "<unloaded>"


def _forward_arguments(module: Any) -> list[tuple[str, bool]] | None:
    """forward()'s (argument name, has a default) pairs without ``self``; None if unknown."""
    try:
        schema = module.forward.schema
    except (AttributeError, RuntimeError):
        return None
    arguments = [(argument.name, _has_default(argument)) for argument in schema.arguments]
    if arguments and arguments[0][0] == "self":
        arguments = arguments[1:]
    return arguments


def _has_default(argument: Any) -> bool:
    has_default = getattr(argument, "has_default_value", None)
    if has_default is not None:
        return bool(has_default())
    return argument.default_value is not None


def _first_device(module: Any, torch: Any) -> Any:
    for tensor in list(module.parameters()) + list(module.buffers()):
        return tensor.device
    return torch.device("cpu")


def _is_bytes(value: Any) -> bool:
    return isinstance(value, np.ndarray) and value.dtype == np.object_


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value) \
        and bool(value)
