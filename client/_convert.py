"""NumPy inputs -> ModelInferRequest bytes, and ModelInferResponse -> NumPy outputs."""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np

from shmserve.client._wire import Buffer, encode_infer_request
from shmserve.client.errors import ShmserveError, invalid_argument
from shmserve.client.regions import BytesTensor, array_address
from shmserve.protos import shmserve_service_pb2 as pb
from shmserve.protos.datatypes import (
    deserialize_bytes_tensor,
    from_numpy_dtype,
    serialize_bytes_tensor,
    to_numpy_dtype,
)

#: Finds the region holding ``nbytes`` at ``address``: (region name, offset) or None.
Locator = Callable[[int, int], "tuple[str, int] | None"]

#: What ``infer`` accepts as an input value.
InputValue = np.ndarray | BytesTensor
#: What ``infer`` accepts as ``outputs``.
Outputs = Sequence[str] | Mapping[str, "np.ndarray | None"] | None
#: Request-level parameters.
ParameterValue = bool | int | float | str | bytes


@dataclass(slots=True)
class PreparedRequest:
    """A serialized ModelInferRequest and what is needed to read its answer."""

    payload: bytes
    region_outputs: dict[str, np.ndarray] = field(default_factory=dict)
    request_id: str = ""


def set_parameter(target: pb.InferParameter, value: ParameterValue) -> None:
    if isinstance(value, bool):
        target.bool_param = value
    elif isinstance(value, int):
        target.int64_param = value
    elif isinstance(value, float):
        target.double_param = value
    elif isinstance(value, str):
        target.string_param = value
    elif isinstance(value, bytes):
        target.bytes_param = value
    else:
        raise invalid_argument(f"unsupported parameter value {value!r} "
                               f"(use bool, int, float, str or bytes)")


def parameter_value(param: pb.InferParameter) -> ParameterValue | None:
    choice = param.WhichOneof("parameter_choice")
    if choice is None:
        return None
    value: ParameterValue = getattr(param, choice)
    return value


def _set_region(params: Any, region: str, offset: int, nbytes: int) -> None:
    """Fill a tensor's parameters map with a region reference (offset omitted when 0)."""
    params["shared_memory_region"].string_param = region
    params["shared_memory_byte_size"].int64_param = nbytes
    if offset:
        params["shared_memory_offset"].int64_param = offset


_DATATYPES: dict[np.dtype, str] = {}


def datatype_of(dtype: np.dtype, name: str) -> str:
    """The KServe v2 datatype of a NumPy dtype (cached: this runs for every input)."""
    try:
        return _DATATYPES[dtype]
    except KeyError:
        pass
    try:
        datatype = from_numpy_dtype(dtype)
    except ValueError as exc:
        raise invalid_argument(f"input '{name}': {exc}") from None
    if len(_DATATYPES) < 256:
        _DATATYPES[dtype] = datatype
    return datatype


def _as_bytes(array: np.ndarray) -> memoryview:
    """A byte buffer of an array's data (a copy only when it is not C-contiguous)."""
    if array.flags.c_contiguous and array.dtype.isbuiltin:
        return array.data
    return np.ascontiguousarray(array).reshape(-1).view(np.uint8).data


def _find(array: np.ndarray, locate: Locator | None) -> tuple[str, int] | None:
    """The region holding all of a C-contiguous, non-empty array, or None."""
    if locate is None or not array.flags.c_contiguous or array.nbytes == 0:
        return None
    return locate(array_address(array), array.nbytes)


