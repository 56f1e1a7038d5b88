"""The batching policy, without processes or an event loop: a fake clock is passed in."""

from __future__ import annotations

from dataclasses import dataclass

from shmserve.daemon.batcher import (
    FRAME_WORK_NS,
    MAX_FRAME_REQUESTS,
    TIMED_BEFORE_GROUPING,
    BatchPolicy,
    requests_per_frame,
    share_among,
)
from shmserve.protos import shmserve_model_config_pb2 as mc

US = 1000


@dataclass
class Queued:
    batch_size: int
    received_ns: int = 0


def queue(*sizes: int, at: int = 0) -> list[Queued]:
    return [Queued(size, at) for size in sizes]


def test_a_batch_takes_requests_up_to_max_batch_size() -> None:
    policy = BatchPolicy(max_batch_size=4)
    assert policy.next_batch(queue(1, 1, 1, 1, 1), now_ns=0) == (4, 0)
    assert policy.next_batch(queue(2, 3, 1), now_ns=0) == (1, 0)   # 2+3 > 4: the rest waits
    assert policy.next_batch(queue(3, 1, 2), now_ns=0) == (2, 0)


def test_a_batch_is_cut_to_the_largest_preferred_size_that_fits() -> None:
    policy = BatchPolicy(max_batch_size=8, preferred=(2, 4))
    assert policy.next_batch(queue(1, 1, 1), now_ns=0) == (2, 0)
    assert policy.next_batch(queue(1, 1, 1, 1, 1), now_ns=0) == (4, 0)
    assert policy.next_batch(queue(3), now_ns=0) == (1, 0)        # no preferred size fits
    assert policy.next_batch(queue(1, 1, 1, 1), now_ns=0) == (4, 0)


def test_a_batch_that_is_neither_full_nor_preferred_waits_up_to_the_queue_delay() -> None:
    policy = BatchPolicy(max_batch_size=8, preferred=(4,), max_queue_delay_ns=100 * US)
    waiting = queue(1, 1, 1, at=1_000 * US)
    assert policy.next_batch(waiting, now_ns=1_040 * US) == (0, 60 * US)
    assert policy.next_batch(waiting, now_ns=1_099 * US) == (0, 1 * US)
    assert policy.next_batch(waiting, now_ns=1_100 * US) == (3, 0)  # the delay passed
    assert policy.next_batch(queue(1, 1, 1, 1, at=1_000 * US), now_ns=1_000 * US) == (4, 0)


def test_a_full_batch_never_waits() -> None:
    policy = BatchPolicy(max_batch_size=2, max_queue_delay_ns=100 * US)
    assert policy.next_batch(queue(1, 1), now_ns=0) == (2, 0)
    assert policy.next_batch(queue(2, 1), now_ns=0) == (1, 0)       # more queued than fits
    assert policy.next_batch(queue(1), now_ns=0) == (0, 100 * US)


def test_the_policy_of_a_model_config() -> None:
    batching = mc.ModelDynamicBatching(preferred_batch_size=[8, 2],
                                       max_queue_delay_microseconds=250)
    assert BatchPolicy.from_config(16, batching) == BatchPolicy(16, (2, 8), 250 * US)
    assert BatchPolicy.from_config(0, batching) == BatchPolicy(1, (2, 8), 250 * US)
    assert BatchPolicy.from_config(16, None) is None


def test_quick_requests_travel_several_to_a_frame_once_timed() -> None:
    assert requests_per_frame(TIMED_BEFORE_GROUPING - 1, 1) == 1
    executed = 100
    assert requests_per_frame(executed, executed * 50 * US) == FRAME_WORK_NS // (50 * US)
    assert requests_per_frame(executed, executed * 1 * US) == MAX_FRAME_REQUESTS
    assert requests_per_frame(executed, executed * 1_000 * US) == 1
    assert requests_per_frame(executed, 0) == MAX_FRAME_REQUESTS


def test_a_frame_leaves_queued_requests_to_other_free_instances() -> None:
    assert share_among(8, queued=5, free_instances=2) == 3
    assert share_among(8, queued=1, free_instances=2) == 1
    assert share_among(2, queued=10, free_instances=2) == 2
    assert share_among(4, queued=10, free_instances=0) == 4


def test_only_a_full_batch_is_sent_ahead_to_a_busy_instance() -> None:
    policy = BatchPolicy(max_batch_size=4, preferred=(4,), max_queue_delay_ns=100 * US)
    # The instance is executing: a partial batch waits for it (no timer: its end re-asks).
    assert policy.next_batch(queue(1, 1), now_ns=0, ahead=True) == (0, 0)
    assert policy.next_batch(queue(1), now_ns=10_000 * US, ahead=True) == (0, 0)
    # A full batch cannot grow any more: it goes ahead.
    assert policy.next_batch(queue(1, 1, 1, 1, 1), now_ns=0, ahead=True) == (4, 0)
    assert policy.next_batch(queue(3, 2), now_ns=0, ahead=True) == (1, 0)
    # Once the instance is free the usual rules apply.
    assert policy.next_batch(queue(1, 1), now_ns=0) == (0, 100 * US)
    assert policy.next_batch(queue(1, 1), now_ns=100 * US) == (2, 0)
