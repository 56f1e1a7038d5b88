"""ModelInferRequest -> the door-neutral request items, and the ModelInferResponse back."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from shmserve.daemon.errors import ServeError, invalid_argument
from shmserve.daemon.frontend.wire import encode_varint
from shmserve.daemon.infer_request import OutputIn, RequestItems, ShmRef, TensorIn, shm_reference
from shmserve.daemon.request import InferRequest, OutputTensor
from shmserve.protos import shmserve_service_pb2 as pb
from shmserve.protos.datatypes import element_count, serialize_bytes_tensor
from shmserve.protos.parameters import parameter_value

_CONTENTS_FIELD = {
    "BOOL": ("bool_contents", np.bool_), "INT8": ("int_contents", np.int8),
    "INT16": ("int_contents", np.int16), "INT32": ("int_contents", np.int32),
    "INT64": ("int64_contents", np.int64), "UINT8": ("uint_contents", np.uint8),
    "UINT16": ("uint_contents", np.uint16), "UINT32": ("uint_contents", np.uint32),
    "UINT64": ("uint64_contents", np.uint64), "FP32": ("fp32_contents", np.float32),
    "FP64": ("fp64_contents", np.float64),
}


def parse_request(message: pb.ModelInferRequest,
                  raw: Sequence[bytes | memoryview] | None = None) -> RequestItems:
    """``raw`` replaces ``message.raw_input_contents`` when the door sliced them off the
    wire. Regions are looked up in the anonymous scope (owner "")."""
    if raw is None:
        raw = message.raw_input_contents
    model = message.model_name
    raw_index = 0
    raw_count = len(raw)
    inputs: list[TensorIn] = []
    for tensor in message.inputs:
        item = TensorIn(tensor.name, tensor.datatype, list(tensor.shape))
        try:
            if tensor.parameters:  # (most requests have none: no shm lookup then)
                item.shm = _shm_params(tensor.parameters, f"input '{tensor.name}'")
            if item.shm is not None:
                if tensor.HasField("contents"):
                    raise invalid_argument(f"unexpected 'content' provided when using shared "
                                           f"memory for input '{tensor.name}' for model "
                                           f"'{model}'")
            elif raw_count:
                if tensor.HasField("contents"):
                    raise invalid_argument(f"contents field must not be specified when using "
                                           f"raw_input_contents for '{tensor.name}' for model "
                                           f"'{model}'")
                if raw_index >= raw_count:
                    raise invalid_argument(f"expected tensor data for input '{tensor.name}' "
                                           f"for model '{model}': raw_input_contents has only "
                                           f"{raw_count} entries")
                item.data = raw[raw_index]
                raw_index += 1
            else:
                item.data = _contents_bytes(tensor, model)
        except ServeError as exc:
            item.fault = exc
        inputs.append(item)
    late_fault = None
    if raw_count and raw_index != raw_count:
        late_fault = invalid_argument(f"raw_input_contents has {raw_count} entries but the "
                                      f"request names {raw_index} inputs without shared memory"
                                      f" for model '{model}'")
    outputs: list[OutputIn] = []
    for requested in message.outputs:
        output = OutputIn(requested.name)
        parameters = requested.parameters
        if parameters:
            try:
                output.shm = _shm_params(parameters, f"output '{requested.name}'")
                if "classification" in parameters:
                    output.class_count = _class_count(parameters["classification"],
                                                      output.shm is not None)
            except ServeError as exc:
                output.fault = exc
        outputs.append(output)
    parameters = ({key: parameter_value(value) for key, value in message.parameters.items()}
                  if message.parameters else {})
    return RequestItems(inputs, outputs, parameters, message.id, "", late_fault)


def _shm_params(params: Any, what: str) -> ShmRef | None:
    return shm_reference(params, what, _string_param, "a string_param", _int_param,
                         "an int64_param")


def _class_count(value: Any, in_shared_memory: bool) -> int:
    """Triton's ParseClassificationParams (texts included)."""
    if value.WhichOneof("parameter_choice") != "int64_param":
        raise invalid_argument("invalid value type for 'classification' parameter, expected "
                               "int64_param")
    if value.int64_param <= 0:
        raise invalid_argument("invalid value for 'classification' parameter, expected >= 0")
    if in_shared_memory:
        raise invalid_argument("output can't set both 'shared_memory_region' and "
                               "'classification'")
    return int(value.int64_param)


