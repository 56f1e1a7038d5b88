"""shmserve's ``triton_python_backend_utils``: the ``pb_utils`` surface Triton model.py files use.

User code imports this module as ``import triton_python_backend_utils as pb_utils``; the python
backend registers it in ``sys.modules`` under that name before it imports a model. Everything is
written against Triton's python_backend README: names, argument order and behaviour match where
shmserve supports the feature, and the rest (BLS) raises a clear error.

Tensors hold the arrays they are given: an input's ``as_numpy()`` is the very array the worker
mapped from shared memory (no copy). Torch is never imported here unless a model hands us a torch
tensor or a non-CPU DLPack capsule.
"""

from __future__ import annotations

import ctypes
import importlib
import json
import logging
import threading
from collections.abc import Iterable, Mapping, Sequence
from enum import IntEnum
from typing import Any, ClassVar

import numpy as np

from shmserve.protos import datatypes as _dt
from shmserve.workers.backend import MODEL_LOGGER

from .custom_metrics import Metric, MetricFamily

__all__ = [
    "TRITONSERVER_MEMORY_CPU",
    "TRITONSERVER_MEMORY_GPU",
    "TRITONSERVER_REQUEST_FLAG_SEQUENCE_END",
    "TRITONSERVER_REQUEST_FLAG_SEQUENCE_START",
    "TRITONSERVER_REQUEST_RELEASE_ALL",
    "TRITONSERVER_REQUEST_RELEASE_RESCHEDULE",
    "TRITONSERVER_RESPONSE_COMPLETE_FINAL",
    "TRITON_STRING_TO_NUMPY",
    "InferenceRequest",
    "InferenceResponse",
    "InferenceResponseSender",
    "InferenceTrace",
    "LogLevel",
    "Logger",
    "MemoryType",
    "Metric",
    "MetricFamily",
    "ModelConfig",
    "PreferredMemory",
    "ResponseIterator",
    "Tensor",
    "TritonError",
    "TritonModelException",
    "deserialize_bytes_tensor",
    "get_input_config_by_name",
    "get_input_tensor_by_name",
    "get_output_config_by_name",
    "get_output_tensor_by_name",
    "is_model_ready",
    "load_model",
    "numpy_to_triton_type",
    "serialize_byte_tensor",
    "triton_string_to_numpy",
    "triton_to_numpy_type",
    "unload_model",
    "using_decoupled_model_transaction_policy",
]

_log = logging.getLogger(MODEL_LOGGER)

# Request flags (tritonserver.h TRITONSERVER_RequestFlag) and response flags.
TRITONSERVER_REQUEST_FLAG_SEQUENCE_START = 1
TRITONSERVER_REQUEST_FLAG_SEQUENCE_END = 2
TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1
# Request release flags (TRITONSERVER_RequestReleaseFlag): RESCHEDULE hands a request back to
# an iterative_sequence model's sequence batcher for another execution.
TRITONSERVER_REQUEST_RELEASE_ALL = 1
TRITONSERVER_REQUEST_RELEASE_RESCHEDULE = 2

# Request parameters that carry protocol state rather than user parameters; Triton's core consumes
# them before the backend sees the request, so parameters() leaves them out.
_RESERVED_PARAMETERS = frozenset({
    "sequence_id", "sequence_start", "sequence_end", "priority", "timeout", "headers",
    "binary_data_output", "triton_enable_empty_final_response",
    "shmserve_bls_chain",  # workers/bls.py: the instances a BLS request's callers hold
})

# ---------------------------------------------------------------------------------------------
# Errors


class MemoryType(IntEnum):
    """Where a BLS request would like its outputs (the python_backend's MemoryType)."""

    TRITONSERVER_MEMORY_GPU = 0
    TRITONSERVER_MEMORY_CPU = 1


TRITONSERVER_MEMORY_GPU = MemoryType.TRITONSERVER_MEMORY_GPU
TRITONSERVER_MEMORY_CPU = MemoryType.TRITONSERVER_MEMORY_CPU


class PreferredMemory:
    """``InferenceRequest(preferred_memory=PreferredMemory(TRITONSERVER_MEMORY_CPU))``.
    Accepted for compatibility: BLS outputs arrive in host memory here whatever it says."""

    __slots__ = ("preferred_device_id", "preferred_memory_type")

    def __init__(self, preferred_memory_type: int, preferred_device_id: int = 0) -> None:
        self.preferred_memory_type = MemoryType(preferred_memory_type)
        self.preferred_device_id = int(preferred_device_id)


class InferenceTrace:
    """A request's trace, as ``request.trace()`` returns it. shmserve does not trace, so its
    context is always None; passing it to a BLS request (``trace=``) is accepted."""

    __slots__ = ()

    def get_context(self) -> str | None:
        return None


_NO_TRACE = InferenceTrace()


