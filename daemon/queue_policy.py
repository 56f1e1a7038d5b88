"""Dynamic batching's queue policy and priorities (Triton's ``ModelQueuePolicy``). Pure: no
processes, no event loop, no clock of its own (callers pass ``now_ns``).

With ``priority_levels`` each level (1 = most urgent) has its own queue under its own policy
(``priority_queue_policy[level]``, else ``default_queue_policy``); a request's ``priority``
parameter picks the level (0 or past the last level: ``default_priority_level``). Batches take
requests level by level, oldest first. A level's ``max_queue_size`` rejects a request with
Triton's text. A request waiting past its timeout (``default_timeout_microseconds``, or the
request's smaller ``timeout`` parameter with ``allow_timeout_override``) is rejected
("Request timeout expired") with ``timeout_action: REJECT`` or, with ``DELAY``, moved behind
every request of its level that has not timed out.

A model whose policy is the default one (no levels, no timeouts, no override) keeps the plain
FIFO deque in the scheduler: none of this runs per request then.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from shmserve.daemon.errors import ServeError, invalid_argument, unavailable
from shmserve.daemon.request import InferRequest

TIMEOUT_EXPIRED = "Request timeout expired"


def queue_full(request: InferRequest) -> ServeError:
    """Triton's rejection of a request its queue has no room for."""
    return unavailable(f"[request id: {request.request_id or '<id_unknown>'}] "
                       f"Exceeds maximum queue size")


def timeout_expired() -> ServeError:
    return unavailable(TIMEOUT_EXPIRED)


def check_config(batching: Any, model: str) -> str | None:
    """Triton's checks of a ``dynamic_batching`` queue policy (model_config_utils.cc): the
    error text, or None."""
    levels = batching.priority_levels
    if levels == 0:
        return None
    if not 1 <= batching.default_priority_level <= levels:
        return f"default priority level must be in range [1, {levels}] for {model}"
    for level in batching.priority_queue_policy:
        if not 1 <= level <= levels:
            return (f"priority queue policy must have priority level in range [1, {levels}] "
                    f"for {model}")
    return None


@dataclass(frozen=True, slots=True)
class LevelPolicy:
    delay: bool             # timeout_action DELAY (else REJECT)
    timeout_ns: int         # default_timeout_microseconds, in ns (0: none)
    allow_override: bool    # a request's smaller ``timeout`` wins
    max_size: int           # max_queue_size (0: no limit)

    @classmethod
    def from_config(cls, policy: Any) -> LevelPolicy:
        return cls(policy.timeout_action == 1, policy.default_timeout_microseconds * 1000,
                   policy.allow_timeout_override, policy.max_queue_size)

    def deadline(self, request: InferRequest, now_ns: int) -> int:
        """When ``request`` (queued at ``now_ns``) times out; 0: never. As Triton: a request's
        timeout counts only below the default one."""
        timeout = self.timeout_ns
        if self.allow_override:
            wanted = request_timeout_us(request) * 1000
            if wanted and wanted < timeout:
                timeout = wanted
        return now_ns + timeout if timeout else 0


@dataclass(frozen=True, slots=True)
class QueuePolicy:
    levels: int                         # priority_levels (0: one level)
    default_level: int
    default: LevelPolicy
    per_level: dict[int, LevelPolicy]

    @classmethod
    def from_config(cls, batching: Any) -> QueuePolicy | None:
        """The policy of a ``dynamic_batching`` config; None when it is Triton's default (the
        scheduler's plain FIFO queue and its max_queue_size check do then)."""
        if batching is None:
            return None
        default = LevelPolicy.from_config(batching.default_queue_policy)
        if not batching.priority_levels and not default.timeout_ns and \
                not default.allow_override:
            return None
        return cls(batching.priority_levels, batching.default_priority_level, default,
                   {level: LevelPolicy.from_config(policy)
                    for level, policy in batching.priority_queue_policy.items()})

    def level_of(self, request: InferRequest) -> int:
        priority = _int_parameter(request, "priority", "int64_param or uint64_param")
        if priority <= 0 or priority > self.levels:
            return self.default_level if self.levels else 0
        return priority

    def policy_of(self, level: int) -> LevelPolicy:
        return self.per_level.get(level, self.default)


def request_timeout_us(request: InferRequest) -> int:
    return _int_parameter(request, "timeout", "int64_param")


def _int_parameter(request: InferRequest, name: str, expected: str) -> int:
    value = request.parameters.get(name, 0)
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid_argument(f"invalid value type for '{name}' parameter, expected "
                               f"{expected}.")
    return value


