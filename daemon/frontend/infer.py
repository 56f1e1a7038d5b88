"""ModelInferRequest -> InferRequest (validated against the model config) and back."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import numpy as np

from shmserve.daemon.errors import ServeError, invalid_argument, unimplemented
from shmserve.daemon.models import ModelVersion
from shmserve.daemon.request import InferRequest, InputTensor, OutputTensor, RequestedOutput
from shmserve.daemon.shm_registry import Region, ShmRegistry
from shmserve.protos import shmserve_model_config_pb2 as mc
from shmserve.protos import shmserve_service_pb2 as pb
from shmserve.protos.datatypes import (
    CONFIG_TO_V2,
    ELEMENT_SIZE,
    deserialize_bytes_tensor,
    element_count,
    serialize_bytes_tensor,
)
from shmserve.protos.parameters import parameter_value

_CONTENTS_FIELD = {
    "BOOL": ("bool_contents", np.bool_), "INT8": ("int_contents", np.int8),
    "INT16": ("int_contents", np.int16), "INT32": ("int_contents", np.int32),
    "INT64": ("int64_contents", np.int64), "UINT8": ("uint_contents", np.uint8),
    "UINT16": ("uint_contents", np.uint16), "UINT32": ("uint_contents", np.uint32),
    "UINT64": ("uint64_contents", np.uint64), "FP32": ("fp32_contents", np.float32),
    "FP64": ("fp64_contents", np.float64),
}
_SHM_KEYS = ("shared_memory_region", "shared_memory_offset", "shared_memory_byte_size")


def config_datatype(data_type: int) -> str:
    return CONFIG_TO_V2[mc.DataType.Name(data_type)]


def _dims_text(dims: list[int]) -> str:
    return "[" + ",".join(str(d) for d in dims) + "]"


_SHM_USAGE = "'shared_memory_byte_size' must be specified along with 'shared_memory_region'"


def _shm_params(params: Any, what: str) -> tuple[str, int, int] | None:
    """(region, offset, byte_size) from a tensor's parameters, or None.

    Every malformed combination gets Triton's one message, with what was wrong appended.
    """
    present = [key for key in _SHM_KEYS if key in params]
    if not present:
        return None
    if "shared_memory_region" not in params:
        raise invalid_argument(f"{_SHM_USAGE} for {what}: got {', '.join(present)} without "
                               f"'shared_memory_region'")
    if "shared_memory_byte_size" not in params:
        raise invalid_argument(f"{_SHM_USAGE} for {what}")
    region = params["shared_memory_region"]
    if region.WhichOneof("parameter_choice") != "string_param":
        raise invalid_argument(f"{_SHM_USAGE} for {what}: 'shared_memory_region' must be a "
                               f"string_param")
    values = []
    for key in ("shared_memory_offset", "shared_memory_byte_size"):
        if key not in params:
            values.append(0)
            continue
        choice = params[key].WhichOneof("parameter_choice")
        if choice not in ("int64_param", "uint64_param"):
            raise invalid_argument(f"{_SHM_USAGE} for {what}: '{key}' must be an int64_param")
        values.append(getattr(params[key], choice))
    return region.string_param, values[0], values[1]


def build_request(message: pb.ModelInferRequest, model: ModelVersion, registry: ShmRegistry,
                  raw: Sequence[bytes | memoryview] | None = None,
                  owner: str = "") -> InferRequest:
    """Validate a request against the model's config; pins the regions it references.

    ``raw`` replaces ``message.raw_input_contents`` when the frontend sliced them off the wire.
    """
    regions: list[Region] = []
    try:
        return _build(message, model, registry, regions,
                      message.raw_input_contents if raw is None else raw, owner)
    except BaseException:
        for region in regions:
            registry.release(region)
        raise


def _build(message: pb.ModelInferRequest, model: ModelVersion, registry: ShmRegistry,
           regions: list[Region], raw: Sequence[bytes | memoryview],
           owner: str) -> InferRequest:
    config = model.config
    name = model.name
    configured = {tensor.name: tensor for tensor in config.input}
    max_batch = config.max_batch_size
    given = [tensor.name for tensor in message.inputs]
    missing = [n for n, t in configured.items() if n not in given and not t.optional]
    unknown = [n for n in given if n not in configured]
    if unknown:
        raise invalid_argument(f"unexpected inference input '{unknown[0]}' for model '{name}'")
    if missing:
        required = len([t for t in configured.values() if not t.optional])
        raise invalid_argument(
            f"expected {required} inputs but got {len(given)} inputs for model '{name}'. Got "
            f"input(s) {given}, but missing required input(s) {missing}. Please provide all "
            f"required input(s).")
    if len(set(given)) != len(given):
        raise invalid_argument(f"input names must be unique in a request for model '{name}'")
    raw_index = 0
    batch_size: int | None = None
    inputs: list[InputTensor] = []
    for tensor in message.inputs:
        spec = configured[tensor.name]
        expected_type = config_datatype(spec.data_type)
        if tensor.datatype != expected_type:
            raise invalid_argument(
                f"inference input '{tensor.name}' data-type is '{tensor.datatype}', but model "
                f"'{name}' expects '{expected_type}'")
        shape = list(tensor.shape)
        shape, this_batch = _check_shape(tensor.name, name, spec, shape, max_batch)
        if batch_size is None:
            batch_size = this_batch
        elif this_batch != batch_size:
            raise invalid_argument(f"input '{tensor.name}' batch size does not match other "
                                   f"inputs for '{name}'")
        what = f"input '{tensor.name}'"
        shm = _shm_params(tensor.parameters, what)
        fixed = expected_type != "BYTES"
        expected_bytes = ELEMENT_SIZE[expected_type] * element_count(tensor.shape) if fixed else -1
        if shm is not None:
            if tensor.HasField("contents"):
                raise invalid_argument(f"unexpected 'content' provided when using shared memory "
                                       f"for input '{tensor.name}' for model '{name}'")
            region_name, offset, byte_size = shm
            region = registry.acquire(region_name, offset, byte_size, owner)
            regions.append(region)
            if fixed and byte_size != expected_bytes:
                raise _byte_size_mismatch(tensor.name, name, expected_bytes, byte_size)
            inputs.append(InputTensor(tensor.name, expected_type, shape, None, region, offset,
                                      byte_size))
            continue
        if raw:
            if tensor.HasField("contents"):
                raise invalid_argument(f"contents field must not be specified when using "
                                       f"raw_input_contents for '{tensor.name}' for model "
                                       f"'{name}'")
            if raw_index >= len(raw):
                raise invalid_argument(f"expected tensor data for input '{tensor.name}' for "
                                       f"model '{name}': raw_input_contents has only {len(raw)}"
                                       f" entries")
            data = raw[raw_index]
            raw_index += 1
        else:
            data = _contents_bytes(tensor, expected_type, name)
        if fixed and len(data) != expected_bytes:
            raise _byte_size_mismatch(tensor.name, name, expected_bytes, len(data))
        if not fixed:
            _check_bytes_tensor(tensor.name, name, data, element_count(tensor.shape))
        inputs.append(InputTensor(tensor.name, expected_type, shape, data, None, 0, len(data)))
    if raw and raw_index != len(raw):
        raise invalid_argument(f"raw_input_contents has {len(raw)} entries but the request "
                               f"names {raw_index} inputs without shared memory for model "
                               f"'{name}'")
    outputs = _requested_outputs(message, config, name, registry, regions, owner)
    loop = asyncio.get_running_loop()
    parameters = {key: parameter_value(value) for key, value in message.parameters.items()}
    sequence_id = parameters.get("sequence_id", 0)
    correlation = sequence_id if isinstance(sequence_id, int | str) else 0
    return InferRequest(name, model.version, message.id, inputs, outputs, batch_size or 1,
                        loop.create_future(), parameters, correlation, 0, regions)


def _check_shape(tensor: str, model: str, spec: mc.ModelInput, shape: list[int],
                 max_batch: int) -> tuple[list[int], int]:
    dims = list(spec.dims)
    expected = [-1, *dims] if max_batch > 0 else dims
    batch = 1
    body = shape
    if max_batch > 0:
        if not shape:
            raise _shape_error(tensor, model, expected, shape)
        batch, body = shape[0], shape[1:]
        if batch > max_batch:
            raise invalid_argument(f"inference request batch-size must be <= {max_batch} for "
                                   f"'{model}'")
        if batch < 1:
            raise _shape_error(tensor, model, expected, shape)
    if spec.HasField("reshape"):
        if element_count(body) != element_count(d for d in spec.reshape.shape if d > 0) and \
                -1 not in spec.reshape.shape and -1 not in dims:
            raise _shape_error(tensor, model, expected, shape)
    if len(body) != len(dims) or any(d != -1 and d != s for d, s in zip(dims, body, strict=True)):
        raise _shape_error(tensor, model, expected, shape)
    if any(s < 0 for s in shape):
        raise _shape_error(tensor, model, expected, shape)
    if spec.HasField("reshape"):
        reshaped = list(spec.reshape.shape)
        if -1 in reshaped:
            known = element_count(d for d in reshaped if d != -1) or 1
            reshaped = [element_count(body) // known if d == -1 else d for d in reshaped]
        body = reshaped
    return ([batch, *body] if max_batch > 0 else body), batch


def _shape_error(tensor: str, model: str, expected: list[int], got: list[int]) -> ServeError:
    return invalid_argument(f"unexpected shape for input '{tensor}' for model '{model}'. "
                            f"Expected {_dims_text(expected)}, got {_dims_text(got)}")


def _byte_size_mismatch(tensor: str, model: str, expected: int, got: int) -> ServeError:
    return invalid_argument(f"input byte size mismatch for input '{tensor}' for model "
                            f"'{model}'. Expected {expected}, got {got}")


def _contents_bytes(tensor: pb.ModelInferRequest.InferInputTensor, datatype: str,
                    model: str) -> bytes:
    count = element_count(tensor.shape)
    if datatype == "BYTES":
        values = list(tensor.contents.bytes_contents)
        if len(values) != count:
            raise invalid_argument(f"unexpected number of string elements {len(values)} for "
                                   f"inference input '{tensor.name}' for model '{model}', "
                                   f"expecting {count}")
        return serialize_bytes_tensor(np.array(values, dtype=object))
    if datatype not in _CONTENTS_FIELD:
        raise invalid_argument(f"input '{tensor.name}' of datatype {datatype} must be sent in "
                               f"raw_input_contents for model '{model}'")
    field_name, dtype = _CONTENTS_FIELD[datatype]
    values = getattr(tensor.contents, field_name)
    if len(values) != count:
        raise invalid_argument(f"unexpected number of elements {len(values)} in contents for "
                               f"inference input '{tensor.name}' for model '{model}', "
                               f"expecting {count}")
    return np.array(values, dtype=dtype).tobytes()


def _check_bytes_tensor(tensor: str, model: str, data: bytes | memoryview, count: int) -> None:
    try:
        deserialize_bytes_tensor(data, count)
    except ValueError as exc:
        raise invalid_argument(f"malformed BYTES data for inference input '{tensor}' for model "
                               f"'{model}': {exc}") from None


def _requested_outputs(message: pb.ModelInferRequest, config: mc.ModelConfig, model: str,
                       registry: ShmRegistry, regions: list[Region],
                       owner: str) -> list[RequestedOutput]:
    known = {tensor.name for tensor in config.output}
    outputs: list[RequestedOutput] = []
    for requested in message.outputs:
        if requested.name not in known:
            raise invalid_argument(f"unexpected inference output '{requested.name}' for model "
                                   f"'{model}'")
        if "classification" in requested.parameters:
            raise unimplemented("classification outputs are not supported by shmserve")
        shm = _shm_params(requested.parameters, f"output '{requested.name}'")
        if shm is None:
            outputs.append(RequestedOutput(requested.name))
            continue
        region_name, offset, byte_size = shm
        region = registry.acquire(region_name, offset, byte_size, owner)
        regions.append(region)
        outputs.append(RequestedOutput(requested.name, region, offset, byte_size))
    return outputs


def response_parts(request: InferRequest, outputs: list[OutputTensor]
                   ) -> tuple[pb.ModelInferResponse, list[bytes]]:
    """The response metadata and, apart, the raw output contents (b"" for region outputs)."""
    raw: list[bytes] = []
    response = pb.ModelInferResponse(model_name=request.model,
                                     model_version=str(request.version), id=request.request_id)
    for output in outputs:
        tensor = response.outputs.add(name=output.name, datatype=output.datatype,
                                      shape=output.shape)
        if output.data is None:
            tensor.parameters["shared_memory_region"].string_param = _region_of(request,
                                                                                output.name)
        raw.append(output.data if output.data is not None else b"")
    return response, raw


def _region_of(request: InferRequest, output: str) -> str:
    for requested in request.outputs:
        if requested.name == output and requested.region is not None:
            return requested.region.name
    return ""
