"""How a door answers a request: one reply object per request, handed to the core with it.

The core calls ``send`` with a response (the request's outputs) and ``final`` set on the
last one, or ``fail`` with the error; a request may carry several responses (streaming),
the unary doors take exactly one. A door whose client a worker can answer itself (the local
channel) overrides ``direct_tag``; the dispatcher then calls ``answered_directly`` instead of
``send`` for a request the worker answered.
"""

from __future__ import annotations

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

    def __init__(self) -> None:
        self.request: InferRequest | None = None

    def send(self, response: list[OutputTensor], final: bool) -> None:
        raise NotImplementedError

    def fail(self, error: ServeError) -> None:
        raise NotImplementedError

    def direct_tag(self, worker: DirectTarget) -> list[int] | None:
        """The tag ``worker`` answers this request under, or None: the dispatcher answers."""
        return None

    def answered_directly(self) -> None:
        """The worker delivered the (final) response itself."""
