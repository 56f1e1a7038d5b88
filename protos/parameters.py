"""KServe v2 request/tensor parameters (``InferParameter``) <-> Python values."""

from __future__ import annotations

from typing import Any

from shmserve.protos import shmserve_service_pb2 as pb

ParameterValue = bool | int | float | str


def set_parameter(target: pb.InferParameter, value: ParameterValue) -> None:
    """Raises TypeError for values InferParameter cannot hold (it has no bytes field)."""
    if isinstance(value, bool):
        target.bool_param = value
    elif isinstance(value, int):
        target.int64_param = value
    elif isinstance(value, float):
        target.double_param = value
    elif isinstance(value, str):
        target.string_param = value
    else:
        raise TypeError(f"unsupported parameter value {value!r} (use bool, int, float or str)")


def parameter_value(param: pb.InferParameter) -> ParameterValue | None:
    choice = param.WhichOneof("parameter_choice")
    if choice is None:
        return None
    value: ParameterValue = getattr(param, choice)
    return value


def set_region_parameters(parameters: Any, region: str, offset: int, byte_size: int) -> None:
    """A tensor's shared-memory reference, as tritonclient writes it (offset omitted when 0)."""
    parameters["shared_memory_region"].string_param = region
    parameters["shared_memory_byte_size"].int64_param = byte_size
    if offset:
        parameters["shared_memory_offset"].int64_param = offset
