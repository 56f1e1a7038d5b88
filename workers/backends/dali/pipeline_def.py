"""What a serialized DALI pipeline declares, read without importing DALI.

A serialized pipeline (``model.dali``) is a ``dali_proto.PipelineDef`` protobuf message. DALI's
Python API can run one but cannot list its external sources; Triton's DALI backend asks DALI's
C API for them. Here the few fields that matter are read with a descriptor built at import time
(a subset of DALI's ``dali.proto``; unknown fields are kept, so a rewritten message is the same
pipeline): the external sources (the model's inputs, with the ``dtype``/``ndim`` given to
``fn.external_source``), the pipeline outputs (with ``output_dtype``/``output_ndim``), the
maximum batch size and the device id.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError

#: DALI's ``device_id`` of a pipeline without a GPU (``types.CPU_ONLY_DEVICE_ID``).
CPU_ONLY_DEVICE_ID = -99999

#: ``nvidia.dali.types.DALIDataType`` values and the config data types Triton's DALI backend
#: maps them to (config_tools.cc ``to_triton_config``).
DALI_TO_CONFIG: dict[int, str] = {
    0: "TYPE_UINT8", 1: "TYPE_UINT16", 2: "TYPE_UINT32", 3: "TYPE_UINT64",
    4: "TYPE_INT8", 5: "TYPE_INT16", 6: "TYPE_INT32", 7: "TYPE_INT64",
    8: "TYPE_FP16", 9: "TYPE_FP32", 10: "TYPE_FP64", 11: "TYPE_BOOL",
}
NO_TYPE = -1

_PACKAGE = "shmserve_dali_subset"
_F = descriptor_pb2.FieldDescriptorProto


class PipelineDefError(Exception):
    """The bytes are not a serialized DALI pipeline."""


@dataclass(frozen=True, slots=True)
class PipelineTensor:
    """An external source or a pipeline output: ``dtype`` NO_TYPE / ``ndim`` None when the
    pipeline does not declare them."""

    name: str
    dtype: int = NO_TYPE
    ndim: int | None = None
    device: str = "cpu"

    @property
    def config_type(self) -> str | None:
        return DALI_TO_CONFIG.get(self.dtype)


@dataclass(frozen=True, slots=True)
class PipelineInfo:
    inputs: tuple[PipelineTensor, ...]
    outputs: tuple[PipelineTensor, ...]
    max_batch_size: int
    num_threads: int
    device_id: int


def _add_field(message: descriptor_pb2.DescriptorProto, name: str, number: int, kind: int,
               repeated: bool = False, type_name: str | None = None) -> None:
    field = message.field.add(name=name, number=number, type=kind,
                              label=_F.LABEL_REPEATED if repeated else _F.LABEL_OPTIONAL)
    if type_name is not None:
        field.type_name = f".{_PACKAGE}.{type_name}"


def _message_classes() -> tuple[Any, Any]:
    file = descriptor_pb2.FileDescriptorProto(name=f"{_PACKAGE}.proto", package=_PACKAGE,
                                              syntax="proto2")
    argument = file.message_type.add(name="Argument")
    _add_field(argument, "name", 1, _F.TYPE_STRING)
    _add_field(argument, "ints", 4, _F.TYPE_INT64, repeated=True)
    _add_field(argument, "strings", 5, _F.TYPE_STRING, repeated=True)
    tensor = file.message_type.add(name="InputOutput")
    _add_field(tensor, "name", 1, _F.TYPE_STRING)
    _add_field(tensor, "device", 2, _F.TYPE_STRING)
    _add_field(tensor, "dtype", 5, _F.TYPE_INT32)
    _add_field(tensor, "ndim", 6, _F.TYPE_INT32)
    operator = file.message_type.add(name="OpDef")
    _add_field(operator, "name", 1, _F.TYPE_STRING)
    _add_field(operator, "output", 3, _F.TYPE_MESSAGE, repeated=True, type_name="InputOutput")
    _add_field(operator, "args", 4, _F.TYPE_MESSAGE, repeated=True, type_name="Argument")
    _add_field(operator, "inst_name", 5, _F.TYPE_STRING)
    pipeline = file.message_type.add(name="PipelineDef")
    _add_field(pipeline, "num_threads", 1, _F.TYPE_INT64)
    _add_field(pipeline, "batch_size", 2, _F.TYPE_INT32)
    _add_field(pipeline, "op", 5, _F.TYPE_MESSAGE, repeated=True, type_name="OpDef")
    _add_field(pipeline, "external_inputs", 6, _F.TYPE_STRING, repeated=True)
    _add_field(pipeline, "pipe_outputs", 7, _F.TYPE_MESSAGE, repeated=True,
               type_name="InputOutput")
    _add_field(pipeline, "device_id", 8, _F.TYPE_INT32)
    pool = descriptor_pool.DescriptorPool()   # private: never clashes with DALI's own classes
    pool.Add(file)
    return (message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{_PACKAGE}.PipelineDef")),
            message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{_PACKAGE}.OpDef")))


_PipelineDef, _OpDef = _message_classes()


def _parse(serialized: bytes) -> Any:
    message = _PipelineDef()
    try:
        message.ParseFromString(serialized)
    except DecodeError as exc:
        raise PipelineDefError(f"not a serialized DALI pipeline ({exc})") from None
    if not message.op and not message.pipe_outputs:
        raise PipelineDefError("not a serialized DALI pipeline (no operators, no outputs)")
    return message


def _argument(operator: Any, name: str) -> Any:
    for argument in operator.args:
        if argument.name == name:
            return argument
    return None


def _external_source(operator: Any) -> PipelineTensor:
    name = operator.inst_name or (operator.output[0].name if operator.output else "")
    dtype = _argument(operator, "dtype")
    ndim = _argument(operator, "ndim")
    device = _argument(operator, "device")
    return PipelineTensor(
        name,
        int(dtype.ints[0]) if dtype is not None and dtype.ints else NO_TYPE,
        int(ndim.ints[0]) if ndim is not None and ndim.ints else None,
        str(device.strings[0]) if device is not None and device.strings else "cpu")


def read_pipeline(serialized: bytes) -> PipelineInfo:
    """The declared inputs, outputs and parameters of a serialized pipeline."""
    message = _parse(serialized)
    inputs = [_external_source(op) for op in message.op if op.name == "ExternalSource"]
    inputs += [PipelineTensor(name) for name in message.external_inputs]   # legacy form
    outputs = [PipelineTensor(out.name, out.dtype if out.HasField("dtype") else NO_TYPE,
                              out.ndim if out.HasField("ndim") and out.ndim >= 0 else None,
                              out.device or "cpu")
               for out in message.pipe_outputs]
    return PipelineInfo(tuple(inputs), tuple(outputs), int(message.batch_size),
                        int(message.num_threads or 0),
                        int(message.device_id) if message.HasField("device_id") else 0)


def with_device(serialized: bytes, device_id: int) -> bytes:
    """The same pipeline with another device id (CPU_ONLY_DEVICE_ID: no GPU).

    DALI's ``Pipeline.deserialize(device_id=None)`` keeps the serialized device, so a pipeline
    serialized on a GPU host would ask for CUDA on a CPU instance; Triton's backend passes the
    instance's device instead, and so does this.
    """
    message = _parse(serialized)
    message.device_id = device_id
    return bytes(message.SerializeToString())
