"""Pure logic of sequence batching: the config's controls and checks (daemon/sequence_config.py)
and the worker's per-sequence implicit state (workers/sequence_state.py). No processes."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format

from shmserve.daemon.model_config import config_to_dict
from shmserve.daemon.sequence_config import (
    SequenceConfigError,
    corrid_bytes,
    corrid_mismatch,
    sequence_plan,
)
from shmserve.protos import shmserve_model_config_pb2 as mc
from shmserve.workers.sequence_state import SequenceStates, StateConfigError, state_specs

CONTROLS = """
  control_input [
    { name: "S" control [ { kind: CONTROL_SEQUENCE_START fp32_false_true: [ 0, 1 ] } ] },
    { name: "E" control [ { kind: CONTROL_SEQUENCE_END int32_false_true: [ 5, 9 ] } ] },
    { name: "R" control [ { kind: CONTROL_SEQUENCE_READY bool_false_true: [ false, true ] } ] },
    { name: "C" control [ { kind: CONTROL_SEQUENCE_CORRID data_type: %s } ] }
  ]
"""


def _config(body: str, max_batch_size: int = 4) -> mc.ModelConfig:
    return text_format.Parse(f'name: "m" max_batch_size: {max_batch_size} '
                             f'sequence_batching {{ {body} }}', mc.ModelConfig())


def test_controls_are_filled_with_the_configured_kinds_and_types() -> None:
    plan = sequence_plan(_config("direct { }" + CONTROLS % "TYPE_UINT64"))
    assert (plan.strategy, plan.slots_per_instance, plan.control_shape) == ("direct", 4, (1, 1))
    assert plan.idle_ns == 1_000_000_000  # Triton's default
    start = {c.name: (c.datatype, c.data) for c in plan.controls(7, True, False)}
    assert start == {"S": ("FP32", struct.pack("<f", 1.0)), "E": ("INT32", struct.pack("<i", 5)),
                     "R": ("BOOL", b"\x01"), "C": ("UINT64", struct.pack("<Q", 7))}
    filler = {c.name: c.data for c in plan.controls(7, True, True, ready=False)}
    assert filler == {"S": struct.pack("<f", 0.0), "E": struct.pack("<i", 5), "R": b"\x00",
                      "C": bytes(8)}
    oldest = sequence_plan(_config("oldest { max_candidate_sequences: 6 }", 0))
    assert (oldest.strategy, oldest.slots_per_instance, oldest.max_batch) == ("oldest", 6, 1)
    assert oldest.control_shape == (1,)


def test_corrid_bytes_and_type_checks() -> None:
    assert corrid_bytes("INT32", 0x1_0000_0002) == struct.pack("<i", 2)
    assert corrid_bytes("BYTES", "ab") == struct.pack("<I", 2) + b"ab"
    assert corrid_bytes("BYTES", 0) == bytes(4)
    string_plan = sequence_plan(_config(CONTROLS % "TYPE_STRING"))
    assert corrid_mismatch(string_plan, "x") is None
    assert corrid_mismatch(string_plan, 3) == ("sequence batching control 'C' data-type is "
                                               "'UINT64', but model 'm' expects 'BYTES'")


@pytest.mark.parametrize(("body", "message"), [
    ('control_input [ { name: "S" control [ { kind: CONTROL_SEQUENCE_START } ] } ]',
     "sequence batching must specify either 'int32_false_true', 'fp32_false_true' or "
     "'bool_false_true' for CONTROL_SEQUENCE_START for m"),
    ('control_input [ { name: "S" control [ { kind: CONTROL_SEQUENCE_END '
     'int32_false_true: [ 1 ] } ] } ]',
     "sequence batching control 'int32_false_true' must have exactly 2 entries for "
     "CONTROL_SEQUENCE_END for m"),
    ('control_input [ { name: "A" control [ { kind: CONTROL_SEQUENCE_READY '
     'int32_false_true: [ 0, 1 ] } ] }, { name: "B" control [ { kind: CONTROL_SEQUENCE_READY '
     'int32_false_true: [ 0, 1 ] } ] } ]',
     "sequence batching specifies multiple CONTROL_SEQUENCE_READY tensors for m"),
    ('control_input [ { name: "C" control [ { kind: CONTROL_SEQUENCE_CORRID '
     'data_type: TYPE_FP32 } ] } ]',
     "unexpected control data type, expected TYPE_UINT64, TYPE_INT64, TYPE_UINT32, "
     "TYPE_INT32, or TYPE_STRING for CONTROL_SEQUENCE_CORRID for m"),
])
def test_bad_controls_are_refused_with_tritons_texts(body: str, message: str) -> None:
    with pytest.raises(SequenceConfigError) as caught:
        sequence_plan(_config(body))
    assert str(caught.value) == message


STATE = """state [ { input_name: "SI" output_name: "SO" data_type: TYPE_INT32 dims: [ -1 ] %s } ]"""


def _states(initial: str = "", max_batch_size: int = 0, model_dir: str = "/nonexistent",
            outputs: str = "") -> SequenceStates:
    config = _config(STATE % initial, max_batch_size)
    if outputs:
        text_format.Parse(outputs, config)
    states = SequenceStates.from_config(config_to_dict(config), model_dir)
    assert states is not None
    return states


def test_state_is_per_sequence_reset_at_start_and_freed_at_end_or_by_the_supervisor() -> None:
    states = _states()
    inputs: dict[str, np.ndarray] = {}
    states.add_inputs(1, {"sequence_start": True}, inputs)
    assert inputs["SI"].tolist() == [0]  # no initial_state: zeros, variable dims 1
    outputs = {"SO": np.array([5, 6], np.int32), "OUT": np.array([1])}
    states.take_outputs(1, {}, [], outputs)
    assert list(outputs) == ["OUT"]  # not a declared output: the client never sees it
    states.add_inputs(2, {"sequence_start": True}, {})
    inputs = {}
    states.add_inputs(1, {}, inputs)
    assert inputs["SI"].tolist() == [5, 6]
    states.take_outputs(1, {}, [], None)  # the request failed: the state stays
    states.add_inputs(1, {"sequence_start": True}, inputs)
    assert inputs["SI"].tolist() == [0]
    states.take_outputs(1, {"sequence_end": True}, [], {"SO": np.array([1], np.int32)})
    assert states.live == 1
    states.end([2, 99])
    assert states.live == 0
    filler: dict[str, np.ndarray] = {}
    states.add_inputs(0, {}, filler)  # a filler: initial state, nothing kept
    states.take_outputs(0, {}, [], {"SO": np.array([3], np.int32)})
    assert states.live == 0


def test_initial_state_from_zero_data_or_a_file(tmp_path: Path) -> None:
    zero = _states('initial_state { data_type: TYPE_INT32 dims: [ 3 ] zero_data: true '
                   'name: "z" }', max_batch_size=2)
    inputs: dict[str, np.ndarray] = {}
    zero.add_inputs(1, {"sequence_start": True}, inputs)
    assert inputs["SI"].shape == (1, 3)
    (tmp_path / "initial_state").mkdir()
    (tmp_path / "initial_state" / "v").write_bytes(np.array([7, 8], np.int32).tobytes())
    from_file = _states('initial_state { data_type: TYPE_INT32 dims: [ 2 ] data_file: "v" '
                        'name: "f" }', model_dir=str(tmp_path),
                        outputs='output [ { name: "SO" data_type: TYPE_INT32 dims: [ 2 ] } ]')
    from_file.add_inputs(1, {"sequence_start": True}, inputs)
    assert inputs["SI"].tolist() == [7, 8]
    outputs = {"SO": np.array([1, 2], np.int32)}
    from_file.take_outputs(1, {}, [], outputs)
    assert "SO" in outputs  # declared and not excluded by the request: the client gets it
    with pytest.raises(StateConfigError, match="initial_state setting expects 12 bytes"):
        state_specs(config_to_dict(_config(STATE % 'initial_state { data_type: TYPE_INT32 '
                                           'dims: [ 3 ] data_file: "v" name: "f" }')),
                    str(tmp_path))
    with pytest.raises(StateConfigError, match="does not match the state data type"):
        state_specs(config_to_dict(_config(STATE % 'initial_state { data_type: TYPE_FP32 '
                                           'dims: [ 3 ] zero_data: true name: "f" }')), "")
