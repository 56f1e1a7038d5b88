"""Validating an inference request against its model's config, whichever door parsed it.

A door turns its wire format into ``RequestItems`` (gRPC: frontend/infer_grpc.py, the local
channel: frontend/local.py) and the core's ``build_request`` checks them, in Triton's order
and with Triton's texts, into the ``InferRequest`` the scheduler runs. What a door finds
wrong while parsing (malformed shared-memory parameters, missing raw contents) travels as a
``fault`` and is raised where Triton would report it, so error precedence does not depend on
the transport.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from shmserve.daemon.errors import ServeError, invalid_argument
from shmserve.daemon.models import ModelVersion
from shmserve.daemon.reply import Reply
from shmserve.daemon.request import InferRequest, InputTensor, RequestedOutput, ResponseRing
from shmserve.daemon.shm_registry import Region, ShmRegistry
from shmserve.protos import shmserve_model_config_pb2 as mc
from shmserve.protos.datatypes import (
    CONFIG_TO_V2,
    ELEMENT_SIZE,
    MAX_BYTES_ELEMENTS,
    deserialize_bytes_tensor,
    element_count,
)
from shmserve.protos.response_ring import OFFSET as RING_OFFSET
from shmserve.protos.response_ring import REGION as RING_REGION
from shmserve.protos.response_ring import SLOT_BYTES as RING_SLOT_BYTES
from shmserve.protos.response_ring import SLOTS as RING_SLOTS
from shmserve.protos.response_ring import ring_bytes
from shmserve.workers.shm import Pieces

ShmRef = tuple[str, int, int]  # (region name, offset, byte size)
ParamT = TypeVar("ParamT")
SHM_KEYS = ("shared_memory_region", "shared_memory_offset", "shared_memory_byte_size")
SHM_USAGE = "'shared_memory_byte_size' must be specified along with 'shared_memory_region'"


def shm_reference(params: Mapping[str, ParamT], what: str,
                  region_of: Callable[[ParamT], str | None], string_kind: str,
                  int_of: Callable[[ParamT], int | None], int_kind: str) -> ShmRef | None:
    """(region, offset, byte_size) from a tensor's parameters, or None; every door's rules.

    A door says how to read its own parameter values (``region_of``/``int_of`` give None for
    a value of the wrong kind, named ``string_kind``/``int_kind`` in the error). Every
    malformed combination gets Triton's one message, with what was wrong appended.
    """
    present = [key for key in SHM_KEYS if key in params]
    if not present:
        return None
    if "shared_memory_region" not in params:
        raise invalid_argument(f"{SHM_USAGE} for {what}: got {', '.join(present)} without "
                               f"'shared_memory_region'")
    if "shared_memory_byte_size" not in params:
        raise invalid_argument(f"{SHM_USAGE} for {what}")
    region = region_of(params["shared_memory_region"])
    if region is None:
        raise invalid_argument(f"{SHM_USAGE} for {what}: 'shared_memory_region' must be "
                               f"{string_kind}")
    values = []
    for key in ("shared_memory_offset", "shared_memory_byte_size"):
        value = int_of(params[key]) if key in params else 0
        if value is None:
            raise invalid_argument(f"{SHM_USAGE} for {what}: '{key}' must be {int_kind}")
        values.append(value)
    return region, values[0], values[1]


@dataclass(slots=True)
class TensorIn:
    """One input as a frontend received it."""

    name: str
    datatype: str
    shape: list[int]
    data: bytes | memoryview | Pieces | None = None  # the tensor bytes, unless in a region
    shm: ShmRef | None = None
    fault: ServeError | None = None         # found while parsing; raised after shape checks


@dataclass(slots=True)
class OutputIn:
    """One requested output as a frontend received it."""

    name: str
    shm: ShmRef | None = None
    fault: ServeError | None = None         # raised once the name is known to be valid
    # The worker may answer it as a reference to the input it passes through instead of
    # writing it into ``shm`` (honoured only for a server region: ensemble intermediates).
    by_reference: bool = False
    class_count: int = 0                    # classification: answer its top entries


@dataclass(slots=True)
class RequestItems:
    """A request as a door parsed it, before validation."""

    inputs: list[TensorIn]
    outputs: list[OutputIn]
    parameters: dict[str, Any]
    request_id: str
    owner: str                              # whose regions it may use ("" = anonymous)
    late_fault: ServeError | None = None    # raised after the inputs were checked
    internal: Mapping[str, Region] | None = None  # server regions it may use (ensembles)


@dataclass(slots=True, frozen=True)
class InputPlan:
    datatype: str
    dims: list[int]
    wildcard: bool                          # some dim is -1
    element_size: int                       # -1 for BYTES
    reshape: list[int] | None


@dataclass(slots=True, frozen=True)
class ModelPlan:
    """What validation needs from a model config, looked up once per loaded version."""

    name: str
    max_batch: int
    inputs: dict[str, InputPlan]
    required: list[str]
    outputs: frozenset[str]


def config_datatype(data_type: int) -> str:
    return CONFIG_TO_V2[mc.DataType.Name(data_type)]


def model_plan(model: ModelVersion) -> ModelPlan:
    plan = model.validation_plan
    if plan is None:
        plan = model.validation_plan = _make_plan(model.name, model.config)
    assert isinstance(plan, ModelPlan)
    return plan


def _make_plan(name: str, config: mc.ModelConfig) -> ModelPlan:
    inputs = {}
    for tensor in config.input:
        datatype = config_datatype(tensor.data_type)
        dims = list(tensor.dims)
        inputs[tensor.name] = InputPlan(
            datatype, dims, -1 in dims, ELEMENT_SIZE.get(datatype, -1),
            list(tensor.reshape.shape) if tensor.HasField("reshape") else None)
    required = [tensor.name for tensor in config.input if not tensor.optional]
    return ModelPlan(name, config.max_batch_size, inputs, required,
                     frozenset(tensor.name for tensor in config.output))


def build_request(model: ModelVersion, registry: ShmRegistry, items: RequestItems,
                  reply: Reply) -> InferRequest:
    """Validate a request against the model's config; pins the regions it references.

    ``items.late_fault`` is raised after the inputs were checked and before the outputs are.
    """
    regions: list[Region] = []
    owner = items.owner
    try:
        plan = model_plan(model)
        tensors, batch_size = _inputs(plan, registry, items.inputs, regions, owner,
                                      items.internal)
        if items.late_fault is not None:
            raise items.late_fault
        requested = _outputs(plan, registry, items.outputs, regions, owner, items.internal)
        ring = _response_ring(registry, items.parameters, regions, owner) \
            if items.parameters and RING_REGION in items.parameters else None
    except BaseException:
        for region in regions:
            registry.release(region)
        raise
    parameters = items.parameters
    sequence_id = parameters.get("sequence_id", 0)
    correlation = sequence_id if isinstance(sequence_id, int | str) else 0
    request = InferRequest(plan.name, model.version, items.request_id, tensors, requested,
                           batch_size, reply, parameters, correlation, 0, regions)
    if ring is not None:
        request.ring = ring
    return request


def _response_ring(registry: ShmRegistry, parameters: Mapping[str, Any],
                   regions: list[Region], owner: str) -> ResponseRing:
    """The response ring the request's parameters name; pins its region."""
    name = parameters[RING_REGION]
    values = [parameters.get(key, 0) for key in (RING_OFFSET, RING_SLOT_BYTES, RING_SLOTS)]
    if type(name) is not str or not all(type(value) is int for value in values):
        raise invalid_argument(f"'{RING_REGION}' must be a string and '{RING_OFFSET}', "
                               f"'{RING_SLOT_BYTES}', '{RING_SLOTS}' integers")
    offset, slot_bytes, slots = values
    if slot_bytes <= 0 or slot_bytes % 64 or slots <= 0 or offset % 8:
        raise invalid_argument(f"a response ring needs '{RING_SLOTS}' > 0, "
                               f"'{RING_SLOT_BYTES}' a positive multiple of 64 and an "
                               f"'{RING_OFFSET}' aligned to 8 bytes")
    region = registry.acquire(name, offset, ring_bytes(slot_bytes, slots), owner)
    regions.append(region)
    if region.kind != "system":
        raise invalid_argument(f"a response ring must be in a system shared memory region, "
                               f"not '{name}'")
    return ResponseRing(region, offset, slot_bytes, slots)