class TritonError(Exception):
    """An error for one response: ``InferenceResponse(error=TritonError("...", code))``.

    Triton's class is not an exception; ours is one as well, so BLS stubs can raise it. ``code``
    is one of the class constants; :func:`grpc_code_name` maps it to a gRPC status code name.
    """

    UNKNOWN: ClassVar[int] = 0
    INTERNAL: ClassVar[int] = 1
    NOT_FOUND: ClassVar[int] = 2
    INVALID_ARG: ClassVar[int] = 3
    UNAVAILABLE: ClassVar[int] = 4
    UNSUPPORTED: ClassVar[int] = 5
    ALREADY_EXISTS: ClassVar[int] = 6
    CANCELLED: ClassVar[int] = 7

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self._message = message
        self._code = int(code)

    def message(self) -> str:
        return self._message

    def code(self) -> int:
        return self._code

    def __str__(self) -> str:
        return self._message

    def __repr__(self) -> str:
        return f"TritonError({self._message!r}, code={self._code})"


_GRPC_CODE_NAMES: dict[int, str] = {
    TritonError.UNKNOWN: "UNKNOWN",
    TritonError.INTERNAL: "INTERNAL",
    TritonError.NOT_FOUND: "NOT_FOUND",
    TritonError.INVALID_ARG: "INVALID_ARGUMENT",
    TritonError.UNAVAILABLE: "UNAVAILABLE",
    TritonError.UNSUPPORTED: "UNIMPLEMENTED",
    TritonError.ALREADY_EXISTS: "ALREADY_EXISTS",
    TritonError.CANCELLED: "CANCELLED",
}


_TRITON_CODES: dict[str, int] = {name: code for code, name in _GRPC_CODE_NAMES.items()}


def _triton_code(grpc_name: str) -> int:
    """The TritonError code of a gRPC status code name (others become INTERNAL)."""
    return _TRITON_CODES.get(grpc_name, TritonError.INTERNAL)


def grpc_code_name(code: int) -> str:
    """The gRPC status code name for a TritonError code (unknown codes become UNKNOWN)."""
    return _GRPC_CODE_NAMES.get(int(code), "UNKNOWN")


class TritonModelException(Exception):
    """The exception models raise (and that pb_utils raises for misuse)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self._message = message

    def message(self) -> str:
        return self._message

    def __str__(self) -> str:
        return self._message


# ---------------------------------------------------------------------------------------------
# Data types

TRITON_STRING_TO_NUMPY: dict[str, type] = {
    "TYPE_BOOL": np.bool_,
    "TYPE_UINT8": np.uint8,
    "TYPE_UINT16": np.uint16,
    "TYPE_UINT32": np.uint32,
    "TYPE_UINT64": np.uint64,
    "TYPE_INT8": np.int8,
    "TYPE_INT16": np.int16,
    "TYPE_INT32": np.int32,
    "TYPE_INT64": np.int64,
    "TYPE_FP16": np.float16,
    "TYPE_FP32": np.float32,
    "TYPE_FP64": np.float64,
    "TYPE_STRING": np.object_,
}

# TRITONSERVER_DataType values.
_TRITON_TYPE_TO_NUMPY: dict[int, type] = {
    1: np.bool_, 2: np.uint8, 3: np.uint16, 4: np.uint32, 5: np.uint64,
    6: np.int8, 7: np.int16, 8: np.int32, 9: np.int64,
    10: np.float16, 11: np.float32, 12: np.float64, 13: np.object_,
}
_TRITON_TYPE_BYTES = 13
_TRITON_TYPE_BF16 = 14


def triton_string_to_numpy(triton_type_string: str) -> Any:
    """``"TYPE_FP32"`` -> ``np.float32``; TYPE_BF16 follows shmserve's BF16 policy."""
    if triton_type_string == "TYPE_BF16":
        return _dt.bf16_dtype().type
    try:
        return TRITON_STRING_TO_NUMPY[triton_type_string]
    except KeyError:
        raise TritonModelException(f"unknown Triton data type '{triton_type_string}'") from None


def triton_to_numpy_type(data_type: int) -> Any:
    """A TRITONSERVER_DataType number -> NumPy type (None when unknown, as Triton)."""
    if data_type == _TRITON_TYPE_BF16:
        return _dt.bf16_dtype().type
    return _TRITON_TYPE_TO_NUMPY.get(int(data_type))


def numpy_to_triton_type(data_type: Any) -> int | None:
    """A NumPy dtype or type -> TRITONSERVER_DataType number (None when unsupported)."""
    try:
        dtype = np.dtype(data_type)
    except TypeError:
        return None
    if dtype.kind in "OSU":
        return _TRITON_TYPE_BYTES
    if dtype.name == "bfloat16":
        return _TRITON_TYPE_BF16
    for number, candidate in _TRITON_TYPE_TO_NUMPY.items():
        if np.dtype(candidate) == dtype:
            return number
    return None


