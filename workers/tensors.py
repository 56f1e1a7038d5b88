"""Turning tensor references into NumPy arrays (inputs) and arrays into bytes (outputs)."""

from __future__ import annotations

from typing import Any

import numpy as np
import posix_ipc

from shmserve.protos.datatypes import (
    deserialize_bytes_tensor,
    element_count,
    from_numpy_dtype,
    serialize_bytes_tensor,
    to_numpy_dtype,
)
from shmserve.workers.backend import BackendError
from shmserve.workers.cuda_ipc import (
    CudaRegions,
    DeviceOutput,
    datatype_of_torch,
    device_output,
    host_array,
)
from shmserve.workers.protocol import ARENA, CUDA, INLINE, SYSTEM, TensorRef
from shmserve.workers.shm import ReaderMapping, Segment, SegmentCache


def map_region(regions: SegmentCache, region_id: int, key: str) -> Segment:
    """The worker's mapping of a client region. A segment the client unlinked (or shrank to
    nothing) before this worker first mapped it is the request's error, never the worker's."""
    try:
        return regions.get(region_id, key)
    except (OSError, ValueError, posix_ipc.Error) as exc:
        raise BackendError(f"Unable to open shared memory region: '{key}': {exc}",
                           "INTERNAL") from None


class InputResolver:
    """Maps input references to arrays. Fixed-size tensors in shared memory are views (no copy)."""

    def __init__(self, regions: SegmentCache, input_arena: ReaderMapping,
                 cuda: CudaRegions | None = None) -> None:
        self._regions = regions
        self._input_arena = input_arena
        self._cuda = cuda

    def buffer(self, ref: TensorRef) -> memoryview | bytes:
        if ref.where == INLINE:
            return ref.location
        if ref.where == ARENA:
            segment = self._input_arena.view(ref.location)
        elif ref.where == SYSTEM:
            region_id, key = ref.location
            segment = map_region(self._regions, region_id, key)
        elif ref.where == CUDA:
            raise BackendError("CUDA shared memory inputs are not supported by this worker",
                               "UNIMPLEMENTED")
        else:
            raise BackendError(f"unknown tensor location '{ref.where}'")
        if ref.offset < 0 or ref.nbytes < 0 or ref.offset + ref.nbytes > segment.size:
            raise BackendError(f"input '{ref.name}' lies outside its shared memory segment",
                               "INVALID_ARGUMENT")
        return segment.buf[ref.offset:ref.offset + ref.nbytes]

    def array(self, ref: TensorRef) -> Any:
        """A NumPy array; for a CUDA region a torch CUDA tensor over the client's memory."""
        where = ref.where
        if where == INLINE:
            data: memoryview | bytes = ref.location
        elif where == CUDA and self._cuda is not None:
            return self._cuda.input(ref)
        else:
            data = self.buffer(ref)
        datatype = ref.datatype
        if datatype == "BYTES":
            try:
                flat = deserialize_bytes_tensor(data, element_count(ref.shape))
            except ValueError as exc:
                raise BackendError(
                    f"malformed BYTES data for inference input '{ref.name}': {exc}",
                    "INVALID_ARGUMENT"
                ) from exc
            return flat.reshape(ref.shape)
        dtype = _NUMPY_DTYPES.get(datatype)
        if dtype is None:
            dtype = _NUMPY_DTYPES[datatype] = to_numpy_dtype(datatype)
        try:
            # Views the buffer (no copy); extra bytes past the shape are ignored.
            return np.ndarray(ref.shape, dtype, data)
        except (TypeError, ValueError) as exc:
            raise BackendError(
                f"input '{ref.name}': {len(data)} bytes do not hold a {datatype} tensor of "
                f"shape {list(ref.shape)}: {exc}", "INVALID_ARGUMENT") from None


# Caches by key of to_numpy_dtype / from_numpy_dtype, which are too slow for once per tensor.
_NUMPY_DTYPES: dict[str, np.dtype] = {}
_DATATYPES: dict[np.dtype, str] = {}


def output_bytes(array: Any) -> tuple[str, list[int], memoryview | bytes | DeviceOutput]:
    """(datatype, shape, bytes) of a backend's output.

    A torch CUDA tensor stays on its GPU as a :class:`DeviceOutput` (``len`` is its byte
    size): it is copied once when written -- device-to-host into shared memory, or
    device-to-device into a CUDA region. CPU torch tensors are viewed without a copy.
    """
    if not isinstance(array, np.ndarray):
        on_device = device_output(array)
        if on_device is not None:
            return (datatype_of_torch(on_device.tensor.dtype),
                    [int(d) for d in on_device.tensor.shape], on_device)
        array = host_array(array)
    dtype = array.dtype
    datatype = _DATATYPES.get(dtype)
    if datatype is None:
        datatype = from_numpy_dtype(dtype)
        if dtype.kind not in "SU":      # one dtype per string length: do not let the cache grow
            _DATATYPES[dtype] = datatype
    shape = list(array.shape)
    if datatype == "BYTES":
        return datatype, shape, serialize_bytes_tensor(array)
    contiguous = np.ascontiguousarray(array)
    try:
        return datatype, shape, contiguous.data.cast("B")
    except (TypeError, ValueError):
        # Empty arrays (memoryview cannot cast zero-length shapes) and dtypes the buffer
        # protocol cannot describe (ml_dtypes.bfloat16) are viewed as raw bytes instead.
        return datatype, shape, contiguous.reshape(-1).view(np.uint8).data