def prepare_infer(model: str, inputs: Mapping[str, InputValue], outputs: Outputs,
                  version: str, request_id: str,
                  parameters: Mapping[str, ParameterValue] | None,
                  locate: Locator | None) -> PreparedRequest:
    """Serialize a request; inputs found in a registered region go as references."""
    request = pb.ModelInferRequest(model_name=model, model_version=version, id=request_id)
    raw: list[Buffer] = []
    for name, value in inputs.items():
        tensor = request.inputs.add()
        tensor.name = name
        if type(value) is BytesTensor:
            tensor.datatype = "BYTES"
            tensor.shape.extend(value.shape)
            where = _find(value.data, locate)
            if where is not None:
                _set_region(tensor.parameters, where[0], where[1], value.nbytes)
            else:
                raw.append(value.data.data)
            continue
        array = value if type(value) is np.ndarray else np.asarray(value)
        datatype = datatype_of(array.dtype, name)
        tensor.datatype = datatype
        tensor.shape.extend(array.shape)
        if datatype == "BYTES":
            raw.append(serialize_bytes_tensor(array))
            continue
        where = _find(array, locate)
        if where is not None:
            _set_region(tensor.parameters, where[0], where[1], array.nbytes)
        else:
            raw.append(_as_bytes(array))
    region_outputs: dict[str, np.ndarray] = {}
    if outputs is not None:
        if isinstance(outputs, str):
            raise invalid_argument("outputs must be a list of names or a dict, not a string")
        items = outputs.items() if isinstance(outputs, Mapping) else ((n, None) for n in outputs)
        for name, target in items:
            requested = request.outputs.add()
            requested.name = name
            if target is None:
                continue
            if not isinstance(target, np.ndarray):
                raise invalid_argument(f"output '{name}': expected a NumPy array in a "
                                       f"shared-memory region or None, got "
                                       f"{type(target).__name__}")
            if not target.flags.writeable:
                raise invalid_argument(f"output '{name}': the array is read-only")
            where = _find(target, locate)
            if where is None:
                raise invalid_argument(
                    f"output '{name}': the array is not a C-contiguous view into one of this "
                    f"client's registered shared-memory regions (allocate it with "
                    f"region.ndarray(...))")
            _set_region(requested.parameters, where[0], where[1], target.nbytes)
            region_outputs[name] = target
    if parameters:
        for key, param in parameters.items():
            set_parameter(request.parameters[key], param)
    return PreparedRequest(encode_infer_request(request, raw), region_outputs, request_id)


def _count(shape: Sequence[int]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def _decode_bytes_prefix(buffer: np.ndarray, count: int) -> np.ndarray:
    """The first ``count`` length-prefixed elements of a buffer that may have spare bytes."""
    view = _as_bytes(buffer)
    items: list[bytes] = []
    pos = 0
    for _ in range(count):
        if pos + 4 > len(view):
            raise ShmserveError(grpc.StatusCode.INTERNAL, "BYTES output in shared memory is "
                                                          "truncated")
        (length,) = struct.unpack_from("<I", view, pos)
        pos += 4
        if pos + length > len(view):
            raise ShmserveError(grpc.StatusCode.INTERNAL, "BYTES output in shared memory is "
                                                          "truncated")
        items.append(bytes(view[pos:pos + length]))
        pos += length
    out = np.empty(count, dtype=object)
    out[:] = items
    return out


def _region_output(name: str, target: np.ndarray, datatype: str,
                   shape: tuple[int, ...]) -> np.ndarray:
    count = _count(shape)
    if datatype == "BYTES":
        return _decode_bytes_prefix(target, count).reshape(shape)
    dtype = to_numpy_dtype(datatype)
    if target.dtype == dtype and target.shape == shape:
        return target
    nbytes = count * dtype.itemsize
    if nbytes > target.nbytes:
        raise ShmserveError(grpc.StatusCode.INTERNAL,
                            f"output '{name}' ({nbytes} bytes) does not fit the "
                            f"{target.nbytes}-byte array given for it")
    return target.reshape(-1).view(np.uint8)[:nbytes].view(dtype).reshape(shape)


def _payload_output(name: str, data: memoryview | bytes, datatype: str,
                    shape: tuple[int, ...]) -> np.ndarray:
    count = _count(shape)
    if datatype == "BYTES":
        try:
            return deserialize_bytes_tensor(data, count).reshape(shape)
        except ValueError as exc:
            raise ShmserveError(grpc.StatusCode.INTERNAL,
                                f"malformed BYTES output '{name}': {exc}") from None
    try:
        dtype = to_numpy_dtype(datatype)
    except ValueError as exc:
        raise ShmserveError(grpc.StatusCode.INTERNAL, f"output '{name}': {exc}") from None
    if len(data) != count * dtype.itemsize:
        raise ShmserveError(grpc.StatusCode.INTERNAL,
                            f"output '{name}' has {len(data)} bytes, expected "
                            f"{count * dtype.itemsize} for {datatype}{list(shape)}")
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def read_outputs(header: pb.ModelInferResponse, raw: Sequence[memoryview],
                 region_outputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Outputs by name: views of the response bytes, or the caller's region arrays."""
    result: dict[str, np.ndarray] = {}
    for index, output in enumerate(header.outputs):
        shape = tuple(output.shape)
        target = region_outputs.get(output.name)
        if target is not None:
            result[output.name] = _region_output(output.name, target, output.datatype, shape)
        else:
            data = raw[index] if index < len(raw) else b""
            result[output.name] = _payload_output(output.name, data, output.datatype, shape)
    return result