def serialize_byte_tensor(input_tensor: np.ndarray) -> np.ndarray:
    """Flatten an object/bytes array into the BYTES wire layout (uint32 LE length + bytes).

    As Triton (and tritonclient) do, the result is a 0-d object array holding one ``bytes``.
    """
    array = np.asarray(input_tensor)
    if array.size == 0:
        return np.empty([0], dtype=np.object_)
    if array.dtype != np.object_ and array.dtype.type is not np.bytes_:
        raise TritonModelException("cannot serialize bytes tensor: invalid datatype")
    items = [item if isinstance(item, bytes) else str(item).encode("utf-8")
             for item in array.reshape(-1, order="C").tolist()]
    out = np.empty((), dtype=np.object_)
    out[()] = _dt.serialize_bytes_tensor(_object_vector(items))
    return out


def deserialize_bytes_tensor(encoded_tensor: Any) -> np.ndarray:
    """Parse the BYTES wire layout into a 1-D object array of ``bytes``."""
    if isinstance(encoded_tensor, np.ndarray):
        if encoded_tensor.dtype == np.object_ and encoded_tensor.size == 1:
            encoded_tensor = encoded_tensor.reshape(-1)[0]
        else:
            encoded_tensor = encoded_tensor.tobytes()
    try:
        return _dt.deserialize_bytes_tensor(encoded_tensor)
    except ValueError as exc:
        raise TritonModelException(f"cannot deserialize bytes tensor: {exc}") from None


def _object_vector(items: Sequence[Any]) -> np.ndarray:
    out = np.empty(len(items), dtype=np.object_)
    out[:] = list(items)
    return out


# ---------------------------------------------------------------------------------------------
# Tensors and DLPack

_KDL_CPU = 1
_ndarray = np.ndarray          # a global lookup instead of two in the per-tensor methods


class _CapsuleHolder:
    """Lets ``np.from_dlpack`` consume a bare DLPack capsule (it wants an object)."""

    def __init__(self, capsule: Any, device: tuple[int, int]) -> None:
        self._capsule = capsule
        self._device = device

    def __dlpack__(self, **_kwargs: Any) -> Any:
        return self._capsule

    def __dlpack_device__(self) -> tuple[int, int]:
        return self._device


# Private prototypes: setting argtypes on ctypes.pythonapi's shared functions would leak.
_capsule_get_name = ctypes.PYFUNCTYPE(ctypes.c_char_p, ctypes.py_object)(
    ("PyCapsule_GetName", ctypes.pythonapi))
_capsule_get_pointer = ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.py_object, ctypes.c_char_p)(
    ("PyCapsule_GetPointer", ctypes.pythonapi))


def _capsule_device(capsule: Any) -> tuple[int, int]:
    """Read (device_type, device_id) out of a DLPack capsule without consuming it."""
    name = _capsule_get_name(capsule)
    if name == b"dltensor":
        dl_tensor_offset = 0                     # DLManagedTensor starts with its DLTensor
    elif name == b"dltensor_versioned":
        dl_tensor_offset = 32                    # version, manager_ctx, deleter, flags
    else:
        raise TritonModelException(
            f"from_dlpack: expected an unused DLPack capsule, got one named {name!r}")
    pointer = _capsule_get_pointer(capsule, name)
    device = (ctypes.c_int32 * 2).from_address(pointer + dl_tensor_offset + 8)  # after `data`
    return int(device[0]), int(device[1])


def _is_torch_tensor(value: Any) -> bool:
    return type(value).__module__.split(".")[0] == "torch" and hasattr(value, "__dlpack__")


def _torch_from_dlpack(value: Any) -> Any:
    try:
        torch_dlpack = importlib.import_module("torch.utils.dlpack")
    except ImportError:
        raise TritonModelException(
            "from_dlpack: tensors that are not in CPU memory need PyTorch, which is not "
            "installed in this worker") from None
    return torch_dlpack.from_dlpack(value)


