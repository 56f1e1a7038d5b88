"""An ensemble's config, validated with Triton's rules and texts.

``validate_scheduling`` is Triton's ``ValidateEnsembleSchedulingConfig`` (model_config_utils.cc):
what the ensemble's own config can tell (steps set, each ensemble tensor produced once, inputs
and outputs mapped, data flows from the inputs to every output, no tensor left dangling; a
cycle leaves its tensors unreachable and is reported as such). ``validate_steps`` is
``ValidateEnsembleConfig`` (ensemble_utils.cc): each step against its composing model's
config (inputs and outputs that exist, every required input mapped once, datatypes and shapes
consistent across the steps that share a tensor, batch sizes).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field

from shmserve.protos import shmserve_model_config_pb2 as mc

ENSEMBLE_PLATFORM = "ensemble"


class EnsembleConfigError(Exception):
    """An ensemble that cannot load; the message is Triton's."""


def is_ensemble(config: mc.ModelConfig) -> bool:
    return config.platform == ENSEMBLE_PLATFORM


def composing_models(config: mc.ModelConfig) -> list[tuple[str, int]]:
    """(model name, version or -1 for the latest) of each step, in step order, once each."""
    seen: dict[tuple[str, int], None] = {}
    for step in config.ensemble_scheduling.step:
        seen.setdefault((step.model_name, step.model_version or -1), None)
    return list(seen)


@dataclass
class _Tensor:
    produced: bool
    ready: bool = False
    prev: list[_Tensor] = field(default_factory=list)
    next: list[_Tensor] = field(default_factory=list)


def validate_scheduling(config: mc.ModelConfig) -> None:
    name = config.name
    if not is_ensemble(config):
        raise EnsembleConfigError(f"ensemble scheduling can not be set for model {name} whose "
                                  f"platform is not {ENSEMBLE_PLATFORM}")
    if config.instance_group:
        raise EnsembleConfigError(f"instance group should not be specified for ensemble {name}")
    if config.HasField("optimization"):
        raise EnsembleConfigError(f"optimization should not be specified for ensemble {name}")
    if not config.ensemble_scheduling.step:
        raise EnsembleConfigError(f"must specify 'step' for ensemble {name}")
    tensors: dict[str, _Tensor] = {}
    for step in config.ensemble_scheduling.step:
        if not step.model_name:
            raise EnsembleConfigError(f"must specify 'model_name' in step of ensemble {name}")
        if not step.input_map:
            raise EnsembleConfigError(f"must specify one or more 'input_map' in step of "
                                      f"ensemble {name}")
        if not step.output_map:
            raise EnsembleConfigError(f"must specify one or more 'output_map' in step of "
                                      f"ensemble {name}")
        produced = []
        for tensor_name in step.output_map.values():
            node = tensors.get(tensor_name)
            if node is None:
                node = tensors[tensor_name] = _Tensor(True)
            elif node.produced:
                raise EnsembleConfigError(f"ensemble tensor {tensor_name} can appear in an "
                                          f"output map only once for ensemble {name}")
            else:
                node.produced = True
            produced.append(node)
        for tensor_name in step.input_map.values():
            node = tensors.setdefault(tensor_name, _Tensor(False))
            for output in produced:
                output.prev.append(node)
                node.next.append(output)
    ready: deque[_Tensor] = deque()
    for tensor in config.input:
        node = tensors.get(tensor.name)
        if node is None:
            raise EnsembleConfigError(f"must map ensemble input {tensor.name} for ensemble "
                                      f"{name}")
        node.ready = True
        ready.append(node)
    while ready:
        node = ready.popleft()
        for after in node.next:
            if not after.ready and all(before.ready for before in after.prev):
                after.ready = True
                ready.append(after)
    outputs = set()
    for tensor in config.output:
        node = tensors.get(tensor.name)
        if node is None:
            raise EnsembleConfigError(f"must map ensemble output {tensor.name} for ensemble "
                                      f"{name}")
        if not node.ready:
            raise EnsembleConfigError(f"no data will be written to ensemble output "
                                      f"{tensor.name} for ensemble {name}")
        outputs.add(tensor.name)
    for tensor_name, node in tensors.items():
        if tensor_name in outputs:
            continue
        if not node.ready:
            raise EnsembleConfigError(f"ensemble tensor {tensor_name} is redundant as no data "
                                      f"will be written to it for ensemble {name}")
        if not node.next:
            raise EnsembleConfigError(f"ensemble tensor {tensor_name} is redundant as it will "
                                      f"not be used in any models for ensemble {name}")


