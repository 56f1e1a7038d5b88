"""Implicit state (``sequence_batching.state``): state tensors kept per sequence in the worker.

Each sequence (correlation id) of the instance has its state tensors here. A request gets
them as inputs under each state's ``input_name``; what the model returns under
``output_name`` becomes the state for the sequence's next request (and is taken out of the
response unless the config declares it as an output the client may ask for). The state is
set to its initial value at the sequence's START, dropped after its END, and dropped when
the supervisor ends an idle sequence (``EndSequences``). A request with correlation id 0 is
a filler of an empty slot (direct strategy): it gets an initial state that is not kept.

Initial value (Triton's rules): ``initial_state`` with ``zero_data`` or a ``data_file`` under
the model's ``initial_state/`` folder; without one, zeros with every variable dimension 1.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shmserve.protos.datatypes import CONFIG_TO_V2, deserialize_bytes_tensor, to_numpy_dtype

INITIAL_STATE_FOLDER = "initial_state"


class StateConfigError(Exception):
    """A ``state`` section Triton would refuse to load (Triton's texts)."""


@dataclass(frozen=True, slots=True)
class StateSpec:
    input_name: str
    output_name: str
    initial: np.ndarray  # with the batch dimension of a batching model

    def fresh(self) -> np.ndarray:
        return self.initial.copy()


def state_specs(config: Mapping[str, Any], model_dir: str) -> list[StateSpec]:
    """The states of a config (as Triton's model_config JSON); raises StateConfigError."""
    batching = config.get("sequence_batching") or {}
    batched = int(config.get("max_batch_size", 0) or 0) > 0
    specs: list[StateSpec] = []
    seen: set[str] = set()
    for state in batching.get("state", []) or []:
        input_name = str(state.get("input_name", ""))
        datatype = CONFIG_TO_V2.get(str(state.get("data_type", "TYPE_INVALID")), "")
        dims = [int(d) for d in state.get("dims", [])]
        initials = state.get("initial_state", []) or []
        if len(initials) > 1:
            raise StateConfigError(
                f"initial_state field for state input '{input_name}' must contain exactly one "
                f"or zero element. Found '{len(initials)}' elements.")
        if input_name in seen:
            raise StateConfigError(f"State input name '{input_name}' specified more than once.")
        seen.add(input_name)
        if initials:
            initial = _initial_value(initials[0], state, input_name, datatype, dims, model_dir)
        else:
            initial = _zeros(datatype, [1 if d == -1 else d for d in dims])
        if batched:
            initial = initial.reshape((1, *initial.shape))
        specs.append(StateSpec(input_name, str(state.get("output_name", "")), initial))
    return specs


def _initial_value(initial: Mapping[str, Any], state: Mapping[str, Any], input_name: str,
                   datatype: str, dims: list[int], model_dir: str) -> np.ndarray:
    if initial.get("data_type") != state.get("data_type"):
        raise StateConfigError(f"The data type used for 'initial_state' field of state "
                               f"'{input_name}' does not match the state data type.")
    if not initial.get("name"):
        raise StateConfigError(f"Field 'name' must be set when using initial_state for state "
                               f"input '{input_name}'.")
    shape = [int(d) for d in initial.get("dims", [])]
    if len(shape) != len(dims):
        raise StateConfigError(
            f"Number of dimensions in 'initial_state' doesn't match the size of 'state' "
            f"dimensions for state input '{input_name}'. {len(shape)} != {len(dims)}")
    for have, want in zip(shape, dims, strict=True):
        if have == -1:
            raise StateConfigError(f"'initial_state' field for state input name "
                                   f"'{input_name}' contains variable dimensions.")
        if want != -1 and have != want:
            raise StateConfigError(f"'initial_state' dim for input name '{input_name}' "
                                   f"doesn't match 'state' dim description. {have} != {want}")
    if initial.get("zero_data"):
        return _zeros(datatype, shape)
    data_file = initial.get("data_file")
    if not data_file:
        raise StateConfigError(f"initial_state setting expects state'{input_name}' to have "
                               f"state_data set")
    path = Path(model_dir) / INITIAL_STATE_FOLDER / str(data_file)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise StateConfigError(f"failed to read initial_state data file '{path}': "
                               f"{exc.strerror}") from None
    count = int(np.prod(shape)) if shape else 1
    if datatype == "BYTES":
        try:
            values = deserialize_bytes_tensor(raw, count)
        except ValueError as exc:
            raise StateConfigError(f"initial_state data file '{data_file}' for state input "
                                   f"'{input_name}' is malformed: {exc}") from None
        return np.array(values, dtype=object).reshape(shape)
    dtype = to_numpy_dtype(datatype)
    needed = count * dtype.itemsize
    if needed > len(raw):
        raise StateConfigError(f"initial_state setting expects {needed} bytes, but the data "
                               f"provided from {data_file}only has {len(raw)} bytes.")
    return np.frombuffer(raw[:needed], dtype=dtype).reshape(shape).copy()


def _zeros(datatype: str, shape: list[int]) -> np.ndarray:
    if datatype == "BYTES":
        array = np.empty(shape, dtype=object)
        array.fill(b"")
        return array
    return np.zeros(shape, dtype=to_numpy_dtype(datatype))


class SequenceStates:
    """The live sequences' state tensors of one instance."""

    def __init__(self, specs: list[StateSpec], declared_outputs: Iterable[str]) -> None:
        self._specs = specs
        self._declared = frozenset(declared_outputs)
        self._states: dict[int | str, dict[str, Any]] = {}  # an array, or a torch tensor

    @classmethod
    def from_config(cls, config: Mapping[str, Any], model_dir: str) -> SequenceStates | None:
        specs = state_specs(config, model_dir)
        if not specs:
            return None
        return cls(specs, (str(out.get("name")) for out in config.get("output", [])))

    @property
    def live(self) -> int:
        """Sequences holding state."""
        return len(self._states)

    def add_inputs(self, correlation_id: int | str, parameters: Mapping[str, Any],
                   inputs: dict[str, Any]) -> None:
        """Give a request its sequence's state (the initial one at START or for a filler)."""
        if not correlation_id:
            for spec in self._specs:
                inputs[spec.input_name] = spec.fresh()
            return
        states = self._states.get(correlation_id)
        if states is None or parameters.get("sequence_start"):
            states = self._states[correlation_id] = {spec.output_name: spec.fresh()
                                                     for spec in self._specs}
        for spec in self._specs:
            inputs[spec.input_name] = states[spec.output_name]

    def take_outputs(self, correlation_id: int | str, parameters: Mapping[str, Any],
                     requested: list[str], outputs: dict[str, Any] | None) -> None:
        """Keep what the model returned as the next state (``outputs`` None: the request
        failed, the state stays); drop the sequence's state after its END."""
        states = self._states.get(correlation_id) if correlation_id else None
        if outputs is not None:
            for spec in self._specs:
                name = spec.output_name
                if name not in outputs:
                    continue  # not updated: the previous state stays
                if states is not None:
                    states[name] = _kept(outputs[name])
                if name not in self._declared or (requested and name not in requested):
                    del outputs[name]
        if states is not None and parameters.get("sequence_end"):
            del self._states[correlation_id]

    def end(self, correlation_ids: Iterable[int | str]) -> None:
        """The supervisor ended these sequences (idle): their state goes."""
        for correlation_id in correlation_ids:
            self._states.pop(correlation_id, None)


def _kept(value: Any) -> Any:
    """A copy of a state output to keep: the model's array may be a view of an input or an
    arena. A torch tensor (pytorch backend) stays a tensor on its device."""
    if isinstance(value, np.ndarray):
        return value.copy()
    clone = getattr(value, "clone", None)
    if clone is not None:
        return clone()
    return np.array(value, copy=True)
