"""Sequences (stateful models): the requests of one sequence with its id and flags set.

    with client.sequence("accumulator") as seq:        # a fresh random uint64 id
        seq.infer({"INPUT": x})                         # sent with sequence_start
        seq.infer({"INPUT": y})
        out = seq.infer({"INPUT": z}, end=True)         # sent with sequence_end

The first request carries ``sequence_start``; ``end=True`` sends ``sequence_end`` and closes
the sequence. A sequence left without END (an exception in the ``with`` block) is left to the
server's idle timeout (``max_sequence_idle_microseconds``). Works over every transport of the
client (gRPC, the local channel); ``AsyncClient.sequence`` gives the awaitable form.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from types import TracebackType
from typing import TYPE_CHECKING

import numpy as np

from shmserve.client._convert import InputValue, Outputs, ParameterValue
from shmserve.client._core import UNSET

if TYPE_CHECKING:
    from shmserve.client._aio import AsyncClient
    from shmserve.client._sync import Client

def new_sequence_id() -> int:
    """A random non-zero uint64 correlation id."""
    return secrets.randbits(63) + 1


class _SequenceState:
    def __init__(self, model: str, sequence_id: int | str | None, version: str) -> None:
        if sequence_id is None:
            sequence_id = new_sequence_id()
        if isinstance(sequence_id, bool) or not isinstance(sequence_id, int | str) or \
                sequence_id in (0, ""):
            raise ValueError("a sequence id is a non-zero integer or a non-empty string")
        self.model = model
        self.sequence_id: int | str = sequence_id
        self.version = version
        self.started = False
        self.ended = False

    def parameters(self, end: bool, extra: Mapping[str, ParameterValue] | None
                   ) -> dict[str, ParameterValue]:
        if self.ended:
            raise ValueError(f"sequence {self.sequence_id} already ended")
        parameters: dict[str, ParameterValue] = dict(extra or {})
        parameters["sequence_id"] = self.sequence_id
        if not self.started:
            parameters["sequence_start"] = True
        if end:
            parameters["sequence_end"] = True
        return parameters

    def sent(self, end: bool) -> None:
        self.started = True
        self.ended = end


class Sequence:
    """The requests of one sequence through a ``Client`` (see the module's docstring)."""

    def __init__(self, client: Client, model: str, sequence_id: int | str | None = None,
                 version: str = "") -> None:
        self._client = client
        self._state = _SequenceState(model, sequence_id, version)

    @property
    def sequence_id(self) -> int | str:
        return self._state.sequence_id

    def infer(self, inputs: Mapping[str, InputValue], outputs: Outputs = None,
              end: bool = False, parameters: Mapping[str, ParameterValue] | None = None,
              timeout: float | None = UNSET) -> dict[str, np.ndarray]:
        """One request of the sequence (the first one starts it; ``end`` ends it)."""
        state = self._state
        request_parameters = state.parameters(end, parameters)
        result = self._client.infer(state.model, inputs, outputs, version=state.version,
                                    parameters=request_parameters, timeout=timeout)
        state.sent(end)
        return result

    def __enter__(self) -> Sequence:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        pass


class AsyncSequence:
    """The requests of one sequence through an ``AsyncClient``."""

    def __init__(self, client: AsyncClient, model: str, sequence_id: int | str | None = None,
                 version: str = "") -> None:
        self._client = client
        self._state = _SequenceState(model, sequence_id, version)

    @property
    def sequence_id(self) -> int | str:
        return self._state.sequence_id

    async def infer(self, inputs: Mapping[str, InputValue], outputs: Outputs = None,
                    end: bool = False, parameters: Mapping[str, ParameterValue] | None = None,
                    timeout: float | None = UNSET) -> dict[str, np.ndarray]:
        state = self._state
        request_parameters = state.parameters(end, parameters)
        result = await self._client.infer(state.model, inputs, outputs, version=state.version,
                                          parameters=request_parameters, timeout=timeout)
        state.sent(end)
        return result

    async def __aenter__(self) -> AsyncSequence:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        pass
