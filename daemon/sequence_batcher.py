"""Sequence batching: the scheduling of a model with ``sequence_batching`` (Triton's sequence
batcher, strategies ``direct`` and ``oldest``).

Every request names its sequence (``sequence_id``: its correlation id, uint64 or string) and
may carry ``sequence_start`` / ``sequence_end``. A sequence's first request (START) gives it a
*seat*: one of ``slots_per_instance`` sequence slots of one instance (max_batch_size of them
with ``direct``, ``max_candidate_sequences`` with ``oldest``), or, while every seat is taken,
a place in the backlog until one frees. All its requests then run on that instance, one at a
time and in order, so the instance's worker can keep the sequence's implicit state
(workers/sequence_state.py). Its END frees the seat; so does ``max_sequence_idle_microseconds``
without a request (a later request then needs START again, with Triton's error). A sequence
still in the backlog when the earliest ``timeout`` of its requests passes is dropped: its
requests fail with Triton's UNAVAILABLE "timeout of the corresponding sequence has been
expired".

A batch takes at most one request per sequence. ``direct``: the request of seat i is batch
entry i; a seat below the highest ready one that has nothing to run gets a *filler* (a copy
of another request's inputs with READY false and CORRID 0, whose answer nobody reads), as
Triton's null requests. ``oldest``: the oldest ready sequences of the instance, up to
max_batch_size, cut to a preferred size, held up to the strategy's max_queue_delay.
Each request gets the control inputs the config asks for (sequence_config.py).

A worker that dies takes its sequences' state with it: their queued requests fail, and a
later request of such a sequence fails with a clear error until it starts again.

``iterative_sequence``: each request is a sequence of its own. One without a correlation id
gets one (from ITERATIVE_IDS_FROM up) and START. The model may release it for another run
(``reschedule``): it queues again at the front of its sequence, its control inputs renewed
(START and END false), on the same seat and instance. When it completes, its sequence ends
(the worker drops its state), unless more requests of the same id are queued.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Protocol

from shmserve.daemon.dispatcher import Dispatcher, InstanceSlot, WorkerHandle
from shmserve.daemon.errors import ServeError, invalid_argument, unavailable
from shmserve.daemon.queue_policy import request_timeout_us
from shmserve.daemon.reply import Reply
from shmserve.daemon.request import InferRequest, InputTensor, OutputTensor
from shmserve.daemon.sequence_config import SequencePlan, corrid_mismatch
from shmserve.daemon.statistics import ModelStats

log = logging.getLogger("shmserve.scheduler")

# How long a sequence lost with its worker is remembered, to name the loss to its next request.
LOST_REMEMBERED_NS = 60 * 1_000_000_000
# The correlation ids given to iterative_sequence requests that came without one: from the top
# half of uint64, away from the small ids clients pick.
ITERATIVE_IDS_FROM = 1 << 63


class SequenceOwner(Protocol):
    """Where the sequence batcher reports (the model's Scheduler)."""

    stats: ModelStats

    def finish(self, request: InferRequest,
               result: list[OutputTensor] | BaseException | None) -> None: ...

    def dispatch(self) -> None: ...


@dataclass(eq=False, slots=True)
class Sequence:
    key: int | str
    queue: deque[InferRequest] = field(default_factory=deque)
    last_ns: int = 0
    instance: InstanceSlot | None = None  # with ``seat``, once seated
    seat: int = -1
    worker: WorkerHandle | None = None  # holds its state (set at its first send)
    inflight: bool = False   # one request at a time, in order
    ended: bool = False      # its END arrived: no request joins it any more
    # While in the backlog: when it expires (the earliest request timeout of its requests;
    # 0: never), as Triton's backlog queues.
    expires_ns: int = 0


class _FillerReply(Reply):
    """The reply of a filler: nobody awaits it."""

    __slots__ = ()

    def send(self, response: list[OutputTensor], final: bool) -> None:
        pass

    def fail(self, error: ServeError) -> None:
        pass


def _flag(parameters: dict[str, Any], name: str) -> bool:
    value = parameters.get(name, False)
    if not isinstance(value, bool):
        raise invalid_argument(f"invalid value type for '{name}' parameter, expected "
                               f"bool_param.")
    return value


class SequenceBatcher:
    def __init__(self, plan: SequencePlan, dispatcher: Dispatcher,
                 owner: SequenceOwner) -> None:
        self._plan = plan
        self._dispatcher = dispatcher
        self._owner = owner
        # Every sequence holding a seat or waiting in the backlog, by correlation id.
        self._sequences: dict[int | str, Sequence] = {}
        self._seats: dict[int, list[Sequence | None]] = {
            slot.uid: [None] * plan.slots_per_instance for slot in dispatcher.slots}
        self._backlog: deque[Sequence] = deque()
        self._running: dict[int, Sequence | None] = {}  # id(request) -> sequence; None: filler
        self._lost: dict[int | str, tuple[str, int]] = {}  # key -> (error text, when)
        self._idle_timer: asyncio.TimerHandle | None = None
        self._delay_timer: asyncio.TimerHandle | None = None
        self._backlog_timer: asyncio.TimerHandle | None = None
        self._backlog_timer_at = 0
        self.queued = 0
        self._next_iterative_id = ITERATIVE_IDS_FROM
        self._control_names = {control.name for control in plan.controls(0, False, False)}

    # --- requests -----------------------------------------------------------------------
    def submit(self, request: InferRequest) -> None:
        """Queue a request on its sequence; raises ServeError (Triton's checks and texts)."""
        plan = self._plan
        model = plan.model
        if request.batch_size > 1:
            raise invalid_argument(f"inference request to model '{model}' must specify "
                                   f"batch-size 1 due to requirements of sequence batcher")
        parameters = request.parameters
        raw_id = parameters.get("sequence_id", 0)
        if isinstance(raw_id, bool) or not isinstance(raw_id, int | str):
            raise invalid_argument("invalid value type for 'sequence_id' parameter, expected "
                                   "int64_param or string_param.")
        start = _flag(parameters, "sequence_start")
        end = _flag(parameters, "sequence_end")
        timeout_us = request_timeout_us(request)
        key = request.correlation_id
        if plan.iterative and (key == 0 or key == ""):
            key = request.correlation_id = self._iterative_id()
            parameters["sequence_start"] = start = True
        if key == 0 or key == "":
            raise invalid_argument(f"inference request to model '{model}' must specify a "
                                   f"non-zero or non-empty correlation ID")
        mismatch = corrid_mismatch(plan, key)
        if mismatch is not None:
            raise invalid_argument(mismatch)
        now = time.perf_counter_ns()
        sequence = self._sequences.get(key)
        if sequence is not None and self._worker_lost(sequence):
            self._lose(sequence)
            sequence = None
        if (sequence is None or sequence.ended) and not start:
            lost = self._lost.get(key)
            if lost is not None:
                raise unavailable(lost[0])
            raise invalid_argument(f"inference request for sequence {key} to model '{model}' "
                                   f"must specify the START flag on the first request of the "
                                   f"sequence")
        if start:
            self._lost.pop(key, None)
            if sequence is not None and not sequence.ended:
                log.warning("sequence %s for model '%s' has a conflict. The previous sequence "
                            "did not end before this sequence start. Previous sequence will "
                            "be terminated early.", key, model)
        if sequence is None:
            sequence = self._sequences[key] = Sequence(key)
            if not self._seat(sequence):
                self._backlog.append(sequence)
        sequence.ended = end
        sequence.queue.append(request)
        sequence.last_ns = now
        self.queued += 1
        if timeout_us > 0 and sequence.instance is None:
            expires = now + timeout_us * 1000
            sequence.expires_ns = min(sequence.expires_ns or expires, expires)
            self._arm_backlog_timer(sequence.expires_ns)
        if self._idle_timer is None:
            self._arm_idle_timer(plan.idle_ns)

    def finished(self, request: InferRequest) -> bool:
        """A request sent by this batcher completed; True for a filler (nobody to answer)."""
        sequence = self._running.pop(id(request), False)
        if sequence is False:
            return False
        if sequence is None:
            return True
        assert isinstance(sequence, Sequence)
        sequence.inflight = False
        if self._plan.iterative and not sequence.queue:
            self._end_iterative(sequence)
        return False

    def is_filler(self, request: InferRequest) -> bool:
        return self._running.get(id(request), False) is None

    def reschedule(self, request: InferRequest) -> bool:
        """The model released ``request`` for another run: it queues at the front of its
        sequence again, its control inputs to be renewed. False if it is not one of ours."""
        sequence = self._running.pop(id(request), None)
        if not isinstance(sequence, Sequence):
            return False
        sequence.inflight = False
        names = self._control_names
        request.inputs = [tensor for tensor in request.inputs if tensor.name not in names]
        parameters = request.parameters
        parameters["sequence_start"] = parameters["sequence_end"] = False
        request.sent = None
        sequence.queue.appendleft(request)
        sequence.last_ns = time.perf_counter_ns()
        self.queued += 1
        return True

    def _iterative_id(self) -> int | str:
        """A correlation id of the kind CORRID wants, for a request that came without one."""
        number = self._next_iterative_id
        self._next_iterative_id += 1
        corrid = self._plan.corrid
        return f"iterative-{number - ITERATIVE_IDS_FROM + 1}" \
            if corrid is not None and corrid[1] == "BYTES" else number

    def _end_iterative(self, sequence: Sequence) -> None:
        """An iterative sequence's request completed: the sequence ends, with its state."""
        if self._sequences.get(sequence.key) is sequence:
            del self._sequences[sequence.key]
        self._unseat(sequence)
        worker = sequence.worker
        if self._plan.stateful and worker is not None and worker.alive:
            worker.end_sequences([sequence.key])

    def fail_all(self, error: ServeError) -> None:
        """Unload, or no instance left: every queued request fails."""
        for sequence in list(self._sequences.values()):
            self._fail_queued(sequence, error)
        self._sequences.clear()
        self._backlog.clear()
        for seats in self._seats.values():
            seats[:] = [None] * len(seats)
        for timer in (self._idle_timer, self._delay_timer, self._backlog_timer):
            if timer is not None:
                timer.cancel()
        self._idle_timer = self._delay_timer = self._backlog_timer = None

    # --- dispatch -----------------------------------------------------------------------
    def dispatch(self) -> None:
        """Send what is ready to the instances with free lanes."""
        self._find_lost()
        direct = self._plan.strategy == "direct"
        strategy = self._direct_batch if direct else self._oldest_batch
        for slot in self._dispatcher.slots:
            # direct: one batch at a time per instance, as Triton's (the next one forms
            # while it runs, so fewer slots need fillers)
            while slot.free_lanes and slot.alive and not (direct and slot.inflight) \
                    and self._dispatcher.may_run(slot):
                batch = strategy(slot)
                if not batch:
                    break
                self._dispatcher.send(slot, batch, each=False)

    def _ready(self, sequence: Sequence | None) -> bool:
        if sequence is None or sequence.inflight:
            return False
        queue = sequence.queue
        while queue and queue[0].cancelled:
            request = queue.popleft()
            self.queued -= 1
            self._owner.stats.pending -= 1
            self._owner.finish(request, unavailable("request cancelled by the client"))
        return bool(queue)

    def _direct_batch(self, slot: InstanceSlot) -> list[InferRequest]:
        plan = self._plan
        seats = self._seats[slot.uid]
        ready = [i for i, sequence in enumerate(seats) if self._ready(sequence)]
        if not ready:
            return []
        now = time.perf_counter_ns()
        if plan.max_queue_delay_ns and plan.minimum_slot_utilization > 0 and \
                len(ready) / plan.max_batch < plan.minimum_slot_utilization:
            oldest = min(seats[i].queue[0].received_ns for i in ready)  # type: ignore[union-attr]
            if now - oldest < plan.max_queue_delay_ns:
                self._arm_delay_timer(plan.max_queue_delay_ns - (now - oldest))
                return []
        first = seats[ready[0]]
        assert first is not None
        like = first.queue[0]
        template = [InputTensor(t.name, t.datatype, t.shape, t.data, t.region, t.offset,
                                t.nbytes) for t in like.inputs]
        batch: list[InferRequest] = []
        ready_seats = set(ready)
        for index in range(ready[-1] + 1):
            sequence = seats[index]
            if index in ready_seats and sequence is not None:
                batch.append(self._take(slot, sequence, now))
            else:
                batch.append(self._filler(like, template))
        return batch

    def _oldest_batch(self, slot: InstanceSlot) -> list[InferRequest]:
        plan = self._plan
        candidates = [s for s in self._seats[slot.uid] if self._ready(s)]
        if not candidates:
            return []
        candidates.sort(key=lambda s: s.queue[0].received_ns)  # type: ignore[union-attr]
        count = min(len(candidates), plan.max_batch)
        now = time.perf_counter_ns()
        if count < plan.max_batch and plan.max_queue_delay_ns and count not in plan.preferred:
            waited = now - candidates[0].queue[0].received_ns  # type: ignore[union-attr]
            if waited < plan.max_queue_delay_ns:
                self._arm_delay_timer(plan.max_queue_delay_ns - waited)
                return []
        if count not in plan.preferred:
            fitting = [size for size in plan.preferred if size <= count]
            if fitting:
                count = fitting[-1]
        return [self._take(slot, sequence, now)  # type: ignore[arg-type]
                for sequence in candidates[:count]]

    def _take(self, slot: InstanceSlot, sequence: Sequence, now: int) -> InferRequest:
        """The sequence's next request, with its control inputs, counted as sent."""
        plan = self._plan
        request = sequence.queue.popleft()
        self.queued -= 1
        stats = self._owner.stats
        stats.pending -= 1
        stats.queue.add(now - request.received_ns)
        parameters = request.parameters
        end = bool(parameters.get("sequence_end"))
        shape = list(plan.control_shape)
        for control in plan.controls(sequence.key, bool(parameters.get("sequence_start")), end):
            request.inputs.append(InputTensor(control.name, control.datatype, shape,
                                              control.data, None, 0, len(control.data)))
        if sequence.worker is None:
            sequence.worker = slot.worker
        sequence.inflight = True
        self._running[id(request)] = sequence
        if end and sequence.ended and not sequence.queue and not plan.iterative:
            self._unseat(sequence)
            del self._sequences[sequence.key]
        return request

    def _filler(self, like: InferRequest, template: list[InputTensor]) -> InferRequest:
        """A not-ready request for an empty seat (Triton's null request)."""
        plan = self._plan
        shape = list(plan.control_shape)
        inputs = [InputTensor(t.name, t.datatype, t.shape, t.data, t.region, t.offset,
                              t.nbytes) for t in template]
        for control in plan.controls(0, False, False, ready=False):
            inputs.append(InputTensor(control.name, control.datatype, shape, control.data,
                                      None, 0, len(control.data)))
        filler = InferRequest(like.model, like.version, "", inputs, [], 1, _FillerReply())
        self._running[id(filler)] = None
        return filler

    # --- seats --------------------------------------------------------------------------
    def _seat(self, sequence: Sequence) -> bool:
        """Give the sequence a free seat (on the live instance with the most free seats)."""
        best: tuple[int, InstanceSlot, int] | None = None
        for slot in self._dispatcher.slots:
            seats = self._seats[slot.uid]
            free = [i for i, taken in enumerate(seats) if taken is None]
            if not free:
                continue
            rank = len(free) + (len(seats) + 1 if slot.alive else 0)
            if best is None or rank > best[0]:
                best = (rank, slot, free[0])
        if best is None:
            return False
        _, slot, seat = best
        self._seats[slot.uid][seat] = sequence
        sequence.instance, sequence.seat = slot, seat
        return True

    def _unseat(self, sequence: Sequence) -> None:
        """Free the sequence's seat; the oldest backlogged sequence takes it."""
        slot = sequence.instance
        if slot is None:
            return
        seat = sequence.seat
        seats = self._seats[slot.uid]
        seats[seat] = None
        sequence.instance, sequence.seat = None, -1
        if self._backlog:
            waiting = self._backlog.popleft()
            seats[seat] = waiting
            waiting.instance, waiting.seat = slot, seat
            waiting.expires_ns = 0  # seated: no longer waiting to expire

    # --- lost workers -------------------------------------------------------------------
    def _worker_lost(self, sequence: Sequence) -> bool:
        slot = sequence.instance
        worker = sequence.worker
        if worker is None or slot is None:
            return False
        return slot.worker is not worker or not worker.alive

    def _find_lost(self) -> None:
        for seats in self._seats.values():
            for sequence in seats:
                if sequence is not None and self._worker_lost(sequence):
                    self._lose(sequence)

    def _lose(self, sequence: Sequence) -> None:
        """Its worker died with the sequence's state: the sequence ends, with an error for its
        queued requests and (until it starts again) its next one."""
        slot = sequence.instance
        assert slot is not None
        why = slot.last_exit or "it exited"
        message = (f"inference request for sequence {sequence.key} to model "
                   f"'{self._plan.model}' failed: the sequence was lost when the worker of "
                   f"model instance '{slot.plan.name}' stopped ({why}); start the sequence "
                   f"again with the START flag")
        self._fail_queued(sequence, unavailable(message))
        self._unseat(sequence)
        if self._sequences.get(sequence.key) is sequence:
            del self._sequences[sequence.key]
        if not sequence.ended:
            self._lost[sequence.key] = (message, time.perf_counter_ns())
            if self._idle_timer is None:
                self._arm_idle_timer(self._plan.idle_ns)

    def _fail_queued(self, sequence: Sequence, error: ServeError) -> None:
        while sequence.queue:
            request = sequence.queue.popleft()
            self.queued -= 1
            self._owner.stats.pending -= 1
            self._owner.finish(request, error)

    # --- timers -------------------------------------------------------------------------
    def _arm_idle_timer(self, delay_ns: int) -> None:
        self._idle_timer = asyncio.get_running_loop().call_later(
            max(delay_ns, 1_000_000) / 1e9, self._reap_idle)

    def _reap_idle(self) -> None:
        """Sequences idle past max_sequence_idle_microseconds lose their seat (Triton's
        reaper); their workers drop their state."""
        self._idle_timer = None
        idle_ns = self._plan.idle_ns
        now = time.perf_counter_ns()
        next_check = idle_ns
        ended: dict[int, tuple[WorkerHandle, list[int | str]]] = {}
        for sequence in list(self._sequences.values()):
            if sequence.queue or sequence.inflight or sequence.instance is None:
                continue
            remaining = idle_ns - (now - sequence.last_ns)
            if remaining > 0:
                next_check = min(next_check, remaining)
                continue
            log.debug("sequence %s of model '%s' idle past max_sequence_idle_microseconds",
                      sequence.key, self._plan.model)
            worker = sequence.worker
            if worker is not None and worker.alive:
                ended.setdefault(id(worker), (worker, []))[1].append(sequence.key)
            self._unseat(sequence)
            del self._sequences[sequence.key]
        for worker, keys in ended.values():
            worker.end_sequences(keys)
        for key, (_, when) in list(self._lost.items()):
            if now - when >= LOST_REMEMBERED_NS:
                del self._lost[key]
        if self._sequences or self._lost:
            self._arm_idle_timer(next_check)
        self._owner.dispatch()  # a backlogged sequence may have got a seat

    def _arm_backlog_timer(self, at_ns: int) -> None:
        if self._backlog_timer is not None:
            if self._backlog_timer_at <= at_ns:
                return
            self._backlog_timer.cancel()
        self._backlog_timer_at = at_ns
        delay = max(at_ns - time.perf_counter_ns(), 0) / 1e9
        self._backlog_timer = asyncio.get_running_loop().call_later(delay, self._expire_backlog)

    def _expire_backlog(self) -> None:
        """Backlogged sequences past their requests' timeout are dropped, their requests
        failed (Triton's reaper, for backlog queues)."""
        self._backlog_timer = None
        now = time.perf_counter_ns()
        kept: deque[Sequence] = deque()
        expired: list[Sequence] = []
        for sequence in self._backlog:
            if sequence.expires_ns and sequence.expires_ns <= now:
                expired.append(sequence)
            else:
                kept.append(sequence)
        self._backlog = kept
        for sequence in expired:
            if self._sequences.get(sequence.key) is sequence:
                del self._sequences[sequence.key]
            self._fail_queued(sequence, unavailable(
                "timeout of the corresponding sequence has been expired"))
        following = [s.expires_ns for s in kept if s.expires_ns]
        if following:
            self._arm_backlog_timer(min(following))

    def _arm_delay_timer(self, delay_ns: int) -> None:
        if self._delay_timer is None:
            self._delay_timer = asyncio.get_running_loop().call_later(
                delay_ns / 1e9, self._on_delay_timer)

    def _on_delay_timer(self) -> None:
        self._delay_timer = None
        self._owner.dispatch()
