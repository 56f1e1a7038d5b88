"""The internal request every frontend produces and the scheduler consumes."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from shmserve.daemon.shm_registry import Region


@dataclass(slots=True)
class InputTensor:
    name: str
    datatype: str
    shape: list[int]                # as the backend sees it (after reshape)
    data: bytes | memoryview | None  # payload bytes, or None when in a region
    region: Region | None = None
    offset: int = 0                 # inside the region (relative to the registration)
    nbytes: int = 0


@dataclass(slots=True)
class RequestedOutput:
    name: str
    region: Region | None = None
    offset: int = 0
    byte_size: int = 0


@dataclass(slots=True)
class OutputTensor:
    name: str
    datatype: str
    shape: list[int]
    data: bytes | None              # None when written into a client region


# The result a request completes with when its worker answered the client directly.
ANSWERED_DIRECTLY: list[OutputTensor] = []


@dataclass(slots=True)
class InferRequest:
    model: str
    version: int
    request_id: str
    inputs: list[InputTensor]
    outputs: list[RequestedOutput]
    batch_size: int
    future: asyncio.Future[list[OutputTensor]]
    parameters: dict[str, Any] = field(default_factory=dict)
    correlation_id: int | str = 0
    received_ns: int = 0
    regions: list[Region] = field(default_factory=list)
    on_finished: Callable[[InferRequest], None] | None = None
    # Called by the scheduler with the outputs or the error as the request completes (unless
    # its caller gave up): a frontend that answers from here needs no future callback.
    on_result: Callable[[InferRequest, list[OutputTensor] | BaseException], None] | None = None
    # Once sent to a worker: how to withdraw it there if its caller gives up before it runs.
    withdraw: Callable[[], None] | None = None
    # Set by a frontend whose client the worker can answer itself (the local channel): called
    # with the worker about to run the request, it returns the tag the worker answers under,
    # or None (then the scheduler answers, as for any request).
    direct_to: Callable[[Any], list[int] | None] | None = None

    def finished(self) -> None:
        """Release what the request pinned; called once when it completes or is dropped."""
        hook, self.on_finished = self.on_finished, None
        if hook is not None:
            hook(self)