class Tensor:
    """A named input or output tensor: ``pb_utils.Tensor("OUTPUT0", ndarray)``.

    Holds the array it is given (no copy). Besides NumPy arrays it can hold a tensor that is not in
    CPU memory (a torch CUDA tensor, from CUDA shared-memory inputs or ``from_dlpack``).
    """

    __slots__ = ("_data", "_name")

    def __init__(self, name: str, numpy_array: Any) -> None:
        if not isinstance(name, str):
            raise TritonModelException(f"Tensor name must be a str, got {type(name).__name__}")
        if not isinstance(numpy_array, _ndarray):
            if _is_torch_tensor(numpy_array):
                raise TritonModelException(
                    f"Tensor '{name}': pass a NumPy array; use pb_utils.Tensor.from_dlpack() "
                    "for torch tensors")
            numpy_array = np.asarray(numpy_array)
        if numpy_array.dtype.kind == "V":
            raise TritonModelException(
                f"Tensor '{name}': dtype {numpy_array.dtype} is not supported by the Python "
                "backend; use np.object_ for BYTES")
        self._name = name
        self._data: Any = numpy_array

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> np.ndarray:
        if not isinstance(self._data, _ndarray):
            raise TritonModelException(
                "Tensor is stored in GPU and cannot be converted to NumPy.")
        return self._data

    def shape(self) -> list[int]:
        return [int(dim) for dim in self._data.shape]

    def triton_dtype(self) -> int | None:
        if isinstance(self._data, np.ndarray):
            return numpy_to_triton_type(self._data.dtype)
        return numpy_to_triton_type(str(self._data.dtype).removeprefix("torch."))

    def is_cpu(self) -> bool:
        if isinstance(self._data, np.ndarray):
            return True
        return int(self._data.__dlpack_device__()[0]) == _KDL_CPU

    def to_dlpack(self) -> Any:
        """A DLPack capsule sharing this tensor's memory (consume it once, e.g. with torch)."""
        data = self._data
        if isinstance(data, np.ndarray):
            if data.dtype == np.object_:
                raise TritonModelException(
                    f"Tensor '{self._name}': BYTES tensors cannot be exported with DLPack")
            try:
                return data.__dlpack__()
            except BufferError:
                # Read-only views (inline inputs, read-only regions) need the versioned protocol,
                # which can flag read-only memory.
                return data.__dlpack__(max_version=(1, 0))
        return data.__dlpack__()

    @staticmethod
    def from_dlpack(name: str, capsule: Any) -> Tensor:
        """Wrap a DLPack capsule or an object with ``__dlpack__`` (e.g. a torch tensor).

        CPU memory becomes a NumPy array sharing the memory; other devices stay torch tensors.
        """
        if hasattr(capsule, "__dlpack__"):
            device_type = int(capsule.__dlpack_device__()[0])
            if device_type == _KDL_CPU:
                data: Any = np.from_dlpack(capsule)
            elif _is_torch_tensor(capsule):
                data = capsule
            else:
                data = _torch_from_dlpack(capsule)
        else:
            if type(capsule).__name__ != "PyCapsule":
                raise TritonModelException(
                    f"from_dlpack: expected a DLPack capsule or an object with __dlpack__, got "
                    f"{type(capsule).__name__}")
            device = _capsule_device(capsule)
            if device[0] == _KDL_CPU:
                data = np.from_dlpack(_CapsuleHolder(capsule, device))
            else:
                data = _torch_from_dlpack(capsule)
        return _wrap_tensor(name, data)

    def __repr__(self) -> str:
        return f"Tensor({self._name!r}, shape={self.shape()}, dtype={self._data.dtype})"


_new_object = object.__new__


def _wrap_tensor(name: str, data: Any) -> Tensor:
    """Internal: wrap a request input as it is (NumPy view or torch tensor), no checks."""
    tensor: Tensor = _new_object(Tensor)
    tensor._name = name
    tensor._data = data
    return tensor


# ---------------------------------------------------------------------------------------------
# Requests and responses


