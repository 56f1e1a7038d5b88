"""The tensors ``sequence_batching`` adds to a model's inputs and outputs, read from its config.

A sequence model's executions get the control inputs the server fills (START, END, READY,
CORRID: daemon/sequence_config.py) and, with implicit ``state``, each state's current value
under its ``input_name``; the model returns the state's next value under its ``output_name``
(workers/sequence_state.py keeps it). Framework backends need the names and types to check the
model file against them and to bind them (onnxruntime, pytorch).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

_BOOL_FIELDS = (("int32_false_true", "TYPE_INT32"), ("fp32_false_true", "TYPE_FP32"),
                ("bool_false_true", "TYPE_BOOL"))


@dataclass(frozen=True, slots=True)
class SequenceTensor:
    name: str
    data_type: str        # the config's name: TYPE_INT32, TYPE_STRING, ...


@dataclass(frozen=True, slots=True)
class StateTensors:
    input: SequenceTensor
    output: SequenceTensor


def control_inputs(config: Mapping[str, Any]) -> list[SequenceTensor]:
    """The control inputs a config declares (Triton's model_config JSON), in its order."""
    batching = config.get("sequence_batching") or {}
    return [SequenceTensor(str(entry.get("name", "")), _control_type(entry))
            for entry in batching.get("control_input") or []]


def states(config: Mapping[str, Any]) -> list[StateTensors]:
    batching = config.get("sequence_batching") or {}
    found = []
    for state in batching.get("state") or []:
        data_type = str(state.get("data_type", "TYPE_INVALID"))
        found.append(StateTensors(SequenceTensor(str(state.get("input_name", "")), data_type),
                                  SequenceTensor(str(state.get("output_name", "")), data_type)))
    return found


def _control_type(control_input: Mapping[str, Any]) -> str:
    for control in control_input.get("control") or []:
        for key, data_type in _BOOL_FIELDS:
            if control.get(key):
                return data_type
        if control.get("kind") == "CONTROL_SEQUENCE_CORRID":
            return str(control.get("data_type", "TYPE_UINT64"))
    return "TYPE_INT32"
