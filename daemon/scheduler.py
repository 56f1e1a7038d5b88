"""Per model version scheduling: one queue, fed by the core, drained into the dispatcher.

The scheduler admits requests (queue limit, unloading), asks the batching policy
(batcher.py) what to send next, hands batches to the dispatcher (dispatcher.py: instances,
lanes, staging, restarts), keeps the version's statistics and answers each request through
its reply once the dispatcher reports it done.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from shmserve.daemon.batcher import BatchPolicy, requests_per_frame, share_among
from shmserve.daemon.dispatcher import Dispatcher, InstanceSlot, WorkerFactory
from shmserve.daemon.errors import ServeError, internal, unavailable
from shmserve.daemon.latency_metrics import instrument, options_from
from shmserve.daemon.model_config import InstancePlan
from shmserve.daemon.queue_policy import (
    PolicyQueue,
    QueuePolicy,
    drop_cancelled,
    queue_full,
    timeout_expired,
)
from shmserve.daemon.rate_limiter import RateLimiter
from shmserve.daemon.request import InferRequest, OutputTensor
from shmserve.daemon.response_order import ResponseOrder
from shmserve.daemon.sequence_batcher import SequenceBatcher
from shmserve.daemon.sequence_config import SequencePlan
from shmserve.daemon.settings import Settings
from shmserve.daemon.statistics import ModelStats
from shmserve.daemon.worker_limits import WorkerLimits
from shmserve.workers.protocol import WorkerSpec

log = logging.getLogger("shmserve.scheduler")


class Scheduler:
    def __init__(self, model: str, version: int, max_batch_size: int, batching: Any,
                 plans: list[InstancePlan],
                 make_spec: Callable[[InstancePlan, str, int], WorkerSpec],
                 settings: Settings, supervisor_pid: int,
                 on_finished: Callable[[InferRequest], None],
                 worker_factory: WorkerFactory, limits: WorkerLimits | None = None,
                 decoupled: bool = False, sequence: SequencePlan | None = None,
                 limiter: RateLimiter | None = None) -> None:
        self.model = model
        self.version = version
        self.stats = ModelStats()
        instrument(self.stats, options_from(settings.metrics_config))
        self._policy = BatchPolicy.from_config(max_batch_size, batching)
        self._max_queue = (batching.default_queue_policy.max_queue_size
                           if batching is not None else 0)
        self._on_finished = on_finished  # the core's accounting, once per request
        self._dispatcher = Dispatcher(model, plans, make_spec, settings, supervisor_pid,
                                      worker_factory, self, limits, decoupled)
        if limiter is not None:
            limiter.register(plans)
            self._dispatcher.limiter = limiter
        # With sequence_batching, requests queue on their sequences instead.
        self._sequences = (SequenceBatcher(sequence, self._dispatcher, self)
                           if sequence is not None else None)
        if sequence is not None and sequence.iterative:
            self._dispatcher.keep_inputs = True  # a rescheduled request is staged again
        self._order: ResponseOrder | None = None
        if batching is not None and batching.preserve_ordering:
            if decoupled:
                log.warning("model '%s': preserve_ordering is not supported for decoupled "
                            "models; their responses are sent as they come", model)
            else:
                self._order = ResponseOrder()
                self._dispatcher.direct_answers = False
        queue_policy = QueuePolicy.from_config(batching)
        # Priority levels and timeouts (queue_policy.py); else the plain FIFO deque.
        self._policy_queue = PolicyQueue(queue_policy) if queue_policy is not None else None
        self._fifo: deque[InferRequest] = deque()
        self._queue: deque[InferRequest] | PolicyQueue = \
            self._fifo if self._policy_queue is None else self._policy_queue
        self._timer: asyncio.TimerHandle | None = None
        self._expiry_timer: asyncio.TimerHandle | None = None
        self._expiry_at = 0  # the deadline _expiry_timer is set for
        self._abandoned = 0
        # Decoupled requests that responded: (responses so far, when the last one came).
        self._responded: dict[int, tuple[int, int]] = {}
        self._dispatch_scheduled: asyncio.Handle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False
        self._idle = asyncio.Event()
        self._idle.set()

    # --- lifecycle ----------------------------------------------------------------------
    async def start(self) -> None:
        """Start every instance; the first failure stops the others and is raised."""
        await self._dispatcher.start()

    @property
    def ready(self) -> bool:
        return not self._closing and self._dispatcher.ready

    def crash_loop_reason(self) -> str:
        """'crash-looping: ...' while an instance keeps failing at start, else ''."""
        return self._dispatcher.crash_loop_reason()

    @property
    def instances(self) -> list[InstanceSlot]:
        return list(self._dispatcher.slots)

    async def drain(self, timeout: float) -> None:
        """Wait until queued and executing requests finished (or the timeout passed)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout)

    async def stop(self, timeout: float) -> None:
        self._closing = True
        self._dispatcher.closing = True
        if self._timer is not None:
            self._timer.cancel()
        if self._expiry_timer is not None:
            self._expiry_timer.cancel()
        self._fail_queue(unavailable(f"model '{self.model}' is being unloaded"))
        await self._dispatcher.stop(timeout)

    # --- requests -----------------------------------------------------------------------
    def submit(self, request: InferRequest) -> None:
        if self._closing:
            raise unavailable(f"model '{self.model}' is being unloaded")
        request.received_ns = request.received_ns or time.perf_counter_ns()
        if self._sequences is not None:
            request.scheduler = self
            self._sequences.submit(request)
        else:
            if self._policy_queue is not None:
                self._policy_queue.append(request, request.received_ns)
            elif self._max_queue and len(self._fifo) >= self._max_queue:
                raise queue_full(request)
            else:
                self._fifo.append(request)
            request.scheduler = self
            if self._order is not None:
                self._order.admit(request)
        self.stats.pending += 1
        self._idle.clear()
        if self._dispatch_scheduled is None:
            # Dispatched once the loop has handled what else arrived in this iteration:
            # requests that came together (one client doorbell) travel in one frame.
            loop = self._loop
            if loop is None:  # (asyncio.get_running_loop costs a getpid syscall each call)
                loop = self._loop = asyncio.get_running_loop()
            self._dispatch_scheduled = loop.call_soon(self._scheduled_dispatch)

    def dispatch_now(self) -> None:
        """Dispatch what ``submit`` queued without waiting for the loop's next turn: for a
        caller that submits one request on its critical path and waits for it (an
        ensemble's step), there is nothing to gather."""
        scheduled = self._dispatch_scheduled
        if scheduled is not None:
            scheduled.cancel()
            self._dispatch_scheduled = None
        self.dispatch()

    def cancel(self, request: InferRequest) -> None:
        """Its caller gave up: drop it from the queue, or withdraw it from the worker it was
        sent ahead to (skipped there unless it started); its reply is not called."""
        request.cancelled = True
        if request.sent is not None:
            self._dispatcher.withdraw(request)
            return
        self._abandoned += 1
        self.dispatch()

    def release_regions(self, region_ids: list[int]) -> None:
        self._dispatcher.release_regions(region_ids)

    def _scheduled_dispatch(self) -> None:
        self._dispatch_scheduled = None
        self.dispatch()

    def dispatch(self) -> None:
        """Send what the policy allows to the instances with free lanes."""
        dispatcher = self._dispatcher
        if self._sequences is not None:
            self._sequences.dispatch()
            if not self._sequences.queued and not dispatcher.busy:
                self._idle.set()
            return
        self._drop_abandoned()
        if self._policy_queue is not None:
            self._apply_timeouts()
        queue = self._queue
        policy = self._policy
        while queue:
            slot = dispatcher.least_loaded()
            if slot is None:
                break
            if policy is not None:
                count, wait_ns = policy.next_batch(queue, time.perf_counter_ns(),
                                                   ahead=slot.inflight > 0)
                if not count:
                    if wait_ns and self._timer is None:
                        self._timer = asyncio.get_running_loop().call_later(
                            wait_ns / 1e9, self._on_timer)
                    break
                self._send(slot, [queue.popleft() for _ in range(count)], each=False)
            else:
                count = min(len(queue), self._requests_per_frame())
                self._send(slot, [queue.popleft() for _ in range(count)], each=count > 1)
        if not self._queue and not dispatcher.busy:
            self._idle.set()

    def _requests_per_frame(self) -> int:
        stats = self.stats
        count = requests_per_frame(stats.compute_infer.count, stats.compute_input.ns
                                   + stats.compute_infer.ns + stats.compute_output.ns)
        if count > 1 and len(self._dispatcher.slots) > 1:
            count = share_among(count, len(self._queue), self._dispatcher.free_instances())
        return count

    def _drop_abandoned(self) -> None:
        """Drop queued requests whose caller gave up (counted, so no scan per dispatch)."""
        if self._abandoned:
            self._abandoned = 0
            for request in drop_cancelled(self._queue):
                self.stats.pending -= 1
                self.finish(request, unavailable("request cancelled by the client"))

    def _apply_timeouts(self) -> None:
        """Reject or delay the queued requests that timed out; look again at the next
        deadline."""
        queue = self._policy_queue
        assert queue is not None
        now = time.perf_counter_ns()
        for request in queue.expire(now):
            self.stats.pending -= 1
            self.finish(request, timeout_expired())
        deadline = queue.next_deadline()
        if deadline == self._expiry_at:
            return
        if self._expiry_timer is not None:
            self._expiry_timer.cancel()
            self._expiry_timer = None
        self._expiry_at = deadline
        if deadline:
            self._expiry_timer = asyncio.get_running_loop().call_later(
                max(deadline - now, 0) / 1e9 + 1e-4, self._on_expiry_timer)

    def _on_expiry_timer(self) -> None:
        self._expiry_timer = None
        self._expiry_at = 0
        self.dispatch()

    def _on_timer(self) -> None:
        self._timer = None
        self.dispatch()

    def _send(self, slot: InstanceSlot, batch: list[InferRequest], each: bool) -> None:
        now = time.perf_counter_ns()
        for request in batch:
            self.stats.queue.add(now - request.received_ns)
            self.stats.pending -= 1
        self._dispatcher.send(slot, batch, each)

    # --- what the dispatcher reports ----------------------------------------------------
    def finish(self, request: InferRequest,
               result: list[OutputTensor] | BaseException | None) -> None:
        """Account for a completed request and answer it through its reply (``None``: the
        worker answered it directly), unless its caller gave up."""
        if self._sequences is not None and self._sequences.finished(request):
            return  # a filler of an empty sequence slot: nobody asked for it
        ok = not isinstance(result, BaseException)
        elapsed = time.perf_counter_ns() - request.received_ns
        self.stats.record_request(ok, elapsed)
        first = self.stats.first_response
        if first is not None and ok and id(request) not in self._responded:
            first.observe(elapsed / 1e6)  # its one response
        if self._responded:
            self._responded.pop(id(request), None)
        self._on_finished(request)
        if self._order is not None:
            self._order.complete(request, lambda: self._answer(request, result))
        else:
            self._answer(request, result)

    def reschedule(self, request: InferRequest) -> None:
        """The model released ``request`` for another run (iterative_sequence): it queues on
        its sequence again, ahead of anything else there."""
        if self._sequences is None or not self._sequences.reschedule(request):
            self.finish(request, internal("a request was rescheduled outside an iterative "
                                          "sequence"))
            return
        self.stats.pending += 1
        self.dispatch()

    def _answer(self, request: InferRequest,
                result: list[OutputTensor] | BaseException | None) -> None:
        if request.cancelled:
            return
        reply = request.reply
        try:
            if result is None:
                reply.answered_directly()
            elif isinstance(result, ServeError):
                reply.fail(result)
            elif isinstance(result, BaseException):
                log.error("request failed: %r", result)
                reply.fail(internal(f"{type(result).__name__}: {result}"))
            else:
                reply.send(result, True)
        except Exception:
            log.exception("answering a request failed")

    def respond(self, request: InferRequest, result: list[OutputTensor] | ServeError | None,
                final: bool) -> None:
        """One response of a decoupled request (``None``: only the final flag); the final one
        completes it."""
        sequences = self._sequences
        if sequences is not None:
            if sequences.is_filler(request):
                if final:
                    sequences.finished(request)
                return  # a filler's responses: nobody asked for them
            if final:
                sequences.finished(request)  # the sequence's next request may go
        now = time.perf_counter_ns()
        index, since = self._responded.get(id(request), (0, request.received_ns))
        if index == 0 and self.stats.first_response is not None:
            self.stats.first_response.observe((now - request.received_ns) / 1e6)
        kind = ("empty_response" if result is None
                else "fail" if isinstance(result, ServeError) else "success")
        self.stats.record_response(index, kind, now - since)
        if final:
            self._responded.pop(id(request), None)
        else:
            self._responded[id(request)] = (index + 1, now)
        if final:
            ok = not isinstance(result, ServeError)
            self.stats.record_request(ok, time.perf_counter_ns() - request.received_ns)
            self._on_finished(request)
            self.dispatch()  # an open request less: the version may be idle (unload drains)
        if request.cancelled:
            return
        reply = request.reply
        try:
            if result is None:
                reply.end()
            elif isinstance(result, ServeError):
                reply.send_error(result, final)
            else:
                reply.send(result, final)
        except Exception:
            log.exception("answering a request failed")

    def executed(self, batch_size: int, requests: int, timings: list[int]) -> None:
        self.stats.record_batch(batch_size, requests, timings)

    def no_live_instance(self, error: ServeError) -> None:
        self._fail_queue(error)

    def _fail_queue(self, error: ServeError) -> None:
        if self._sequences is not None:
            self._sequences.fail_all(error)
        while self._queue:
            request = self._queue.popleft()
            self.stats.pending -= 1
            self.finish(request, error)
        self._idle.set()
