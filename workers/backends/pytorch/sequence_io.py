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
from shmserve.workers.sequence_tensors import control_inputs, states

_NAMED_INDEX = re.compile(r"^.+__(\d+)$")


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


def sequence_tensors(config: Mapping[str, Any], model: str) -> SequenceTensors:
    """The control and state tensors of ``config`` (Triton's model_config JSON)."""
    found = SequenceTensors()
    for control in control_inputs(config):
        index = named_index(control.name)
        if index is None:
            raise BackendError(f"input '{control.name}' does not follow <name>__<index> naming "
                               f"convention.", "INVALID_ARGUMENT")
        found.inputs[control.name] = index
        found.input_types[control.name] = CONFIG_TO_V2.get(control.data_type, "")
    declared = states(config)
    if not declared:
        return found
    names = [str(t.get("name", "")) for t in [*config.get("input", []),
                                               *config.get("output", [])]]
    if any(named_index(name) is None for name in names):
        raise BackendError(f"PyTorch model '{model}' is using sequence batching with state but "
                           f"not all inputs and outputs follow the <name>__<index> naming "
                           f"convention. ", "INVALID_ARGUMENT")
    for state in declared:
        for tensor, positions, types in (
                (state.input, found.inputs, found.input_types),
                (state.output, found.state_outputs, found.state_output_types)):
            index = named_index(tensor.name)
            if index is None:
                raise BackendError(f"PyTorch model '{model}' is using sequence batching with "
                                   f"state but state '{tensor.name}' does not follow the "
                                   f"<name>__<index> naming convention. ", "INVALID_ARGUMENT")
            positions[tensor.name] = index
            types[tensor.name] = CONFIG_TO_V2.get(tensor.data_type, "")
    return found