def _string_param(value: Any) -> str | None:
    return value.string_param if value.WhichOneof("parameter_choice") == "string_param" \
        else None


def _int_param(value: Any) -> int | None:
    choice = value.WhichOneof("parameter_choice")
    return getattr(value, choice) if choice in ("int64_param", "uint64_param") else None


def _contents_bytes(tensor: pb.ModelInferRequest.InferInputTensor, model: str) -> bytes:
    """The typed ``contents`` of an input as tensor bytes (only raised once the datatype was
    found to be the model's)."""
    count = element_count(tensor.shape)
    datatype = tensor.datatype
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
    try:
        return np.array(values, dtype=dtype).tobytes()
    except (OverflowError, ValueError) as exc:
        raise invalid_argument(f"contents of inference input '{tensor.name}' for model "
                               f"'{model}' do not fit {datatype}: {exc}") from None


def response_parts(request: InferRequest, outputs: list[OutputTensor]
                   ) -> tuple[pb.ModelInferResponse, list[bytes]]:
    """The response metadata and, apart, the raw output contents (b"" for region outputs)."""
    return response_metadata(request, outputs), [output.data or b"" for output in outputs]


def response_metadata(request: InferRequest, outputs: list[OutputTensor]
                      ) -> pb.ModelInferResponse:
    """The response without the outputs' bytes (pending outputs stay pending)."""
    response = pb.ModelInferResponse(model_name=request.model,
                                     model_version=str(request.version), id=request.request_id)
    for output in outputs:
        tensor = response.outputs.add(name=output.name, datatype=output.datatype,
                                      shape=output.shape)
        if not output.pending and output.data is None:
            tensor.parameters["shared_memory_region"].string_param = _region_of(request,
                                                                                output.name)
            ring = request.ring
            if ring is not None and output.offset >= 0:  # in a response ring: where
                tensor.parameters["shared_memory_offset"].int64_param = \
                    output.offset - ring.region.offset
                tensor.parameters["shared_memory_byte_size"].int64_param = output.region_nbytes
    return response


_HEADS: dict[tuple[Any, ...], tuple[bytes, bytes]] = {}
_HEADS_MAX = 1024
_ID_TAG = b"\x1a"  # ModelInferResponse.id: field 3, length-delimited


def response_head(request: InferRequest, outputs: list[OutputTensor]) -> bytes:
    """``response_metadata(request, outputs).SerializeToString()``. When every output
    carries bytes (no region, no parameters: the common answer) the model's and the
    outputs' fields are serialized once per model, version, names, datatypes and shapes,
    and only the request id is encoded per answer (fields in protobuf's own order)."""
    described = []
    for output in outputs:
        if not output.pending and output.data is None:
            return bytes(response_metadata(request, outputs).SerializeToString())
        described.append((output.name, output.datatype, tuple(output.shape)))
    key = (request.model, request.version, tuple(described))
    parts = _HEADS.get(key)
    if parts is None:
        model = pb.ModelInferResponse(model_name=request.model,
                                      model_version=str(request.version))
        tensors = pb.ModelInferResponse()
        for output in outputs:
            tensors.outputs.add(name=output.name, datatype=output.datatype, shape=output.shape)
        if len(_HEADS) >= _HEADS_MAX:
            _HEADS.clear()
        parts = _HEADS[key] = (model.SerializeToString(), tensors.SerializeToString())
    request_id = request.request_id
    if not request_id:
        return parts[0] + parts[1]
    encoded = request_id.encode()
    return b"".join((parts[0], _ID_TAG, encode_varint(len(encoded)), encoded, parts[1]))


def _region_of(request: InferRequest, output: str) -> str:
    for requested in request.outputs:
        if requested.name == output and requested.region is not None:
            return requested.region.name
    return request.ring.region.name if request.ring is not None else ""