class _Level:
    __slots__ = ("delayed", "policy", "waiting")

    def __init__(self, policy: LevelPolicy) -> None:
        self.policy = policy
        self.waiting: deque[InferRequest] = deque()
        self.delayed: deque[InferRequest] = deque()  # timed out under DELAY: after the rest

    def __len__(self) -> int:
        return len(self.waiting) + len(self.delayed)


class PolicyQueue:
    """The scheduler's queue under a ``QueuePolicy``: what a deque offers the scheduler and
    the batching policy (append, popleft, len, iteration in batching order, [0])."""

    def __init__(self, policy: QueuePolicy) -> None:
        self.policy = policy
        self._levels: dict[int, _Level] = {}
        self._order: list[int] = []      # levels that have a queue, most urgent first
        self._size = 0
        # (deadline, tie, request, level) of requests that may time out; stale ones (sent,
        # delayed, dropped) are skipped when they come up.
        self._deadlines: list[tuple[int, int, InferRequest, int]] = []
        self._timing: set[int] = set()   # id() of waiting requests that have a deadline
        self._tie = itertools.count()

    def __len__(self) -> int:
        return self._size

    def __bool__(self) -> bool:
        return self._size > 0

    def __iter__(self) -> Iterator[InferRequest]:
        for level in self._order:
            queue = self._levels[level]
            yield from queue.waiting
            yield from queue.delayed

    def __getitem__(self, index: int) -> InferRequest:
        for position, request in enumerate(self):
            if position == index:
                return request
        raise IndexError(index)

    def append(self, request: InferRequest, now_ns: int) -> None:
        """Queue ``request`` at its level. Raises ServeError: a malformed ``priority`` or
        ``timeout`` parameter, or its level's queue is full."""
        level = self.policy.level_of(request)
        queue = self._levels.get(level)
        if queue is None:
            queue = self._levels[level] = _Level(self.policy.policy_of(level))
            self._order.append(level)
            self._order.sort()
        policy = queue.policy
        if policy.max_size and len(queue) >= policy.max_size:
            raise queue_full(request)
        deadline = policy.deadline(request, now_ns)
        queue.waiting.append(request)
        self._size += 1
        if deadline:
            self._timing.add(id(request))
            heapq.heappush(self._deadlines, (deadline, next(self._tie), request, level))

    def popleft(self) -> InferRequest:
        for level in self._order:
            queue = self._levels[level]
            if queue.waiting:
                request = queue.waiting.popleft()
                self._timing.discard(id(request))
            elif queue.delayed:
                request = queue.delayed.popleft()
            else:
                continue
            self._size -= 1
            return request
        raise IndexError("pop from an empty queue")

    def next_deadline(self) -> int:
        """When the earliest waiting request times out (0: none does)."""
        deadlines = self._deadlines
        while deadlines and id(deadlines[0][2]) not in self._timing:
            heapq.heappop(deadlines)
        return deadlines[0][0] if deadlines else 0

    def expire(self, now_ns: int) -> list[InferRequest]:
        """Apply the timeouts due by ``now_ns``: DELAY moves a request behind its level, REJECT
        takes it out; returns the rejected ones (the caller answers them)."""
        expired: dict[int, set[int]] = {}
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] < now_ns:
            _, _, request, level = heapq.heappop(deadlines)
            if id(request) in self._timing and not request.cancelled:
                self._timing.discard(id(request))
                expired.setdefault(level, set()).add(id(request))
        rejected: list[InferRequest] = []
        for level, ids in expired.items():
            queue = self._levels[level]
            kept: deque[InferRequest] = deque()
            for request in queue.waiting:
                if id(request) not in ids:
                    kept.append(request)
                elif queue.policy.delay:
                    queue.delayed.append(request)
                else:
                    rejected.append(request)
                    self._size -= 1
            queue.waiting = kept
        return rejected

    def drop_cancelled(self) -> list[InferRequest]:
        """Take out the requests whose caller gave up; returns them."""
        dropped: list[InferRequest] = []
        for queue in self._levels.values():
            for name in ("waiting", "delayed"):
                requests: deque[InferRequest] = getattr(queue, name)
                if any(request.cancelled for request in requests):
                    dropped.extend(r for r in requests if r.cancelled)
                    setattr(queue, name, deque(r for r in requests if not r.cancelled))
        for request in dropped:
            self._timing.discard(id(request))
        self._size -= len(dropped)
        return dropped


def drop_cancelled(queue: deque[InferRequest] | PolicyQueue) -> list[InferRequest]:
    """Take the requests whose caller gave up out of a scheduler's queue (in place)."""
    if isinstance(queue, PolicyQueue):
        return queue.drop_cancelled()
    dropped = [request for request in queue if request.cancelled]
    if dropped:
        kept = [request for request in queue if not request.cancelled]
        queue.clear()
        queue.extend(kept)
    return dropped
