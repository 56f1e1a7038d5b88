"""The HTTP door's inference bodies: KServe v2 JSON plus Triton's binary tensor data extension.

A request body is a JSON header, optionally followed (``Inference-Header-Content-Length``
gives the header's length) by the inputs' binary data in input order, each input naming its
size in ``parameters.binary_data_size``. Binary inputs become memoryview slices of the body
(no copy here; the dispatcher copies them once into the instance's arena). A response is a
JSON header and, for outputs sent binary, their bytes appended as they came from the worker.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from itertools import chain
from typing import Any

import numpy as np

from shmserve.daemon.errors import ServeError, invalid_argument
from shmserve.daemon.infer_request import (
    SHM_KEYS,
    OutputIn,
    RequestItems,
    ShmRef,
    TensorIn,
    config_datatype,
    shm_reference,
)
from shmserve.daemon.request import InferRequest, OutputTensor
from shmserve.protos import shmserve_model_config_pb2 as mc
from shmserve.protos.datatypes import (
    deserialize_bytes_tensor,
    element_count,
    serialize_bytes_tensor,
    to_numpy_dtype,
)
from shmserve.workers.protocol import INLINE_LIMIT
from shmserve.workers.shm import Pieces

HEADER_LENGTH = "Inference-Header-Content-Length"
# Datatypes JSON cannot carry faithfully: only as binary data (Triton's rule).
_BINARY_ONLY = frozenset({"FP16", "BF16"})
_SHM_KEYS = frozenset(SHM_KEYS)
# json.dumps(value, separators=(",", ":")), without building an encoder per call.
compact_json = json.JSONEncoder(separators=(",", ":")).encode
_BOOL_TYPES: frozenset[type] = frozenset({bool})
_INT_TYPES: frozenset[type] = frozenset({int})
_NUMBER_TYPES: frozenset[type] = frozenset({int, float})


@dataclass(slots=True)
class HttpInfer:
    """A parsed request and how its outputs are to be answered."""

    items: RequestItems
    binary_default: bool                 # request parameter binary_data_output
    binary_outputs: dict[str, bool]      # outputs' own binary_data parameter


def _json_error(message: str) -> ServeError:
    return invalid_argument(f"failed to parse the request JSON buffer: {message}")


def split_body(body: bytes | bytearray | Pieces, header_length: str | None
               ) -> tuple[Any, memoryview | Pieces]:
    """(the JSON header, the binary data after it)."""
    total = len(body)
    if header_length is None:
        size = total
    else:
        try:
            size = int(header_length)
        except ValueError:
            raise invalid_argument(f"{HEADER_LENGTH} must be an integer, got "
                                   f"'{header_length[:64]}'") from None
        if size < 0 or size > total:
            raise invalid_argument(f"{HEADER_LENGTH} is {size} but the request body has "
                                   f"{total} bytes")
    if isinstance(body, Pieces):
        head = body.slice(0, size)
        header_bytes = bytes(head) if isinstance(head, Pieces) else head.tobytes()
        binary: memoryview | Pieces = body.slice(size, total)
    else:
        view = memoryview(body)
        header_bytes = view[:size].tobytes()
        binary = view[size:]
    try:
        header = json.loads(header_bytes) if size else None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _json_error(str(exc)) from None
    if not isinstance(header, dict):
        raise _json_error("the request must be a JSON object")
    return header, binary


def _binary_slice(binary: memoryview | Pieces, start: int, stop: int
                  ) -> bytes | memoryview | Pieces:
    """An input's binary data: a view of the body, or its pieces when it spans chunks of
    it (only a small one is joined: it travels inline anyway)."""
    if isinstance(binary, memoryview):
        return binary[start:stop]
    part = binary.slice(start, stop)
    if isinstance(part, Pieces) and len(part) <= INLINE_LIMIT:
        return bytes(part)
    return part


def parse_infer(model: str, header: dict[str, Any], binary: memoryview | Pieces) -> HttpInfer:
    inputs_json = header.get("inputs")
    if not isinstance(inputs_json, list):
        raise _json_error("'inputs' must be an array")
    position = 0
    inputs: list[TensorIn] = []
    for entry in inputs_json:
        if not isinstance(entry, dict):
            raise _json_error("each input must be a JSON object")
        name, datatype, shape = _tensor_head(entry)
        params = _object(entry.get("parameters", {}), f"parameters of input '{name}'")
        item = TensorIn(name, datatype, shape)
        if not _SHM_KEYS.isdisjoint(params):
            try:
                item.shm = _shm_params(params, f"input '{name}'")
                if item.shm is not None and "data" in entry:
                    raise invalid_argument(f"unexpected 'content' provided when using shared "
                                           f"memory for input '{name}' for model '{model}'")
            except ServeError as exc:
                item.fault = exc
        size = params.get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise invalid_argument(f"'binary_data_size' of input '{name}' must be a "
                                       f"non-negative integer")
            if position + size > len(binary):
                raise invalid_argument(
                    f"unexpected end of the binary data for input '{name}' for model "
                    f"'{model}': it declares {size} bytes at offset {position} but only "
                    f"{len(binary)} bytes of binary data were sent")
            item.data = _binary_slice(binary, position, position + size)
            position += size
        elif item.shm is None and item.fault is None:
            if "data" not in entry:
                item.fault = invalid_argument(f"expected tensor data for input '{name}' for "
                                              f"model '{model}'")
            else:
                try:
                    item.data = json_tensor_bytes(name, datatype, shape, entry["data"], model)
                except ServeError as exc:
                    item.fault = exc
        inputs.append(item)
    if position != len(binary):
        raise invalid_argument(f"the request body has {len(binary) - position} bytes of binary "
                               f"data past what its inputs declare for model '{model}'")
    outputs: list[OutputIn] = []
    binary_outputs: dict[str, bool] = {}
    outputs_json = header.get("outputs", [])
    if not isinstance(outputs_json, list):
        raise _json_error("'outputs' must be an array")
    for entry in outputs_json:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise _json_error("each output must be a JSON object with a 'name'")
        output = OutputIn(entry["name"])
        params = _object(entry.get("parameters", {}), f"parameters of output '{output.name}'")
        if params:
            try:
                if not _SHM_KEYS.isdisjoint(params):
                    output.shm = _shm_params(params, f"output '{output.name}'")
                if "classification" in params:
                    output.class_count = _class_count(params["classification"],
                                                      output.shm is not None)
            except ServeError as exc:
                output.fault = exc
        if "binary_data" in params:
            binary_outputs[output.name] = bool(params["binary_data"])
        outputs.append(output)
    parameters = dict(_object(header.get("parameters", {}), "request parameters"))
    binary_default = bool(parameters.pop("binary_data_output", False))
    for key, value in parameters.items():
        # What InferParameter can hold over gRPC: the model sees the same either way.
        if not isinstance(value, bool | int | float | str):
            raise invalid_argument(f"request parameter '{key}' must be a boolean, number or "
                                   f"string")
    request_id = header.get("id", "")
    if not isinstance(request_id, str):
        raise _json_error("'id' must be a string")
    return HttpInfer(RequestItems(inputs, outputs, parameters, request_id, ""),
                     binary_default, binary_outputs)


def _tensor_head(entry: dict[str, Any]) -> tuple[str, str, list[int]]:
    name, datatype, shape = entry.get("name"), entry.get("datatype"), entry.get("shape")
    if not isinstance(name, str):
        raise _json_error("each input needs a string 'name'")
    if not isinstance(datatype, str):
        raise _json_error(f"input '{name}' needs a string 'datatype'")
    if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise _json_error(f"input '{name}' needs a 'shape' array of integers")
    return name, datatype, shape


def _object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _json_error(f"{what} must be a JSON object")
    return value


def _shm_params(params: dict[str, Any], what: str) -> ShmRef | None:
    """The same rules and texts as the gRPC door's."""
    return shm_reference(params, what, _json_string, "a string", _json_int, "an integer")