class InferenceRequest:
    """A request handed to ``execute`` -- or, built by a model, a BLS request (not supported yet).

    The constructor is Triton's BLS constructor; requests that arrive from clients are built
    internally by the python backend.
    """

    __slots__ = ("_correlation_id", "_flags", "_inputs", "_model_name", "_model_version",
                 "_parameters", "_raw_parameters", "_release_flags", "_request_id",
                 "_requested_output_names", "_sender", "_timeout")
    _parameters: str | None             # None until parameters() serializes _raw_parameters
    _raw_parameters: Mapping[str, Any] | None

    def __init__(self, request_id: str = "", correlation_id: int | str = 0,
                 inputs: Sequence[Tensor] | None = None,
                 requested_output_names: Sequence[str] | None = None,
                 model_name: str = "", model_version: int = -1, flags: int = 0,
                 timeout: int = 0, preferred_memory: Any = None, trace: Any = None,
                 parameters: Mapping[str, Any] | str | None = None) -> None:
        self._request_id = request_id
        self._correlation_id = correlation_id
        self._inputs: list[Tensor] = list(inputs or [])
        self._requested_output_names: list[str] = list(requested_output_names or [])
        self._model_name = model_name
        self._model_version = model_version
        self._flags = flags
        self._timeout = timeout
        self._parameters = _parameters_json(parameters)
        self._raw_parameters = None
        self._sender: InferenceResponseSender | None = None
        self._release_flags = TRITONSERVER_REQUEST_RELEASE_ALL

    @classmethod
    def _from_backend(cls, request_id: str, correlation_id: int | str,
                      inputs: Mapping[str, Any], requested_output_names: list[str],
                      parameters: Mapping[str, Any], model_name: str,
                      model_version: int) -> InferenceRequest:
        """Internal: wrap one incoming request. Inputs are wrapped as they are (no copy).

        ``parameters()`` is serialized on first call only: most models never ask for it.
        """
        request: InferenceRequest = _new_object(cls)
        request._request_id = request_id
        request._correlation_id = correlation_id
        tensors: list[Tensor] = []
        for name, value in inputs.items():     # _wrap_tensor, inlined: once per input
            tensor: Tensor = _new_object(Tensor)
            tensor._name = name
            tensor._data = value
            tensors.append(tensor)
        request._inputs = tensors
        request._requested_output_names = requested_output_names
        request._model_name = model_name
        request._model_version = model_version
        request._sender = None  # made on first use (non-decoupled) or by the backend
        request._release_flags = TRITONSERVER_REQUEST_RELEASE_ALL
        if parameters:
            flags = 0
            if parameters.get("sequence_start"):
                flags |= TRITONSERVER_REQUEST_FLAG_SEQUENCE_START
            if parameters.get("sequence_end"):
                flags |= TRITONSERVER_REQUEST_FLAG_SEQUENCE_END
            request._flags = flags
            request._timeout = int(parameters.get("timeout", 0) or 0)
            request._parameters = None
            request._raw_parameters = parameters
        else:
            request._flags = 0
            request._timeout = 0
            request._parameters = _EMPTY_JSON_OBJECT
            request._raw_parameters = None
        return request

    def inputs(self) -> list[Tensor]:
        return self._inputs

    def request_id(self) -> str:
        return self._request_id

    def correlation_id(self) -> int | str:
        return self._correlation_id

    def requested_output_names(self) -> list[str]:
        return self._requested_output_names

    def parameters(self) -> str:
        """The request's parameters as a JSON object string."""
        if self._parameters is None:
            raw = self._raw_parameters or {}
            self._parameters = json.dumps(
                {k: v for k, v in raw.items() if k not in _RESERVED_PARAMETERS}, default=str)
        return self._parameters

    def flags(self) -> int:
        return self._flags

    def set_flags(self, flags: int) -> None:
        """A BLS request's sequence flags (TRITONSERVER_REQUEST_FLAG_SEQUENCE_START/END)."""
        self._flags = int(flags)

    def trace(self) -> InferenceTrace:
        return _NO_TRACE

    def timeout(self) -> int:
        return self._timeout

    def model_name(self) -> str:
        return self._model_name

    def is_cancelled(self) -> bool:
        sender = self._sender
        return sender is not None and sender.is_cancelled()

    def set_release_flags(self, flags: int) -> None:
        """``TRITONSERVER_REQUEST_RELEASE_RESCHEDULE``: when execute returns, the request goes
        back to the sequence batcher for another execution instead of being answered (an
        ``iterative_sequence`` model; a non-decoupled model puts None in its place in the
        list it returns). ``TRITONSERVER_REQUEST_RELEASE_ALL``: the usual release."""
        self._release_flags = int(flags)

    def _rescheduled(self) -> bool:
        return bool(self._release_flags & TRITONSERVER_REQUEST_RELEASE_RESCHEDULE)

    def get_response_sender(self) -> InferenceResponseSender:
        if self._sender is None:
            with _sender_lock:  # the model's threads and the backend may ask at once
                if self._sender is None:
                    # A non-decoupled model's sender: its one response answers the request.
                    self._sender = InferenceResponseSender(None, decoupled=False)
        return self._sender

    def exec(self, decoupled: bool = False) -> Any:
        """BLS: run this request on ``model_name`` through the server's core (validation,
        batching, statistics as any request) and return its response; a failure is a
        response with ``has_error()``, as in Triton. ``decoupled=True``: an iterator of the
        responses as they come (a decoupled model's many, the last one possibly empty: it
        carries the final flag alone)."""
        return self._exec(decoupled, True)

    def _bls_request(self) -> Any:
        from shmserve.workers import bls
        parameters = json.loads(self._parameters) if self._parameters else {}
        if isinstance(parameters, dict):  # a sequence's flags travel as its parameters
            if self._flags & TRITONSERVER_REQUEST_FLAG_SEQUENCE_START:
                parameters["sequence_start"] = True
            if self._flags & TRITONSERVER_REQUEST_FLAG_SEQUENCE_END:
                parameters["sequence_end"] = True
        return bls.BlsRequest(
            self._model_name, self._model_version,
            [(tensor._name, tensor._data) for tensor in self._inputs],
            list(self._requested_output_names), self._request_id, self._correlation_id,
            parameters if isinstance(parameters, dict) else {}, int(self._timeout or 0))

    def _exec(self, decoupled: bool, blocking: bool) -> Any:
        from shmserve.workers import bls
        if decoupled:
            try:
                return ResponseIterator(bls.stream(self._bls_request(), blocking))
            except bls.BlsError as exc:
                return ResponseIterator(None, InferenceResponse(
                    error=TritonError(exc.message, _triton_code(exc.code))))
        try:
            outputs = bls.infer(self._bls_request(), blocking)
        except bls.BlsError as exc:
            return InferenceResponse(error=TritonError(exc.message, _triton_code(exc.code)))
        return InferenceResponse([_wrap_tensor(name, array) for name, array in outputs.items()])

    async def async_exec(self, decoupled: bool = False) -> Any:
        """``exec`` awaited: the call waits in a thread, so an ``async def execute`` can
        await several at once. ``decoupled=True``: the iterator of responses, which may also
        be iterated with ``async for`` (each wait in a thread)."""
        import asyncio
        import contextvars

        from shmserve.workers import bls
        # The thread runs in this task's context: it carries the BLS chain of the request.
        context = contextvars.copy_context()
        return await asyncio.get_running_loop().run_in_executor(
            bls.waiters(), context.run, self._exec, decoupled, False)

    def __repr__(self) -> str:
        names = [tensor.name() for tensor in self._inputs]
        return f"InferenceRequest(request_id={self._request_id!r}, inputs={names})"


