"""``dynamic_batching { preserve_ordering: true }``: answers leave in the order the requests
were admitted to the model's queue.

Instances finish batches out of order (a second instance, a smaller batch); a client that
sends related requests one after the other on a stream expects their responses in that
order, as Triton's option promises. The scheduler admits every queued request here and, when
one completes, hands over how to answer it: the answer goes out at once when every request
admitted before it was answered, and otherwise waits for them. Statistics are kept at
completion; only the delivery waits. A request whose caller gave up, or that failed, takes
its turn like any other (an error is its answer).

The outputs of a waiting answer own their bytes by then: the dispatcher settles what a reply
did not take out of the worker's arena before it frees the lane (dispatcher.py ``_settle``).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from shmserve.daemon.request import InferRequest


class ResponseOrder:
    def __init__(self) -> None:
        self._admitted: deque[InferRequest] = deque()
        self._waiting: set[int] = set()                   # id() of the admitted ones
        self._ready: dict[int, Callable[[], None]] = {}  # by id(request)

    def admit(self, request: InferRequest) -> None:
        self._admitted.append(request)
        self._waiting.add(id(request))

    def complete(self, request: InferRequest, answer: Callable[[], None]) -> None:
        """``request`` is done: ``answer`` it now, or once the requests before it were (one
        that was never admitted has no turn: answered now)."""
        if id(request) not in self._waiting:
            answer()
            return
        self._ready[id(request)] = answer
        admitted, ready, waiting = self._admitted, self._ready, self._waiting
        while admitted and id(admitted[0]) in ready:
            head = admitted.popleft()
            waiting.discard(id(head))
            ready.pop(id(head))()
