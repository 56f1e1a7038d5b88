"""KServe v2 datatypes <-> NumPy, and the BYTES wire codec (uint32 LE length + bytes)."""

from __future__ import annotations

import struct
from collections.abc import Iterable

import numpy as np

_V2_TO_NUMPY: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(np.object_),
}

ELEMENT_SIZE: dict[str, int] = {
    "BOOL": 1, "UINT8": 1, "UINT16": 2, "UINT32": 4, "UINT64": 8,
    "INT8": 1, "INT16": 2, "INT32": 4, "INT64": 8,
    "FP16": 2, "FP32": 4, "FP64": 8, "BF16": 2,
}

# Config enum (TYPE_FP32) <-> wire name (FP32). TYPE_STRING travels as BYTES.
CONFIG_TO_V2: dict[str, str] = {f"TYPE_{name}": name for name in ELEMENT_SIZE}
CONFIG_TO_V2["TYPE_STRING"] = "BYTES"


def bf16_dtype() -> np.dtype:
    """BF16 has no NumPy type: ml_dtypes.bfloat16 when installed, else raw uint16 elements."""
    try:
        import ml_dtypes
    except ImportError:
        return np.dtype(np.uint16)
    return np.dtype(ml_dtypes.bfloat16)


def to_numpy_dtype(datatype: str) -> np.dtype:
    if datatype == "BF16":
        return bf16_dtype()
    try:
        return _V2_TO_NUMPY[datatype]
    except KeyError:
        raise ValueError(f"unknown datatype '{datatype}'") from None


def from_numpy_dtype(dtype: np.dtype) -> str:
    dtype = np.dtype(dtype)
    if dtype.kind in "OSU":
        return "BYTES"
    if dtype.name == "bfloat16":
        return "BF16"
    for name, candidate in _V2_TO_NUMPY.items():
        if candidate == dtype:
            return name
    raise ValueError(f"NumPy dtype {dtype} has no KServe v2 datatype")


def element_count(shape: Iterable[int]) -> int:
    count = 1
    for dim in shape:
        count *= int(dim)
    return count


def serialize_bytes_tensor(array: np.ndarray) -> bytes:
    """Flatten (C order) an array of bytes/str into the length-prefixed BYTES layout."""
    parts: list[bytes] = []
    for item in np.asarray(array, dtype=object).reshape(-1):
        data = item.encode("utf-8") if isinstance(item, str) else bytes(item)
        parts.append(struct.pack("<I", len(data)))
        parts.append(data)
    return b"".join(parts)


#: Most elements one BYTES tensor may hold (a zero-length element costs 4 bytes: 64 MiB).
MAX_BYTES_ELEMENTS = 1 << 24
_U32 = struct.Struct("<I")


def deserialize_bytes_tensor(buffer: bytes | memoryview | np.ndarray,
                             count: int | None = None) -> np.ndarray:
    """Parse the BYTES layout into a 1-D object array; raises ValueError on malformed input.

    With ``count`` the buffer must hold exactly that many elements.
    """
    # ndarray.data: the same view; numpy's stubs give ndarray the buffer protocol on 3.12+ only.
    data = buffer if isinstance(buffer, bytes) else memoryview(
        buffer.data if isinstance(buffer, np.ndarray) else buffer).cast("B")
    total = len(data)
    unpack = _U32.unpack_from
    items: list[bytes] = []
    append = items.append
    pos = 0
    while pos < total:
        if pos + 4 > total:
            raise ValueError("truncated length prefix")
        end = pos + 4 + unpack(data, pos)[0]
        if end > total:
            raise ValueError("element length exceeds the buffer")
        append(bytes(data[pos + 4:end]))
        pos = end
        if count is not None and len(items) > count:
            raise ValueError(f"expected {count} elements, found more")
    if count is not None and len(items) != count:
        raise ValueError(f"expected {count} elements, found {len(items)}")
    out = np.empty(len(items), dtype=object)
    out[:] = items
    return out