class ResponseIterator:
    """``InferenceRequest.exec(decoupled=True)``'s answer (Triton's ResponseIterator): the
    called model's responses in order as they come, each an ``InferenceResponse``; the last
    one may be empty (the model sent the final flag alone). ``async for`` waits in a thread.
    ``cancel()`` (or dropping it early) cancels the request: the called model sees
    ``is_cancelled()``."""

    def __init__(self, stream: Any, failed: InferenceResponse | None = None) -> None:
        self._stream = stream
        self._failed = failed  # a request that could not be sent: its one error response

    def __iter__(self) -> ResponseIterator:
        return self

    def __next__(self) -> InferenceResponse:
        if self._stream is None:
            failed, self._failed = self._failed, None
            if failed is None:
                raise StopIteration
            return failed
        item = next(self._stream)
        if item.error is not None:
            from shmserve.workers import bls
            assert isinstance(item.error, bls.BlsError)
            return InferenceResponse(error=TritonError(item.error.message,
                                                       _triton_code(item.error.code)))
        return InferenceResponse([_wrap_tensor(name, array)
                                  for name, array in item.outputs.items()])

    def __aiter__(self) -> ResponseIterator:
        return self

    async def __anext__(self) -> InferenceResponse:
        import asyncio

        from shmserve.workers import bls
        # StopIteration cannot cross a future: the thread answers None instead.
        response = await asyncio.get_running_loop().run_in_executor(bls.waiters(), next,
                                                                    self, None)
        if response is None:
            raise StopAsyncIteration
        return response

    def cancel(self) -> None:
        if self._stream is not None:
            self._stream.close()


class InferenceResponse:
    """One response: output tensors, or an error that fails its request."""

    __slots__ = ("_error", "_output_tensors", "_parameters")

    def __init__(self, output_tensors: Iterable[Tensor] | None = None,
                 error: TritonError | str | None = None,
                 parameters: Mapping[str, Any] | str | None = None) -> None:
        tensors = list(output_tensors) if output_tensors else []
        for index, tensor in enumerate(tensors):
            if not isinstance(tensor, Tensor):
                raise TritonModelException(
                    f"InferenceResponse: output_tensors[{index}] is a {type(tensor).__name__}, "
                    "expected pb_utils.Tensor")
        if error is not None and not isinstance(error, TritonError):
            error = TritonError(str(error))
        self._output_tensors = tensors
        self._error = error
        self._parameters = (_EMPTY_JSON_OBJECT if parameters is None
                            else _parameters_json(parameters))

    def output_tensors(self) -> list[Tensor]:
        return self._output_tensors

    def has_error(self) -> bool:
        return self._error is not None

    def error(self) -> TritonError | None:
        return self._error

    def parameters(self) -> str:
        return self._parameters


_sender_lock = threading.Lock()


