"""The batching policy: which queued requests go to an instance next. Pure: no processes,
no event loop, no clock of its own (the caller passes ``now_ns``).

With ``dynamic_batching`` a batch takes queued requests (oldest first) up to
``max_batch_size``; it is cut to the largest preferred size that fits when the total is not
preferred itself, and a batch that is neither full nor preferred waits up to
``max_queue_delay`` from its oldest request to fill. While the instance is still executing
(``ahead``), only a full batch is sent ahead to it: a partial batch sent early would stop
growing, so requests wait in the queue and the batch forms from everything that arrived
meanwhile once the instance is free. Without dynamic batching every request
is its own execution, but a quick model's requests travel several to a frame
(``requests_per_frame``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

FRAME_WORK_NS = 200_000      # the work one frame holds at most, see requests_per_frame
MAX_FRAME_REQUESTS = 16
TIMED_BEFORE_GROUPING = 8


class Queued(Protocol):
    """What the policy reads of a queued request."""

    @property
    def batch_size(self) -> int: ...

    @property
    def received_ns(self) -> int: ...


class QueueView(Protocol):
    """What the policy reads of the queue (a deque, or queue_policy.PolicyQueue)."""

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[Queued]: ...

    def __getitem__(self, index: int) -> Queued: ...


@dataclass(frozen=True, slots=True)
class BatchPolicy:
    max_batch_size: int          # >= 1
    preferred: tuple[int, ...] = ()
    max_queue_delay_ns: int = 0

    @classmethod
    def from_config(cls, max_batch_size: int, batching: object | None) -> BatchPolicy | None:
        """The policy of a model's ``dynamic_batching`` config; None without one."""
        if batching is None:
            return None
        return cls(max(max_batch_size, 1),
                   tuple(sorted(batching.preferred_batch_size)),  # type: ignore[attr-defined]
                   batching.max_queue_delay_microseconds * 1000)  # type: ignore[attr-defined]

    def next_batch(self, queue: QueueView, now_ns: int, ahead: bool = False
                   ) -> tuple[int, int]:
        """``(count, 0)``: take the ``count`` oldest requests now; ``(0, wait_ns)``: hold them,
        look again in ``wait_ns`` (or when more arrive); ``(0, 0)``: hold them until the
        instance is free (``ahead``: it is still executing). ``queue`` must not be empty."""
        limit = self.max_batch_size
        preferred = self.preferred
        total = 0
        count = 0
        sizes: list[int] = []
        for request in queue:
            if total + request.batch_size > limit:
                break
            total += request.batch_size
            count += 1
            sizes.append(total)
        count = max(count, 1)
        full = total >= limit or count < len(queue)
        if ahead and not full:
            return 0, 0
        if not full and self.max_queue_delay_ns and total not in preferred:
            waited = now_ns - queue[0].received_ns
            if waited < self.max_queue_delay_ns:
                return 0, self.max_queue_delay_ns - waited
        if preferred and total not in preferred:
            best = max((i for i, size in enumerate(sizes) if size in preferred), default=None)
            if best is not None:
                count = best + 1
        return count, 0


def requests_per_frame(executed: int, work_ns: int) -> int:
    """How many requests (each its own execution) one frame carries: as many as keep the
    frame's expected work under FRAME_WORK_NS, so a result is never held back long, given
    ``work_ns`` measured over ``executed`` requests. Until enough were timed, one."""
    if executed < TIMED_BEFORE_GROUPING:
        return 1
    per_request = work_ns // executed
    return max(1, min(MAX_FRAME_REQUESTS, FRAME_WORK_NS // max(per_request, 1)))


def share_among(count: int, queued: int, free_instances: int) -> int:
    """Cut a frame so that what is queued is shared among the free instances."""
    return max(1, min(count, -(-queued // max(free_instances, 1))))
