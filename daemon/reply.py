"""How a door answers a request: one reply object per request, handed to the core with it.

The core calls ``send`` with a response (the request's outputs) and ``final`` set on the
last one, or ``fail`` with the error; a request of a decoupled model may carry any number of
responses and error responses (``send_error``), and its final flag may come alone
(``end``). The unary doors take exactly one response. A door whose client a worker can
answer itself (the local channel) overrides ``direct_tag``; the dispatcher then calls
``answered_directly`` instead of ``send`` for a request the worker answered.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from shmserve.daemon.errors import ServeError
    from shmserve.daemon.request import InferRequest, OutputTensor


class DirectTarget(Protocol):
    """What a door sees of the worker that may answer its client directly."""

    @property
    def alive(self) -> bool: ...

    def attach_channel(self, channel_id: int, memfd: int, client_socket: int,
                       ring_base: int, ring_capacity: int) -> bool: ...

    def detach_channel(self, channel_id: int) -> None: ...


class Reply:
    """Base of every door's reply; ``request`` is set by the core when it accepts the request."""

    __slots__ = ("request",)
    # True on a reply whose client a worker may answer itself (see ``direct_tag``).
    direct = False
    # True on a reply that wants its request's compute durations (``computed``).
    records_compute = False

    def __init__(self) -> None:
        self.request: InferRequest | None = None

    def send(self, response: list[OutputTensor], final: bool) -> None:
        raise NotImplementedError

    def computed(self, input_ns: int, infer_ns: int, output_ns: int) -> None:
        """The compute durations of the execution that ran the request (before ``send``);
        called only when ``records_compute``."""

    def end(self) -> None:
        """A decoupled request's final flag, alone (no response with it). Doors that take
        one response never see it: the request ended without one."""
        from shmserve.daemon.errors import internal
        self.fail(internal("the model sent no response for the request"))

    def fail(self, error: ServeError) -> None:
        """The request failed: no response follows."""
        raise NotImplementedError

    def send_error(self, error: ServeError, final: bool) -> None:
        """An error response of a decoupled request; more may follow unless ``final``.
        Doors that take one response treat it as the failure."""
        self.fail(error)

    def prepare(self, response: list[OutputTensor]) -> None:
        """Called on a thread, before ``send``, for a response with large outputs: copy them
        out of the worker's arena (``OutputTensor``), into bytes unless the door has a
        better place. Touches nothing but the response (and the door's own reply)."""
        for output in response:
            output.settle()

    def direct_tag(self, worker: DirectTarget) -> list[int] | None:
        """The tag ``worker`` answers this request under, or None: the dispatcher answers."""
        return None

    def answered_directly(self) -> None:
        """The worker delivered the (final) response itself."""


class FutureReply(Reply):
    """A unary door's reply: the one response (or the error) completes an awaited future."""

    __slots__ = ("future",)

    def __init__(self, future: asyncio.Future[list[OutputTensor]]) -> None:
        self.request = None
        self.future = future

    def send(self, response: list[OutputTensor], final: bool) -> None:
        if not self.future.done():  # done: the caller gave up meanwhile
            self.future.set_result(response)

    def fail(self, error: ServeError) -> None:
        if not self.future.done():
            self.future.set_exception(error)