class InferenceResponseSender:
    """``request.get_response_sender()``: sends a request's responses, from any thread, until
    the one flagged ``TRITONSERVER_RESPONSE_COMPLETE_FINAL``. Texts are the python_backend's.

    ``deliver(response, final)`` takes each response (decoupled models); without one (a
    non-decoupled model) the one response is kept for the backend to answer with.
    """

    __slots__ = ("_cancelled", "_closed", "_decoupled", "_deliver", "_final", "_lock",
                 "_response", "_sent")

    def __init__(self, deliver: Any, decoupled: bool = True, cancelled: Any = None) -> None:
        self._deliver = deliver
        self._decoupled = decoupled
        self._cancelled = cancelled
        self._closed = False
        self._sent = 0
        self._response: InferenceResponse | None = None
        self._final = threading.Event()
        # Held from the checks to the delivery: of several threads sending at once, exactly
        # one final gets through, and nothing is delivered after it.
        self._lock = threading.Lock()

    def send(self, response: InferenceResponse | None = None, flags: int = 0) -> None:
        with self._lock:
            self._send(response, flags)

    def _send(self, response: InferenceResponse | None, flags: int) -> None:
        final = flags == TRITONSERVER_RESPONSE_COMPLETE_FINAL
        if not self._decoupled:
            if response is not None and self._sent > 0:
                raise TritonModelException("Unable to send response. Non-decoupled model "
                                           "cannot send more than one response.")
            if response is None and final and self._sent == 0:
                raise TritonModelException("Unable to send response. Non-decoupled model "
                                           "cannot send complete final before sending a "
                                           "response.")
        if self._closed:
            raise TritonModelException(
                "Unable to send response. Response sender has been closed.")
        if flags != TRITONSERVER_RESPONSE_COMPLETE_FINAL and flags != 0:
            raise TritonModelException("Unable to send response. Unsupported flag provided.")
        if flags == 0 and response is None:
            raise TritonModelException("Inference Response object must be provided when the "
                                       "response flags is set to zero.")
        if response is not None and not isinstance(response, InferenceResponse):
            raise TritonModelException(f"send() expects a pb_utils.InferenceResponse, got "
                                       f"{type(response).__name__}")
        if final:
            self._closed = True
        self._sent += 1
        if self._deliver is not None:
            self._deliver(response, final)
        elif response is not None:
            self._response = response
        if final:
            self._final.set()

    def is_cancelled(self) -> bool:
        return bool(self._cancelled()) if self._cancelled is not None else False

    def _wait_final(self, timeout: float | None = None) -> InferenceResponse | None:
        """Backend side (non-decoupled): the one response, once the final flag was sent."""
        self._final.wait(timeout)
        return self._response if self._closed else None


def get_input_tensor_by_name(inference_request: InferenceRequest, name: str) -> Tensor | None:
    for tensor in inference_request.inputs():
        if tensor._name == name:
            return tensor
    return None


def get_output_tensor_by_name(inference_response: InferenceResponse, name: str) -> Tensor | None:
    for tensor in inference_response.output_tensors():
        if tensor._name == name:
            return tensor
    return None


# ---------------------------------------------------------------------------------------------
# Model loading API (explicit model control mode only, as in Triton)

def load_model(model_name: str, config: str = "", files: Mapping[str, bytes] | None = None
               ) -> None:
    """Load or reload ``model_name``; ``config`` overrides its config (JSON text), ``files``
    map "file:<path>" to the bytes of a model directory to load from (needs ``config``)."""
    from shmserve.workers import bls, model_control
    try:
        model_control.load(model_name, config, dict(files) if files else None)
    except bls.BlsError as exc:
        raise TritonModelException(exc.message) from None


def unload_model(model_name: str, unload_dependents: bool = False) -> None:
    from shmserve.workers import bls, model_control
    try:
        model_control.unload(model_name, unload_dependents)
    except bls.BlsError as exc:
        raise TritonModelException(exc.message) from None


def is_model_ready(model_name: str, model_version: str = "") -> bool:
    from shmserve.workers import bls, model_control
    try:
        return model_control.ready(model_name, model_version)
    except bls.BlsError as exc:
        raise TritonModelException(exc.message) from None


_EMPTY_JSON_OBJECT = "{}"


def _parameters_json(parameters: Mapping[str, Any] | str | None) -> str:
    """A constructor's ``parameters`` (dict or JSON string) as the JSON string Triton keeps."""
    if isinstance(parameters, str):
        return parameters
    return json.dumps(dict(parameters)) if parameters else _EMPTY_JSON_OBJECT


def get_input_config_by_name(model_config: Mapping[str, Any], name: str) -> dict[str, Any] | None:
    properties: dict[str, Any]
    for properties in model_config.get("input", []):
        if properties.get("name") == name:
            return properties
    return None


def get_output_config_by_name(model_config: Mapping[str, Any],
                              name: str) -> dict[str, Any] | None:
    properties: dict[str, Any]
    for properties in model_config.get("output", []):
        if properties.get("name") == name:
            return properties
    return None


def using_decoupled_model_transaction_policy(model_config: Mapping[str, Any]) -> bool:
    policy = model_config.get("model_transaction_policy") or {}
    return bool(policy.get("decoupled", False))


# ---------------------------------------------------------------------------------------------
# auto_complete_config


