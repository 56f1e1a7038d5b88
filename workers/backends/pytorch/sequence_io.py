"""The tensors ``sequence_batching`` adds to a TorchScript model's ``forward``, by Triton's rules.

Triton's PyTorch backend passes a sequence model's control inputs (START, END, READY, CORRID)
and its implicit-state inputs to ``forward`` next to the config's inputs, and takes each
state's new value from the returned tuple:

* a control input must be named ``<name>__<index>``; ``index`` is its argument position;
* a model with ``state`` must name every input, output and state ``<name>__<index>``; a state's
  ``input_name`` gives its argument position, its ``output_name`` its place in the returned
  tuple.

The server fills the control tensors (daemon/sequence_config.py) and keeps the state per
sequence (workers/sequence_state.py); this module only says where they go.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from shmserve.protos.datatypes import CONFIG_TO_V2
from shmserve.workers.backend import BackendError

_NAMED_INDEX = re.compile(r"^.+__(\d+)$")
_BOOL_FIELDS = (("int32_false_true", "INT32"), ("fp32_false_true", "FP32"),
                ("bool_false_true", "BOOL"))


def named_index(name: str) -> int | None:
    """The index of a ``<name>__<index>`` name; None for any other name."""
    match = _NAMED_INDEX.match(name)
    return int(match.group(1)) if match else None


@dataclass(frozen=True, slots=True)
class SequenceTensors:
    """What a sequence model's ``forward`` takes and returns beyond the config's tensors."""

    inputs: dict[str, int] = field(default_factory=dict)         # name -> argument position
    input_types: dict[str, str] = field(default_factory=dict)    # name -> V2 datatype
    state_outputs: dict[str, int] = field(default_factory=dict)  # name -> tuple position
    state_output_types: dict[str, str] = field(default_factory=dict)

    @property
    def has_state(self) -> bool:
        return bool(self.state_outputs)


def sequence_tensors(config: Mapping[str, Any], model: str) -> SequenceTensors:
    """The control and state tensors of ``config`` (Triton's model_config JSON)."""
    batching = config.get("sequence_batching")
    if not batching:
        return SequenceTensors()
    found = SequenceTensors()
    for control_input in batching.get("control_input") or []:
        name = str(control_input.get("name", ""))
        index = named_index(name)
        if index is None:
            raise BackendError(f"input '{name}' does not follow <name>__<index> naming "
                               f"convention.", "INVALID_ARGUMENT")
        found.inputs[name] = index
        found.input_types[name] = _control_datatype(control_input)
    states = batching.get("state") or []
    if not states:
        return found
    names = [str(t.get("name", "")) for t in [*config.get("input", []),
                                               *config.get("output", [])]]
    if any(named_index(name) is None for name in names):
        raise BackendError(f"PyTorch model '{model}' is using sequence batching with state but "
                           f"not all inputs and outputs follow the <name>__<index> naming "
                           f"convention. ", "INVALID_ARGUMENT")
    for state in states:
        datatype = CONFIG_TO_V2.get(str(state.get("data_type", "")), "")
        for key, positions, types in (("input_name", found.inputs, found.input_types),
                                      ("output_name", found.state_outputs,
                                       found.state_output_types)):
            name = str(state.get(key, ""))
            index = named_index(name)
            if index is None:
                raise BackendError(f"PyTorch model '{model}' is using sequence batching with "
                                   f"state but state '{name}' does not follow the "
                                   f"<name>__<index> naming convention. ", "INVALID_ARGUMENT")
            positions[name] = index
            types[name] = datatype
    return found


def _control_datatype(control_input: Mapping[str, Any]) -> str:
    for control in control_input.get("control") or []:
        for key, datatype in _BOOL_FIELDS:
            if control.get(key):
                return datatype
        if control.get("kind") == "CONTROL_SEQUENCE_CORRID":
            return CONFIG_TO_V2.get(str(control.get("data_type", "")), "UINT64")
    return "INT32"
