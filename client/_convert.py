"""NumPy inputs -> ModelInferRequest bytes, and ModelInferResponse -> NumPy outputs."""

from __future__ import annotations

import math
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
    ELEMENT_SIZE,
    deserialize_bytes_tensor,
    from_numpy_dtype,
    serialize_bytes_tensor,
    to_numpy_dtype,
)
from shmserve.protos.parameters import ParameterValue, set_region_parameters
from shmserve.protos.parameters import set_parameter as protocol_set_parameter

#: Finds the region holding ``nbytes`` at ``address``: (region name, offset) or None.
Locator = Callable[[int, int], "tuple[str, int] | None"]

#: What ``infer`` accepts as an input value.
InputValue = np.ndarray | BytesTensor
#: What ``infer`` accepts as ``outputs``.
Outputs = Sequence[str] | Mapping[str, "np.ndarray | None"] | None
#: Request-level parameters.


@dataclass(slots=True)
class PreparedRequest:
    """A serialized ModelInferRequest and what is needed to read its answer."""

    payload: bytes
    region_outputs: dict[str, np.ndarray] = field(default_factory=dict)
    request_id: str = ""


def set_parameter(target: pb.InferParameter, value: ParameterValue) -> None:
    try:
        protocol_set_parameter(target, value)
    except TypeError as exc:
        raise invalid_argument(str(exc)) from None


_DATATYPES: dict[np.dtype, str] = {}
#: The numeric datatypes and their (native byte order) NumPy dtypes: the common case, whose
#: tensors are plain bytes.
_NUMBER_DTYPES: dict[str, np.dtype] = {name: to_numpy_dtype(name) for name in ELEMENT_SIZE
                                       if name != "BF16"}
_NUMBER_DATATYPES: dict[np.dtype, str] = {dtype: name for name, dtype in _NUMBER_DTYPES.items()}
#: Inputs up to this size are copied (tobytes) rather than viewed: cheaper when small.
_SMALL_INPUT = 4096


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


#: A tensor reference: (region name, offset, byte size).
Reference = tuple[str, int, int]
#: One input as the client will send it: (name, datatype, shape, reference or None, bytes or
#: None); exactly one of the last two is set.
InputEntry = tuple[str, str, tuple[int, ...], "Reference | None", "Buffer | None"]
#: One requested output: (name, reference into a region or None for bytes).
OutputEntry = tuple[str, "Reference | None"]


def walk_inputs(inputs: Mapping[str, InputValue], locate: Locator | None) -> list[InputEntry]:
    """Each input as a region reference (when it lies in a registered region) or bytes."""
    entries: list[InputEntry] = []
    for name, value in inputs.items():
        if type(value) is np.ndarray and locate is None:
            datatype = _NUMBER_DATATYPES.get(value.dtype)
            if datatype is not None and value.nbytes <= _SMALL_INPUT:  # the common case
                entries.append((name, datatype, value.shape, None, value.tobytes()))  # C order
                continue
        entries.append(_input_entry(name, value, locate))
    return entries


def _input_entry(name: str, value: InputValue, locate: Locator | None) -> InputEntry:
    if type(value) is BytesTensor:
        where = _find(value.data, locate)
        if where is not None:
            return name, "BYTES", value.shape, (where[0], where[1], value.nbytes), None
        return name, "BYTES", value.shape, None, value.data.data
    array = value if type(value) is np.ndarray else np.asarray(value)
    datatype = datatype_of(array.dtype, name)
    if datatype == "BYTES":
        return name, datatype, array.shape, None, serialize_bytes_tensor(array)
    where = _find(array, locate)
    if where is not None:
        return name, datatype, array.shape, (where[0], where[1], array.nbytes), None
    return name, datatype, array.shape, None, _as_bytes(array)


def walk_outputs(outputs: Outputs, locate: Locator | None
                 ) -> tuple[list[OutputEntry], dict[str, np.ndarray]]:
    """The requested outputs, and the region arrays the server is to write into."""
    entries: list[OutputEntry] = []
    region_outputs: dict[str, np.ndarray] = {}
    if outputs is None:
        return entries, region_outputs
    if isinstance(outputs, str):
        raise invalid_argument("outputs must be a list of names or a dict, not a string")
    items = outputs.items() if isinstance(outputs, Mapping) else ((n, None) for n in outputs)
    for name, target in items:
        if target is None:
            entries.append((name, None))
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
        entries.append((name, (where[0], where[1], target.nbytes)))
        region_outputs[name] = target
    return entries, region_outputs


def check_parameter(value: ParameterValue) -> ParameterValue:
    """``value`` if it can be a request parameter, else the INVALID_ARGUMENT ``set_parameter``
    raises."""
    if isinstance(value, bool | int | float | str):
        return value
    set_parameter(pb.InferParameter(), value)  # raises
    return value


def prepare_infer(model: str, inputs: Mapping[str, InputValue], outputs: Outputs,
                  version: str, request_id: str,
                  parameters: Mapping[str, ParameterValue] | None,
                  locate: Locator | None) -> PreparedRequest:
    """Serialize a request; inputs found in a registered region go as references."""
    request = pb.ModelInferRequest(model_name=model, model_version=version, id=request_id)
    raw: list[Buffer] = []
    for name, datatype, shape, ref, data in walk_inputs(inputs, locate):
        tensor = request.inputs.add()
        tensor.name = name
        tensor.datatype = datatype
        tensor.shape.extend(shape)
        if ref is not None:
            set_region_parameters(tensor.parameters, ref[0], ref[1], ref[2])
        else:
            assert data is not None
            raw.append(data)
    entries, region_outputs = walk_outputs(outputs, locate)
    for name, ref in entries:
        requested = request.outputs.add()
        requested.name = name
        if ref is not None:
            set_region_parameters(requested.parameters, ref[0], ref[1], ref[2])
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


def read_reply_outputs(outputs: Sequence[Sequence[Any]],
                       region_outputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Outputs of a local-channel reply (``[name, datatype, shape, bytes or None]`` each)."""
    result: dict[str, np.ndarray] = {}
    for name, datatype, dims, data in outputs:
        dtype = _NUMBER_DTYPES.get(datatype)
        if dtype is not None and data is not None and not region_outputs \
                and len(data) == math.prod(dims) * dtype.itemsize:  # the common case
            result[name] = np.ndarray(dims, dtype, data)  # a read-only view of the reply
            continue
        shape = tuple(dims)
        target = region_outputs.get(name)
        if target is not None:
            result[name] = _region_output(name, target, datatype, shape)
        else:
            result[name] = _payload_output(name, data if data is not None else b"", datatype,
                                           shape)
    return result