class ModelConfig:
    """The object a model's static ``auto_complete_config(auto_complete_model_config)`` edits."""

    def __init__(self, model_config: Mapping[str, Any] | str) -> None:
        if isinstance(model_config, str):
            config: dict[str, Any] = json.loads(model_config)
        else:
            config = json.loads(json.dumps(model_config))   # a private deep copy
        config.setdefault("name", "")
        config.setdefault("max_batch_size", 0)
        config.setdefault("input", [])
        config.setdefault("output", [])
        self._model_config = config

    def as_dict(self) -> dict[str, Any]:
        return self._model_config

    def max_batch_size(self) -> int:
        return int(self._model_config.get("max_batch_size", 0))

    def set_max_batch_size(self, max_batch_size: int) -> None:
        current = int(self._model_config.get("max_batch_size", 0))
        if current > max_batch_size:
            raise ValueError(
                f"configuration specified max_batch_size {current}, but in auto-complete-config "
                f"function for model '{self._name()}' specified max_batch_size {max_batch_size}")
        self._model_config["max_batch_size"] = int(max_batch_size)

    def set_dynamic_batching(self) -> None:
        for other in ("sequence_batching", "ensemble_scheduling"):
            if other in self._model_config:
                raise ValueError(
                    f"Configuration specified scheduling_choice as '{other}', but "
                    f"auto-complete-config function for model '{self._name()}' tries to set "
                    "scheduling_choice as 'dynamic_batching'")
        self._model_config.setdefault("dynamic_batching", {})

    def add_input(self, input: Mapping[str, Any]) -> None:
        self._add_tensor("input", input, {"name", "data_type", "dims", "optional"})

    def add_output(self, output: Mapping[str, Any]) -> None:
        self._add_tensor("output", output, {"name", "data_type", "dims", "is_shape_tensor"})

    def set_model_transaction_policy(self, transaction_policy_dict: Mapping[str, Any]) -> None:
        for key in transaction_policy_dict:
            if key != "decoupled":
                raise ValueError(
                    f"model transaction property in auto-complete-config function for model "
                    f"'{self._name()}' contains property other than 'decoupled'")
        policy = self._model_config.setdefault("model_transaction_policy", {})
        decoupled = bool(transaction_policy_dict.get("decoupled", False))
        if "decoupled" in policy and bool(policy["decoupled"]) != decoupled:
            raise ValueError(
                f"trying to change decoupled property in auto-complete-config for model "
                f"'{self._name()}', which is already set to {policy['decoupled']}")
        policy["decoupled"] = decoupled

    def _name(self) -> str:
        return str(self._model_config.get("name", ""))

    def _add_tensor(self, kind: str, tensor: Mapping[str, Any], allowed: set[str]) -> None:
        label = f"{kind} '{tensor.get('name', '')}' in auto-complete-config function for model " \
                f"'{self._name()}'"
        extra = sorted(set(tensor) - allowed)
        if extra:
            raise ValueError(f"{label} contains property other than "
                             f"{', '.join(repr(a) for a in sorted(allowed))}: {extra}")
        for required in ("name", "data_type", "dims"):
            if required not in tensor:
                raise ValueError(f"{label} is missing '{required}' property.")
        new = dict(tensor)
        new["dims"] = [int(dim) for dim in new["dims"]]
        tensors: list[dict[str, Any]] = self._model_config.setdefault(kind, [])
        for current in tensors:
            if current.get("name") != new["name"]:
                continue
            current_type = current.get("data_type", "TYPE_INVALID")
            if current_type not in ("TYPE_INVALID", new["data_type"]):
                raise ValueError(
                    f"unable to load model '{self._name()}', configuration expects datatype "
                    f"{current_type} for {kind} '{new['name']}', model provides "
                    f"{new['data_type']}")
            current_dims = [int(dim) for dim in current.get("dims", [])]
            if current_dims and current_dims != new["dims"]:
                raise ValueError(
                    f"model '{self._name()}', tensor '{new['name']}': the model expects dims "
                    f"{new['dims']} but the model configuration specifies dims {current_dims}")
            current.update(new)
            return
        tensors.append(new)


# ---------------------------------------------------------------------------------------------
# Logging


class LogLevel(IntEnum):
    INFO = 0
    WARNING = 1
    ERROR = 2
    VERBOSE = 3


_LEVELS = {LogLevel.INFO: logging.INFO, LogLevel.WARNING: logging.WARNING,
           LogLevel.ERROR: logging.ERROR, LogLevel.VERBOSE: logging.DEBUG}


class Logger:
    """``pb_utils.Logger.log_info("...")``: model logs go to the server's log (the worker's
    stderr) with the model's name and the calling file and line (workers/main.py)."""

    LogLevel = LogLevel

    @staticmethod
    def log(message: str, level: int = LogLevel.INFO) -> None:
        _log.log(_LEVELS.get(LogLevel(level), logging.INFO), "%s", message, stacklevel=2)

    @staticmethod
    def log_info(message: str) -> None:
        _log.info("%s", message, stacklevel=2)

    @staticmethod
    def log_warn(message: str) -> None:
        _log.warning("%s", message, stacklevel=2)

    @staticmethod
    def log_error(message: str) -> None:
        _log.error("%s", message, stacklevel=2)

    @staticmethod
    def log_verbose(message: str) -> None:
        _log.debug("%s", message, stacklevel=2)