def _inputs(plan: ModelPlan, registry: ShmRegistry, inputs: list[TensorIn],
            regions: list[Region], owner: str,
            internal: Mapping[str, Region] | None) -> tuple[list[InputTensor], int]:
    name = plan.name
    configured = plan.inputs
    given = [tensor.name for tensor in inputs]
    unknown = [n for n in given if n not in configured]
    if unknown:
        raise invalid_argument(f"unexpected inference input '{unknown[0]}' for model '{name}'")
    missing = [n for n in plan.required if n not in given]
    if missing:
        raise invalid_argument(
            f"expected {len(plan.required)} inputs but got {len(given)} inputs for model "
            f"'{name}'. Got input(s) {given}, but missing required input(s) {missing}. Please "
            f"provide all required input(s).")
    if len(set(given)) != len(given):
        raise invalid_argument(f"input names must be unique in a request for model '{name}'")
    batch_size: int | None = None
    tensors: list[InputTensor] = []
    for tensor in inputs:
        spec = configured[tensor.name]
        if tensor.datatype != spec.datatype:
            raise invalid_argument(
                f"inference input '{tensor.name}' data-type is '{tensor.datatype}', but model "
                f"'{name}' expects '{spec.datatype}'")
        shape, this_batch = _check_shape(tensor.name, name, spec, tensor.shape, plan.max_batch)
        if batch_size is None:
            batch_size = this_batch
        elif this_batch != batch_size:
            raise invalid_argument(f"input '{tensor.name}' batch size does not match other "
                                   f"inputs for '{name}'")
        if tensor.fault is not None:
            raise tensor.fault
        fixed = spec.element_size > 0
        expected_bytes = spec.element_size * element_count(tensor.shape) if fixed else -1
        if tensor.shm is not None:
            region_name, offset, byte_size = tensor.shm
            region = registry.acquire(region_name, offset, byte_size, owner, internal)
            regions.append(region)
            if fixed and byte_size != expected_bytes:
                raise _byte_size_mismatch(tensor.name, name, expected_bytes, byte_size)
            tensors.append(InputTensor(tensor.name, spec.datatype, shape, None, region, offset,
                                       byte_size))
            continue
        data = tensor.data
        assert data is not None
        if fixed and len(data) != expected_bytes:
            raise _byte_size_mismatch(tensor.name, name, expected_bytes, len(data))
        if not fixed:
            _check_bytes_tensor(tensor.name, name, data, element_count(tensor.shape))
        tensors.append(InputTensor(tensor.name, spec.datatype, shape, data, None, 0, len(data)))
    return tensors, batch_size or 1


