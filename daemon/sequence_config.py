"""A model's ``sequence_batching`` config: validated (Triton's texts) into a ``SequencePlan``,
which also builds the control input tensors (START, END, READY, CORRID) of each request.

Pure: no processes, no event loop. The scheduling itself is sequence_batcher.py; the implicit
state lives in the worker (workers/sequence_state.py).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from shmserve.protos import shmserve_model_config_pb2 as mc
from shmserve.protos.datatypes import CONFIG_TO_V2

# Triton's default when max_sequence_idle_microseconds is 0 (SEQUENCE_IDLE_DEFAULT_MICROSECONDS).
SEQUENCE_IDLE_DEFAULT_US = 1_000_000

_Control = mc.ModelSequenceBatching.Control
_CORRID_TYPES = (mc.TYPE_UINT64, mc.TYPE_INT64, mc.TYPE_UINT32, mc.TYPE_INT32, mc.TYPE_STRING)
_CORRID_SIZES = {"UINT64": 8, "INT64": 8, "UINT32": 4, "INT32": 4}


class SequenceConfigError(Exception):
    """A sequence_batching section Triton would refuse to load."""


@dataclass(frozen=True, slots=True)
class BoolControl:
    """START, END or READY: one element of ``datatype``, ``false`` or ``true`` bytes."""

    name: str
    datatype: str  # FP32 | INT32 | BOOL
    false: bytes
    true: bytes


@dataclass(frozen=True, slots=True)
class ControlValue:
    """One control input as the worker receives it (always one element per request)."""

    name: str
    datatype: str
    data: bytes


@dataclass(frozen=True, slots=True)
class SequencePlan:
    model: str
    strategy: str                    # "direct" | "oldest"
    slots_per_instance: int          # sequences an instance holds at once
    max_batch: int                   # requests per execution (>= 1)
    control_shape: tuple[int, ...]   # [1] or, for a batching model, [1, 1]
    idle_ns: int
    start: BoolControl | None
    end: BoolControl | None
    ready: BoolControl | None
    corrid: tuple[str, str] | None   # (name, V2 datatype)
    preferred: tuple[int, ...]       # oldest: preferred batch sizes
    max_queue_delay_ns: int
    minimum_slot_utilization: float  # direct
    # iterative_sequence: every request is a sequence of its own (an id and START are given
    # to a request without one), run again each time the model reschedules it, and ended
    # when it completes.
    iterative: bool = False
    stateful: bool = False           # implicit state (``state``): workers keep it per sequence

    def controls(self, correlation_id: int | str, start: bool, end: bool,
                 ready: bool = True) -> list[ControlValue]:
        """The control inputs of one request, as Triton's SetControlTensors fills them; a
        request that is not ready (a slot's filler) has every flag false and CORRID 0."""
        values = []
        for control, on in ((self.start, start and ready), (self.end, end and ready),
                            (self.ready, ready)):
            if control is not None:
                values.append(ControlValue(control.name, control.datatype,
                                           control.true if on else control.false))
        if self.corrid is not None:
            name, datatype = self.corrid
            values.append(ControlValue(name, datatype,
                                       corrid_bytes(datatype, correlation_id if ready else 0)))
        return values


def corrid_bytes(datatype: str, correlation_id: int | str) -> bytes:
    """CORRID's bytes: an integer id little-endian, cut to the datatype's size (Triton copies
    the uint64's first bytes); a string id as one BYTES element (4-byte length, then the
    bytes)."""
    if datatype == "BYTES":
        raw = correlation_id.encode() if isinstance(correlation_id, str) else b""
        return struct.pack("<I", len(raw)) + raw
    value = correlation_id if isinstance(correlation_id, int) else 0
    return (value & 0xFFFF_FFFF_FFFF_FFFF).to_bytes(8, "little")[:_CORRID_SIZES[datatype]]


def corrid_mismatch(plan: SequencePlan, correlation_id: int | str) -> str | None:
    """Triton's ValidateCorrelationId text when the request's id kind does not fit CORRID."""
    if plan.corrid is None:
        return None
    name, datatype = plan.corrid
    if isinstance(correlation_id, str) and datatype != "BYTES":
        given = "BYTES"
    elif isinstance(correlation_id, int) and datatype == "BYTES":
        given = "UINT64"
    else:
        return None
    return (f"sequence batching control '{name}' data-type is '{given}', but model "
            f"'{plan.model}' expects '{datatype}'")


def sequence_plan(config: mc.ModelConfig) -> SequencePlan:
    """The plan of a config with ``sequence_batching``; raises SequenceConfigError."""
    batching = config.sequence_batching
    model = config.name
    max_batch = max(1, config.max_batch_size)
    start = _bool_control(batching, model, _Control.CONTROL_SEQUENCE_START)
    end = _bool_control(batching, model, _Control.CONTROL_SEQUENCE_END)
    ready = _bool_control(batching, model, _Control.CONTROL_SEQUENCE_READY)
    corrid = _typed_control(batching, model, _Control.CONTROL_SEQUENCE_CORRID)
    if corrid is not None and corrid[1] not in _CORRID_TYPES:
        raise SequenceConfigError(
            "unexpected control data type, expected TYPE_UINT64, TYPE_INT64, TYPE_UINT32, "
            f"TYPE_INT32, or TYPE_STRING for CONTROL_SEQUENCE_CORRID for {model}")
    idle_us = batching.max_sequence_idle_microseconds or SEQUENCE_IDLE_DEFAULT_US
    shape = (1, 1) if config.max_batch_size > 0 else (1,)
    if batching.HasField("oldest"):
        oldest = batching.oldest
        preferred = tuple(sorted(oldest.preferred_batch_size)) or (max_batch,)
        return SequencePlan(
            model, "oldest", oldest.max_candidate_sequences or max_batch, max_batch, shape,
            idle_us * 1000, start, end, ready,
            None if corrid is None else (corrid[0], _v2(corrid[1])), preferred,
            oldest.max_queue_delay_microseconds * 1000, 0.0, batching.iterative_sequence,
            len(batching.state) > 0)
    direct = batching.direct
    return SequencePlan(
        model, "direct", max_batch, max_batch, shape, idle_us * 1000, start, end, ready,
        None if corrid is None else (corrid[0], _v2(corrid[1])), (),
        direct.max_queue_delay_microseconds * 1000, direct.minimum_slot_utilization,
        batching.iterative_sequence, len(batching.state) > 0)


def _v2(data_type: int) -> str:
    return CONFIG_TO_V2[mc.DataType.Name(data_type)]


def _kind(kind: int) -> str:
    return str(_Control.Kind.Name(kind))


def _controls_of(batching: mc.ModelSequenceBatching, model: str, kind: int
                 ) -> tuple[str, mc.ModelSequenceBatching.Control] | None:
    """The one control input of ``kind`` (Triton's common checks), or None."""
    seen_names: set[str] = set()
    found: tuple[str, mc.ModelSequenceBatching.Control] | None = None
    for control_input in batching.control_input:
        if not control_input.name:
            raise SequenceConfigError(
                f"sequence batching control tensor must have a name for {model}")
        if control_input.name in seen_names:
            raise SequenceConfigError(
                f"sequence batching control tensor '{control_input.name}' is specified for "
                f"multiple control kinds for {model}")
        seen_names.add(control_input.name)
        for control in control_input.control:
            if control.kind == kind:
                if found is not None:
                    raise SequenceConfigError(
                        f"sequence batching specifies multiple {_kind(kind)} tensors for "
                        f"{model}")
                found = (control_input.name, control)
    return found


def _bool_control(batching: mc.ModelSequenceBatching, model: str, kind: int
                  ) -> BoolControl | None:
    found = _controls_of(batching, model, kind)
    if found is None:
        return None
    name, control = found
    given = [field for field in ("int32_false_true", "fp32_false_true", "bool_false_true")
             if len(getattr(control, field))]
    if not given:
        raise SequenceConfigError(
            f"sequence batching must specify either 'int32_false_true', 'fp32_false_true' or "
            f"'bool_false_true' for {_kind(kind)} for {model}")
    if len(given) > 1:
        raise SequenceConfigError(
            f"sequence batching specifies more than one from 'int32_false_true', "
            f"'fp32_false_true' and 'bool_false_true' for {_kind(kind)} for {model}")
    field = given[0]
    values = list(getattr(control, field))
    if len(values) != 2:
        raise SequenceConfigError(f"sequence batching control '{field}' must have exactly 2 "
                                  f"entries for {_kind(kind)} for {model}")
    if field == "int32_false_true":
        return BoolControl(name, "INT32", struct.pack("<i", values[0]),
                           struct.pack("<i", values[1]))
    if field == "fp32_false_true":
        return BoolControl(name, "FP32", struct.pack("<f", values[0]),
                           struct.pack("<f", values[1]))
    return BoolControl(name, "BOOL", bytes([bool(values[0])]), bytes([bool(values[1])]))


def _typed_control(batching: mc.ModelSequenceBatching, model: str, kind: int
                   ) -> tuple[str, int] | None:
    found = _controls_of(batching, model, kind)
    if found is None:
        return None
    name, control = found
    if len(control.int32_false_true) or len(control.fp32_false_true) or \
            len(control.bool_false_true):
        raise SequenceConfigError(
            f"sequence batching must not specify either 'int32_false_true', 'fp32_false_true' "
            f"or 'bool_false_true' for {_kind(kind)} for {model}")
    return name, control.data_type