def _class_count(value: Any, in_shared_memory: bool) -> int:
    """Triton's checks of an output's "classification" (0: none)."""
    if in_shared_memory:
        raise invalid_argument("Output can't set both 'shared_memory_region' and "
                               "'classification'")
    count = _json_int(value)
    if count is None or count < 0:
        raise invalid_argument("Unable to set 'classification': expected an unsigned integer")
    return count


def _json_string(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _json_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _flatten(data: Any) -> tuple[list[Any], set[type]]:
    """``data`` (a value, or arrays nested to any depth) as a flat list in depth-first order,
    and the set of its values' types. json.loads makes exact ints, floats, bools, strings
    (never subclasses), so the set says in C what an isinstance test per value would."""
    values = data if isinstance(data, list) else [data]
    types = set(map(type, values))
    while list in types:
        if len(types) == 1:  # all arrays: one level less
            values = list(chain.from_iterable(values))
        else:
            values = _walk(values)
        types = set(map(type, values))
    return values, types


def _walk(data: list[Any]) -> list[Any]:
    """Arrays nested unevenly, flattened depth first."""
    flat: list[Any] = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            flat.append(item)
        else:
            stack.pop()
    return flat


def json_tensor_bytes(name: str, datatype: str, shape: list[int], data: Any,
                      model: str) -> bytes:
    """An input's JSON ``data`` (nested or flat) as tensor bytes."""
    if datatype in _BINARY_ONLY:
        raise invalid_argument(f"input '{name}' of datatype {datatype} must be sent as binary "
                               f"data (binary_data_size) for model '{model}'")
    values, types = _flatten(data)
    count = element_count(shape)
    if len(values) != count:
        raise invalid_argument(f"unexpected number of elements {len(values)} in 'data' for "
                               f"inference input '{name}' for model '{model}', expecting "
                               f"{count}")
    if datatype == "BYTES":
        if not types <= {str}:
            raise invalid_argument(f"'data' of BYTES input '{name}' for model '{model}' must "
                                   f"be strings")
        return serialize_bytes_tensor(np.array([v.encode() for v in values], dtype=object))
    try:
        dtype = to_numpy_dtype(datatype)
    except (KeyError, ValueError):
        raise invalid_argument(f"input '{name}' has unknown datatype '{datatype}' for model "
                               f"'{model}'") from None
    allowed = _BOOL_TYPES if datatype == "BOOL" else _INT_TYPES if dtype.kind in "iu" \
        else _NUMBER_TYPES
    if not types <= allowed:
        raise invalid_argument(f"'data' of input '{name}' for model '{model}' holds values "
                               f"that are not {datatype}")
    try:
        return np.array(values, dtype=dtype).tobytes()
    except (OverflowError, ValueError, TypeError) as exc:
        raise invalid_argument(f"'data' of input '{name}' for model '{model}' does not fit "
                               f"{datatype}: {exc}") from None


def render_response(request: InferRequest, outputs: list[OutputTensor],
                    binary_for: Callable[[str, str], bool]
                    ) -> tuple[bytes, list[bytes | memoryview]]:
    """(JSON header, binary parts): outputs sent binary are appended as they are.

    The header is what ``json.dumps(..., separators=(",", ":"))`` writes for
    ``{"model_name", "model_version", "outputs": [{"name", "datatype", "shape",
    ["parameters" | "data"]}...], "id"}``, joined from fragments cached per model version and
    per output name and datatype: only the shape, sizes and data are encoded per request."""
    parts: list[bytes | memoryview] = []
    pieces = [_answer_prefix(request.model, request.version)]
    for output in outputs:
        if len(pieces) > 1:
            pieces.append(",")
        pieces.append(_output_prefix(output.name, output.datatype))
        pieces.append(",".join(map(str, output.shape)))
        data = output.data
        if data is None:
            # Written to the client's region: name, datatype and shape only, as Triton answers.
            # (Triton's C++ client, perf_analyzer's, fails on an output whose "parameters"
            # lack binary_data_size.)
            pieces.append("]}")
        elif binary_for(output.name, output.datatype):
            pieces.append(f'],"parameters":{{"binary_data_size":{len(data)}}}}}')
            parts.append(data)
        else:
            pieces.append('],"data":')
            pieces.append(compact_json(_json_data(output)))
            pieces.append("}")
    pieces.append("]")
    if request.request_id:
        pieces.append(',"id":')
        pieces.append(json.dumps(request.request_id))
    pieces.append("}")
    return "".join(pieces).encode(), parts


# JSON fragments of response headers, by model version and by output (name, datatype):
# the same few for every response of a model, so encoded once. Bounded: cleared when full.
_FRAGMENTS_LIMIT = 4096
_answer_prefixes: dict[tuple[str, int], str] = {}
_output_prefixes: dict[tuple[str, str], str] = {}


def _answer_prefix(model: str, version: int) -> str:
    key = (model, version)
    prefix = _answer_prefixes.get(key)
    if prefix is None:
        if len(_answer_prefixes) >= _FRAGMENTS_LIMIT:
            _answer_prefixes.clear()
        prefix = _answer_prefixes[key] = (f'{{"model_name":{json.dumps(model)},'
                                          f'"model_version":{json.dumps(str(version))},'
                                          f'"outputs":[')
    return prefix


def _output_prefix(name: str, datatype: str) -> str:
    key = (name, datatype)
    prefix = _output_prefixes.get(key)
    if prefix is None:
        if len(_output_prefixes) >= _FRAGMENTS_LIMIT:
            _output_prefixes.clear()
        prefix = _output_prefixes[key] = (f'{{"name":{json.dumps(name)},'
                                          f'"datatype":{json.dumps(datatype)},"shape":[')
    return prefix


def binary_rule(parsed: HttpInfer) -> Callable[[str, str], bool]:
    def binary_for(name: str, datatype: str) -> bool:
        if datatype in _BINARY_ONLY:
            return True
        return parsed.binary_outputs.get(name, parsed.binary_default)

    return binary_for


def _json_data(output: OutputTensor) -> list[Any]:
    assert output.data is not None
    if output.datatype == "BYTES":
        items = deserialize_bytes_tensor(output.data, element_count(output.shape))
        return [bytes(item).decode("utf-8", errors="replace") for item in items]
    values: list[Any] = np.frombuffer(output.data, dtype=to_numpy_dtype(output.datatype)
                                      ).tolist()
    return values


# --- Triton's generate extension (POST /v2/models/{m}/generate) ------------------------------

def parse_generate(model: str, body: dict[str, Any], config: mc.ModelConfig) -> RequestItems:
    """Top-level keys named like the model's inputs are the inputs (a scalar or a flat or
    nested array, shape taken from it, a batch of 1 prepended for a batching model); every
    other key, and the members of "parameters", is a request parameter."""
    inputs: list[TensorIn] = []
    names = set()
    for tensor in config.input:
        names.add(tensor.name)
        if tensor.name not in body:
            continue  # a missing required input is the core's to report
        value = body[tensor.name]
        shape = _generate_shape(value)
        if config.max_batch_size > 0:
            shape = [1, *shape]
        item = TensorIn(tensor.name, config_datatype(tensor.data_type), shape)
        item.data = json_tensor_bytes(tensor.name, item.datatype, shape, value, model)
        inputs.append(item)
    parameters = dict(_object(body.get("parameters", {}), "'parameters'"))
    for key, value in body.items():
        if key not in names and key not in ("parameters", "id"):
            parameters[key] = value
    for key, value in parameters.items():
        if not isinstance(value, bool | int | float | str):
            raise invalid_argument(f"request parameter '{key}' must be a boolean, number or "
                                   f"string")
    request_id = body.get("id", "")
    return RequestItems(inputs, [], parameters, request_id if isinstance(request_id, str)
                        else "", "")


def _generate_shape(value: Any) -> list[int]:
    shape: list[int] = []
    while isinstance(value, list):
        shape.append(len(value))
        value = value[0] if value else None
    return shape or [1]


def render_generate(request: InferRequest, outputs: list[OutputTensor]) -> bytes:
    """Each output under its own name: a single element as a scalar, else a flat array."""
    answer: dict[str, Any] = {"model_name": request.model,
                              "model_version": str(request.version)}
    if request.request_id:
        answer["id"] = request.request_id
    for output in outputs:
        values = _json_data(output) if output.data is not None else []
        answer[output.name] = values[0] if len(values) == 1 else values
    return compact_json(answer).encode()
