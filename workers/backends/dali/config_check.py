"""A DALI model's config checked against, or completed from, its pipeline.

The rules and the texts are those of Triton's DALI backend (``src/config_tools``):

* inputs are matched by name to the pipeline's external sources; outputs by position to the
  pipeline's outputs (so a config may rename them);
* a data type or a number of dimensions the pipeline declares (``fn.external_source(dtype=,
  ndim=)``, ``pipeline_def(output_dtype=, output_ndim=)``) must agree with the config;
* a model with ``max_batch_size: 0`` still receives a batch of samples: its dims start with the
  sample dimension (-1), which the pipeline's ``ndim`` does not count.

Pure logic on dicts (Triton's model_config JSON): no DALI, no processes.
"""

from __future__ import annotations

import copy
from typing import Any

from shmserve.workers.backend import BackendError
from shmserve.workers.backends.dali.pipeline_def import PipelineInfo, PipelineTensor

NO_CONFIG_TYPE = "TYPE_INVALID"


def _invalid(message: str) -> BackendError:
    return BackendError(message, "INVALID_ARGUMENT")


def _dims(entry: dict[str, Any]) -> list[int]:
    return [int(dim) for dim in entry.get("dims") or []]


def _pipeline_dims(tensor: PipelineTensor, batched: bool) -> list[int] | None:
    if tensor.ndim is None:
        return None
    dims = [-1] * tensor.ndim
    return dims if batched else [-1, *dims]


def _match_dims(name: str, config_dims: list[int], pipeline_dims: list[int]) -> list[int]:
    if len(config_dims) != len(pipeline_dims):
        raise _invalid(f'Mismatch in number of dimensions for "{name}"\n'
                       f"Number of dimensions defined in config: {len(config_dims)}\n"
                       f"Number of dimensions defined in pipeline: {len(pipeline_dims)}")
    merged = []
    for ours, theirs in zip(config_dims, pipeline_dims, strict=True):
        if ours != theirs and -1 not in (ours, theirs):
            raise _invalid(f"Mismath in dims for {name}\nDims defined in config: "
                           f"{config_dims}\nDims defined in pipeline: {pipeline_dims}")
        merged.append(max(ours, theirs))
    return merged


def _check_dtype(entry: dict[str, Any], name: str, tensor: PipelineTensor,
                 allow_missing: bool) -> str | None:
    found = str(entry.get("data_type") or NO_CONFIG_TYPE)
    declared = tensor.config_type
    if found != NO_CONFIG_TYPE:
        if declared is not None and found != declared:
            raise _invalid(f'Mismatch of data_type config for "{name}".\n'
                           f"Data type defined in config: {found}\n"
                           f"Data type defined in pipeline: {declared}")
        return found
    if not allow_missing:
        raise _invalid(f'Missing data_type config for "{name}"')
    return declared


def _check_no_stray_inputs(inputs: list[dict[str, Any]], info: PipelineInfo) -> None:
    names = {tensor.name for tensor in info.inputs}
    for index, entry in enumerate(inputs):
        if not entry.get("name"):
            raise _invalid(f"The input at index {index} in the model configuration does not "
                           f"contain a `name` field.")
        if entry["name"] not in names:
            raise _invalid(f"Configuration file contains config for {entry['name']} but such "
                           f"input is not present in the pipeline.")


def _outputs_count(config_count: int, pipeline_count: int) -> BackendError:
    return _invalid(f"The number of outputs specified in the DALI pipeline and the "
                    f"configuration file do not match.\nModel config outputs: {config_count}"
                    f"\nPipeline outputs: {pipeline_count}")


def validate_config(config: dict[str, Any], info: PipelineInfo) -> None:
    """Raise BackendError(INVALID_ARGUMENT) where the config contradicts the pipeline."""
    batched = int(config.get("max_batch_size") or 0) > 0
    inputs = list(config.get("input") or [])
    _check_no_stray_inputs(inputs, info)
    by_name = {entry["name"]: entry for entry in inputs}
    for tensor in info.inputs:
        entry = by_name.get(tensor.name)
        if entry is None:
            raise _invalid(f'Missing config for "{tensor.name}" input.')
        _check_io(entry, tensor, batched)
    outputs = list(config.get("output") or [])
    if len(outputs) != len(info.outputs):
        raise _outputs_count(len(outputs), len(info.outputs))
    for index, (entry, tensor) in enumerate(zip(outputs, info.outputs, strict=True)):
        if not entry.get("name"):
            raise _invalid(f"The output at index {index} in the model configuration does not "
                           f"contain a `name` field.")
        _check_io(entry, tensor, batched)


def _check_io(entry: dict[str, Any], tensor: PipelineTensor, batched: bool) -> None:
    name = str(entry["name"])
    _check_dtype(entry, name, tensor, allow_missing=False)
    config_dims = _dims(entry)
    if not config_dims:
        raise _invalid(f'Missing dims config for "{name}"')
    pipeline_dims = _pipeline_dims(tensor, batched)
    if pipeline_dims is not None:
        _match_dims(name, config_dims, pipeline_dims)


def _autofill_io(entry: dict[str, Any], tensor: PipelineTensor, batched: bool) -> None:
    entry.setdefault("name", tensor.name)
    dtype = _check_dtype(entry, str(entry["name"]), tensor, allow_missing=True)
    entry["data_type"] = dtype or NO_CONFIG_TYPE
    pipeline_dims = _pipeline_dims(tensor, batched)
    if pipeline_dims is None:
        return
    config_dims = _dims(entry)
    entry["dims"] = (_match_dims(str(entry["name"]), config_dims, pipeline_dims)
                     if config_dims else pipeline_dims)


def autofill_config(config: dict[str, Any], info: PipelineInfo,
                    max_batch_size_given: bool) -> dict[str, Any]:
    """Triton's ``AutofillConfig``: inputs, outputs and max_batch_size completed from the
    pipeline, what the config says kept (a contradiction raises). ``max_batch_size_given``: the
    config file states max_batch_size (0 there means a model without batching)."""
    completed = copy.deepcopy(config)
    configured = int(completed.get("max_batch_size") or 0)
    batched = not (max_batch_size_given and configured == 0)
    inputs = list(completed.get("input") or [])
    _check_no_stray_inputs(inputs, info)
    for tensor in info.inputs:
        entry = next((item for item in inputs if item.get("name") == tensor.name), None)
        if entry is None:
            entry = {"name": tensor.name}
            inputs.append(entry)
        _autofill_io(entry, tensor, batched)
        entry.setdefault("allow_ragged_batch", True)
    outputs = list(completed.get("output") or [])
    if len(outputs) > len(info.outputs):
        raise _outputs_count(len(outputs), len(info.outputs))
    for index, tensor in enumerate(info.outputs):
        if index == len(outputs):
            outputs.append({})
        _autofill_io(outputs[index], tensor, batched)
    completed["input"], completed["output"] = inputs, outputs
    if batched and configured <= 0:
        completed["max_batch_size"] = info.max_batch_size
    elif not batched:
        completed["max_batch_size"] = 0
    if batched and not completed.get("dynamic_batching"):
        completed["dynamic_batching"] = {}
    return completed