def _check_shape(tensor: str, model: str, spec: InputPlan, shape: list[int],
                 max_batch: int) -> tuple[list[int], int]:
    dims = spec.dims
    batch = 1
    body = shape
    if max_batch > 0:
        if not shape:
            raise _shape_error(tensor, model, spec, max_batch, shape)
        batch, body = shape[0], shape[1:]
        if batch > max_batch:
            raise invalid_argument(f"inference request batch-size must be <= {max_batch} for "
                                   f"'{model}'")
        if batch < 1:
            raise _shape_error(tensor, model, spec, max_batch, shape)
    reshape = spec.reshape
    if reshape is None and not spec.wildcard:
        if body != dims:
            raise _shape_error(tensor, model, spec, max_batch, shape)
        return shape, batch
    if reshape is not None:
        if element_count(body) != element_count(d for d in reshape if d > 0) and \
                -1 not in reshape and not spec.wildcard:
            raise _shape_error(tensor, model, spec, max_batch, shape)
    if len(body) != len(dims) or any(d != -1 and d != s for d, s in zip(dims, body, strict=True)):
        raise _shape_error(tensor, model, spec, max_batch, shape)
    if any(s < 0 for s in shape):
        raise _shape_error(tensor, model, spec, max_batch, shape)
    if reshape is not None:
        reshaped = reshape
        if -1 in reshaped:
            known = element_count(d for d in reshaped if d != -1) or 1
            reshaped = [element_count(body) // known if d == -1 else d for d in reshaped]
        body = reshaped
    return ([batch, *body] if max_batch > 0 else list(body)), batch


def _shape_error(tensor: str, model: str, spec: InputPlan, max_batch: int,
                 got: list[int]) -> ServeError:
    expected = [-1, *spec.dims] if max_batch > 0 else spec.dims
    return invalid_argument(f"unexpected shape for input '{tensor}' for model '{model}'. "
                            f"Expected {_dims_text(expected)}, got {_dims_text(got)}")


def _dims_text(dims: list[int]) -> str:
    return "[" + ",".join(str(d) for d in dims) + "]"


def _byte_size_mismatch(tensor: str, model: str, expected: int, got: int) -> ServeError:
    return invalid_argument(f"input byte size mismatch for input '{tensor}' for model "
                            f"'{model}'. Expected {expected}, got {got}")


# BYTES payloads up to this size are parsed here; larger ones get O(1) checks here and are
# parsed by the worker (the event loop never walks millions of elements).
BYTES_CHECKED_ON_LOOP = 64 << 10


def _check_bytes_tensor(tensor: str, model: str, data: bytes | memoryview | Pieces,
                        count: int) -> None:
    if count > MAX_BYTES_ELEMENTS:
        raise invalid_argument(f"BYTES input '{tensor}' for model '{model}' has {count} "
                               f"elements, more than the {MAX_BYTES_ELEMENTS} allowed per tensor")
    try:
        if len(data) <= BYTES_CHECKED_ON_LOOP:
            deserialize_bytes_tensor(bytes(data) if isinstance(data, Pieces) else data, count)
        elif len(data) < 4 * count:
            raise ValueError(f"expected {count} elements, found fewer")
    except ValueError as exc:
        raise invalid_argument(f"malformed BYTES data for inference input '{tensor}' for model "
                               f"'{model}': {exc}") from None


def _outputs(plan: ModelPlan, registry: ShmRegistry, outputs: list[OutputIn],
             regions: list[Region], owner: str,
             internal: Mapping[str, Region] | None) -> list[RequestedOutput]:
    requested: list[RequestedOutput] = []
    for output in outputs:
        if output.name not in plan.outputs:
            raise invalid_argument(f"unexpected inference output '{output.name}' for model "
                                   f"'{plan.name}'")
        if output.fault is not None:
            raise output.fault
        if output.shm is None:
            requested.append(RequestedOutput(output.name, class_count=output.class_count))
            continue
        region_name, offset, byte_size = output.shm
        region = registry.acquire(region_name, offset, byte_size, owner, internal)
        regions.append(region)
        by_reference = output.by_reference and internal is not None and region_name in internal
        requested.append(RequestedOutput(output.name, region, offset, byte_size, by_reference))
    return requested