@dataclass
class _TypedTensor:
    model: str
    data_type: int
    dims: list[int]
    full_dims: list[int]


def _typed(model: str, batching: bool, data_type: int, dims: list[int]) -> _TypedTensor:
    return _TypedTensor(model, data_type, dims, ([-1] if batching else []) + dims)


def _dims_match(a: list[int], b: list[int]) -> bool:
    return len(a) == len(b) and all(x == y or x == -1 or y == -1 for x, y in zip(a, b,
                                                                                 strict=True))


def _dims_text(dims: list[int]) -> str:
    return "[" + ",".join(str(d) for d in dims) + "]"


def _consistent(lhs: _TypedTensor, rhs: _TypedTensor, prefix: str) -> None:
    if lhs.data_type != rhs.data_type:
        raise EnsembleConfigError(
            f"{prefix}inconsistent data type: {mc.DataType.Name(lhs.data_type)} is inferred "
            f"from model {lhs.model} while {mc.DataType.Name(rhs.data_type)} is inferred from "
            f"model {rhs.model}")
    if not _dims_match(lhs.dims, rhs.dims) and not _dims_match(lhs.full_dims, rhs.full_dims):
        raise EnsembleConfigError(
            f"{prefix}inconsistent shape: {_dims_text(lhs.full_dims)} is inferred from model "
            f"{lhs.model} while {_dims_text(rhs.full_dims)} is inferred from model {rhs.model}")


def validate_steps(config: mc.ModelConfig, configs: Mapping[str, mc.ModelConfig]) -> None:
    """Each step against its composing model's (loaded, completed) config."""
    name = config.name
    batching = config.max_batch_size > 0
    tensors: dict[str, _TypedTensor] = {}
    for tensor in config.input:
        dims = list(tensor.reshape.shape if tensor.HasField("reshape") else tensor.dims)
        tensors[tensor.name] = _typed(name, batching, tensor.data_type, dims)
    for tensor in config.output:
        dims = list(tensor.reshape.shape if tensor.HasField("reshape") else tensor.dims)
        tensors[tensor.name] = _typed(name, batching, tensor.data_type, dims)
    for step in config.ensemble_scheduling.step:
        model = step.model_name
        step_config = configs[model]
        if 0 < step_config.max_batch_size < config.max_batch_size:
            raise EnsembleConfigError(
                f"ensemble {name} allows maximum batch size {config.max_batch_size}, but it "
                f"contains model {model} which only allows maximum batch size to be "
                f"{step_config.max_batch_size}")
        step_batching = step_config.max_batch_size > 0
        input_names = {tensor.name for tensor in step_config.input}
        for model_input, tensor_name in step.input_map.items():
            if model_input not in input_names:
                raise EnsembleConfigError(
                    f"in ensemble {name}, ensemble tensor {tensor_name} is mapping to "
                    f"non-existing input {model_input} in model {model}")
        for model_input_config in step_config.input:
            tensor_name = step.input_map.get(model_input_config.name)
            if tensor_name is None:
                if model_input_config.optional:
                    continue
                raise EnsembleConfigError(
                    f"in ensemble {name}, input {model_input_config.name} in model {model} is "
                    f"not mapped to any ensemble tensors")
            typed = _typed(model, step_batching, model_input_config.data_type,
                           list(model_input_config.dims))
            known = tensors.get(tensor_name)
            if known is None:
                tensors[tensor_name] = typed
            else:
                _consistent(known, typed, f"in ensemble {name}, ensemble tensor {tensor_name}: ")
        output_names = {tensor.name for tensor in step_config.output}
        for model_output, tensor_name in step.output_map.items():
            if model_output not in output_names:
                raise EnsembleConfigError(
                    f"in ensemble {name}, ensemble tensor {tensor_name} is mapped from "
                    f"non-existing output {model_output} in model {model}")
        for model_output_config in step_config.output:
            for model_output, tensor_name in step.output_map.items():
                if model_output != model_output_config.name:
                    continue
                typed = _typed(model, step_batching, model_output_config.data_type,
                               list(model_output_config.dims))
                known = tensors.get(tensor_name)
                if known is None:
                    tensors[tensor_name] = typed
                else:
                    _consistent(known, typed,
                                f"in ensemble {name}, ensemble tensor {tensor_name}: ")
