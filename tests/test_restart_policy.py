"""The restart policy and the worker limits, without processes (fake workers from
test_dispatcher): a worker that served is replaced at once, failing starts back off and read
as crash-looping, and the limits come from the settings and a model's parameters."""

from __future__ import annotations

import asyncio

import pytest

from shmserve.daemon.settings import Settings
from shmserve.daemon.worker_limits import (
    EXECUTION_TIMEOUT_PARAMETER,
    INIT_TIMEOUT_PARAMETER,
    LimitError,
    limits_for,
    restart_delay,
)
from shmserve.tests.test_dispatcher import made, replies, request, scheduler, settle


async def _wait_ready(sched: object, seconds: float = 2.0) -> None:
    for _ in range(int(seconds / 0.01)):
        if sched.ready:  # type: ignore[attr-defined]
            return
        await asyncio.sleep(0.01)
    raise TimeoutError("not restarted")


def test_a_worker_that_served_is_replaced_at_once_every_time() -> None:
    async def run() -> None:
        sched = scheduler([])
        await sched.start()
        for round_ in range(6):
            answered = request(round_)
            sched.submit(answered)
            await settle()
            assert replies([answered])[0].outputs is not None
            made[-1].die()
            await settle()  # no backoff sleep: a few loop iterations are enough
            assert sched.ready, round_
            [slot] = sched.instances
            assert slot.failures == 0 and not slot.crash_looping
        assert len(made) == 7
        await sched.stop(1.0)

    asyncio.run(run())


def test_failing_starts_back_off_and_read_as_crash_looping() -> None:
    async def run() -> None:
        sched = scheduler([])
        await sched.start()
        [slot] = sched.instances
        made[-1].die()  # right after start, nothing served: a failing start
        assert slot.failures == 1 and not slot.crash_looping
        await asyncio.sleep(0)
        assert slot.backoff == pytest.approx(0.1) and not sched.ready
        await _wait_ready(sched)
        made[-1].die()
        await asyncio.sleep(0)
        assert slot.failures == 2 and slot.crash_looping and slot.backoff == pytest.approx(0.2)
        reason = sched.crash_loop_reason()
        assert reason.startswith("crash-looping: instance m_0_0 failed 2 starts in a row")
        assert "(1 restart; last exit: was killed)" in reason and "next restart in 0.2s" in reason
        await _wait_ready(sched)
        assert sched.crash_loop_reason() == "" and not slot.crash_looping
        served = request(1)
        sched.submit(served)
        await settle()
        made[-1].die()  # it served: at once, and the count starts over
        await settle()
        assert sched.ready and slot.failures == 0
        await sched.stop(1.0)

    asyncio.run(run())


def test_restart_delays_double_up_to_the_cap() -> None:
    assert [restart_delay(n, 1.0) for n in range(7)] == [0.0, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    assert restart_delay(500, 10.0) == 10.0


def test_limits_come_from_the_settings_and_the_models_parameters() -> None:
    settings = Settings(model_repository="")
    limits = limits_for(settings, {})
    assert (limits.init_timeout_secs, limits.execution_timeout_secs,
            limits.heartbeat_timeout_secs) == (300.0, 0.0, 10.0)
    assert limits.heartbeat_secs <= limits.heartbeat_timeout_secs / 5
    settings = Settings(model_repository="", model_init_timeout_secs=5,
                        model_execution_timeout_secs=2, worker_heartbeat_timeout_secs=1)
    limits = limits_for(settings, {})
    assert (limits.init_timeout_secs, limits.execution_timeout_secs) == (5, 2)
    assert limits.heartbeat_secs == pytest.approx(0.2) and limits.watch_interval <= 0.2
    limits = limits_for(settings, {INIT_TIMEOUT_PARAMETER: "600",
                                   EXECUTION_TIMEOUT_PARAMETER: "0"})
    assert (limits.init_timeout_secs, limits.execution_timeout_secs) == (600, 0)
    for bad in ("soon", "-1", "nan"):
        with pytest.raises(LimitError, match=EXECUTION_TIMEOUT_PARAMETER):
            limits_for(settings, {EXECUTION_TIMEOUT_PARAMETER: bad})
