"""Dispatch: a model version's instances, their lanes, staging, in-flight frames, restarts.

An instance executes one batch at a time; up to ``pipeline_depth`` batches are sent to it
ahead, so the next one is already in the worker's socket when the current one ends (with
dynamic batching only a full batch goes ahead: see batcher.py). Each
batch in flight holds a *lane*: its own input arena here and output arena in the worker.
Payload inputs above the inline limit are written once into the lane's input arena (and the
request lets go of them); the rest travels as a reference. Outputs come back inline, in the
worker's output arena (*pending*: copied once, by the door straight into its answer or into
bytes, before the lane is reused), or already written into the client's region; a
local-channel request's answer may have gone to its client from the worker already
(``Reply.direct_tag``). Large tensors cross the arenas with pwrite/pread, so their pages stay
out of the supervisor's resident set, and when a frame moves OFF_LOOP_BYTES or more they are
copied by a thread, not the event loop; an instance idle for ``arena_idle_secs`` after a large
request shrinks the arenas on both sides back to their initial size.

Workers come from a factory (``WorkerProcess`` in the server; a fake in tests), and results
go back to the ``DispatchOwner`` (the model's Scheduler), which answers the requests.

Restarts: an instance whose worker served a request (or lived a while) before it died is
restarted at once: an external kill, or one poison request, costs one restart. One whose
worker failed to initialize, or died soon after start without serving, is a failing start:
those back off (0.1 s doubling, capped by --restart-backoff-max-secs), each step logged once,
and from the second in a row the instance is *crash-looping* (RepositoryIndex reason, the
shmserve_instance_crash_looping metric) until a worker of it serves again.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from collections.abc import Callable
from typing import Any, Protocol

from shmserve.daemon.errors import ServeError, unavailable
from shmserve.daemon.heap import KEEP_BYTES
from shmserve.daemon.model_config import InstancePlan
from shmserve.daemon.rate_limiter import RateLimiter
from shmserve.daemon.reply import DirectTarget
from shmserve.daemon.request import InferRequest, OutputTensor
from shmserve.daemon.settings import Settings
from shmserve.daemon.shm_registry import Region
from shmserve.daemon.tracing import compute_marks
from shmserve.daemon.worker_limits import WorkerLimits, limits_for, restart_delay
from shmserve.protos.response_ring import ring_bytes
from shmserve.workers.protocol import (
    ARENA,
    CUDA,
    INLINE,
    INLINE_LIMIT,
    RESULT_ANSWERED,
    RESULT_OK,
    RESULT_RESCHEDULED,
    RESULT_STREAMING,
    SYSTEM,
    Done,
    Partial,
    Report,
    TensorRef,
    WorkerSpec,
    packed_exec_request,
    packed_inline,
)
from shmserve.workers.shm import (
    ARENA_INITIAL_BYTES,
    Arena,
    FileReader,
    Pieces,
    ReaderMapping,
    Segment,
    pwrite_pieces,
    trim_heap,
)

log = logging.getLogger("shmserve.scheduler")
_slot_ids = itertools.count(1)
# Inputs of a frame coming to this much are written into the arena by a thread, not the loop.
OFF_LOOP_BYTES = 4 << 20


class _Reschedule:
    """The answer of a request its model released for another run (iterative_sequence)."""

    __slots__ = ()


RESCHEDULE = _Reschedule()
# What a frame's request came back with: outputs, an error, RESCHEDULE, or None (the worker
# answered it directly).
Answer = list[OutputTensor] | BaseException | _Reschedule | None
# A worker that lived this long did not die "right after start", even if it served nothing.
_SETTLED_SECS = 5.0
# Failing starts in a row from which an instance is reported as crash-looping.
CRASH_LOOP_AFTER = 2

DoneCallback = Callable[["Done | BaseException"], None]


class WorkerHandle(DirectTarget, Protocol):
    """What the dispatcher needs of a worker process (daemon/worker_process.py)."""

    pid: int | None
    unresponsive: bool  # its heartbeat is late: it does not count as serving
    on_partial: Callable[[list[Any]], None] | None  # decoupled models' Partial frames
    report: Report | None  # the model's own readiness and custom metrics

    @property
    def became_ready(self) -> bool: ...

    async def start(self, limits: WorkerLimits) -> None: ...

    async def stop(self, timeout: float) -> None: ...

    def execute(self, requests: list[list[Any]], lane: int, each: bool,
                on_done: DoneCallback) -> int: ...

    def withdraw(self, batch_id: int, index: int, streaming: bool = False) -> None: ...

    def release_regions(self, region_ids: list[int]) -> None: ...

    def share_region_fd(self, region_id: int, fd: int) -> bool: ...
    def trim_arenas(self) -> None: ...

    def end_sequences(self, correlation_ids: list[int | str]) -> None: ...

    def follow_log(self, switches: list[Any]) -> None: ...


# (spec, label, on_exit(worker, reason)) -> a worker not started yet
WorkerFactory = Callable[[WorkerSpec, str, Callable[[Any, str], None]], WorkerHandle]


class DispatchOwner(Protocol):
    """Where the dispatcher reports (the model's Scheduler)."""

    def finish(self, request: InferRequest,
               result: list[OutputTensor] | BaseException | None) -> None: ...

    def executed(self, batch_size: int, requests: int, timings: list[int]) -> None: ...

    def respond(self, request: InferRequest, result: list[OutputTensor] | ServeError | None,
                final: bool) -> None: ...

    def reschedule(self, request: InferRequest) -> None: ...

    def dispatch(self) -> None: ...

    def no_live_instance(self, error: ServeError) -> None: ...


def _note_executions(batch: list[InferRequest], executions: list[list[Any]]) -> None:
    """The compute timestamps of the traced requests of a frame (tracing.py), and the
    compute durations for the replies that add them up (an ensemble's steps)."""
    answered = 0
    for indices, input_ns, infer_ns, output_ns in executions:
        for index in indices:
            request = batch[index]
            trace = request.trace
            if trace is not None:
                answered = answered or time.monotonic_ns()
                compute_marks(trace, input_ns, infer_ns, output_ns, answered)
            if request.reply.records_compute:
                request.reply.computed(input_ns, infer_ns, output_ns)


def _write_inputs(jobs: list[tuple[int, int, bytes | memoryview | Pieces]]) -> None:
    """Write staged inputs through their own file descriptors (a thread's job: pwrite lets
    the loop run meanwhile)."""
    for fd, offset, data in jobs:
        if isinstance(data, Pieces):
            pwrite_pieces(fd, data.parts, offset)
            continue
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            done += os.pwrite(fd, view[done:], offset + done)


def _prepare_answers(jobs: list[tuple[Any, list[OutputTensor]]]) -> None:
    """On a thread: each reply copies its outputs out of the arena (Reply.prepare)."""
    for reply, outputs in jobs:
        try:
            reply.prepare(outputs)
        except Exception:
            log.exception("preparing an answer failed")


def _settle(outputs: list[OutputTensor]) -> None:
    """Outputs the door did not copy out of the output arena are read now: the lane's arena
    may be written again once its frame is answered."""
    for output in outputs:
        if output.pending:
            try:
                output.settle()
            except (OSError, ValueError):
                log.exception("reading output '%s' from the output arena failed", output.name)
                output.data = b""


def _align(nbytes: int) -> int:
    return (nbytes + 63) // 64 * 64


def _region_location(region: Region, worker: WorkerHandle) -> tuple[str, list[Any]]:
    """(where, location) of a client region in a TensorRef.

    CUDA regions travel as [id, raw 64-byte handle, device id]: the worker opens the handle.
    A memfd region (key "") is passed to the worker by fd the first time it needs it.
    """
    if region.kind == "cuda":
        return CUDA, [region.region_id, region.raw_handle, region.device_id]
    if region.fd >= 0 and not worker.share_region_fd(region.region_id, region.fd):
        raise unavailable(f"could not pass shared memory region "
                          f"'{region.name.partition(':')[2] or region.name}' to a worker; "
                          f"retry the request")
    return SYSTEM, [region.region_id, region.key]


def _restarts(slot: InstanceSlot) -> str:
    count = slot.generation - 1
    return f"{count} restart{'' if count == 1 else 's'}"


class InstanceSlot:
    """One model instance: its current worker process and the arenas it shares with it."""

    def __init__(self, plan: InstancePlan, supervisor_pid: int, lanes: int) -> None:
        self.plan = plan
        self.uid = next(_slot_ids)
        self.worker: WorkerHandle | None = None
        self.lanes = lanes
        self._supervisor_pid = supervisor_pid
        self.free_lanes = list(range(lanes))
        self.generation = 0
        self.failures = 0            # failing starts in a row (see the module's docstring)
        self.served = False          # the current worker answered a batch
        self.last_exit = ""          # why its last worker ended (or failed to start)
        self.backoff = 0.0           # the delay before the pending restart, while waiting
        self.started_at = 0.0
        self.input_arenas = [Arena(supervisor_pid, f"w{self.uid}i{lane}")
                             for lane in range(lanes)]
        self.output_reader = ReaderMapping(capacity=2 * lanes, keep_fd=True)
        self.output_grown = False  # the worker's output arena grew past its initial size
        self.frames_done = 0       # frames answered; unchanged over a period = idle
        self.frames_seen = 0       # frames_done at the last idle check
        # Decoupled requests sent and not final yet, by (frame id, index in the frame).
        self.streams: dict[tuple[int, int], InferRequest] = {}

    def add_lanes(self, lanes: int) -> None:
        """Up to ``lanes`` frames in flight: a worker whose backend runs executions
        concurrently (``async def execute``) takes more than the pipeline depth."""
        while self.lanes < lanes:
            self.input_arenas.append(Arena(self._supervisor_pid, f"w{self.uid}i{self.lanes}"))
            self.lanes += 1
        self.output_reader.capacity = max(self.output_reader.capacity, 2 * self.lanes)

    @property
    def inflight(self) -> int:
        """Frames sent and not answered yet."""
        return self.lanes - len(self.free_lanes)

    @property
    def alive(self) -> bool:
        return self.worker is not None and self.worker.alive

    @property
    def serving(self) -> bool:
        """Alive and answering its heartbeat."""
        worker = self.worker
        return worker is not None and worker.alive and not worker.unresponsive

    @property
    def crash_looping(self) -> bool:
        return self.failures >= CRASH_LOOP_AFTER and not self.alive

    def close(self) -> None:
        for arena in self.input_arenas:
            arena.close()
        self.output_reader.close()

    def trim_if_idle(self) -> bool:
        """Shrink the grown arenas of an instance that answered nothing since the last check
        and has nothing in flight. True if memory was given back."""
        if self.inflight or self.frames_done != self.frames_seen:
            self.frames_seen = self.frames_done
            return False
        trimmed = False
        for arena in self.input_arenas:
            trimmed = arena.shrink() or trimmed
        if self.output_grown:
            self.output_grown = False
            self.output_reader.close()
            trimmed = True
        if trimmed and self.worker is not None and self.worker.alive:
            self.worker.trim_arenas()  # it unmaps our input arenas, shrinks its output ones
        return trimmed


class Dispatcher:
    def __init__(self, model: str, plans: list[InstancePlan],
                 make_spec: Callable[[InstancePlan, str, int], WorkerSpec],
                 settings: Settings, supervisor_pid: int, worker_factory: WorkerFactory,
                 owner: DispatchOwner, limits: WorkerLimits | None = None,
                 decoupled: bool = False) -> None:
        self.model = model
        self.decoupled = decoupled
        self._make_spec = make_spec
        self._settings = settings
        self.limits = limits if limits is not None else limits_for(settings, {})
        self._new_worker = worker_factory
        self._owner = owner
        depth = max(1, settings.pipeline_depth)
        self.slots = [InstanceSlot(plan, supervisor_pid, depth) for plan in plans]
        self.closing = False
        # False: every answer goes through the scheduler (preserve_ordering holds some back).
        self.direct_answers = True
        # --rate-limit=execution_count: a frame holds its instance's resources while it runs.
        self.limiter: RateLimiter | None = None
        # True: inputs staged into an arena keep their door buffer too, to be staged again
        # when the model reschedules the request (iterative_sequence).
        self.keep_inputs = False
        self._restarts: set[asyncio.Task[None]] = set()
        self._trim_timer: asyncio.TimerHandle | None = None

    # --- lifecycle ----------------------------------------------------------------------
    async def start(self) -> None:
        """Start every instance; the first failure stops the others and is raised."""
        results = await asyncio.gather(*(self._start_slot(slot) for slot in self.slots),
                                       return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            await self.stop(timeout=5.0)
            error = errors[0]
            raise error if isinstance(error, ServeError) else unavailable(str(error))
        self._schedule_trim()

    def _schedule_trim(self) -> None:
        period = self._settings.arena_idle_secs
        if period > 0 and not self.closing:
            self._trim_timer = asyncio.get_running_loop().call_later(period, self._trim_idle)

    def _trim_idle(self) -> None:
        """Every ``arena_idle_secs``: instances idle since the last check shrink their arenas;
        the heap's free pages go back to the system after a large request."""
        trimmed = [slot.trim_if_idle() for slot in self.slots]
        if any(trimmed):
            trim_heap()
        self._schedule_trim()

    async def _start_slot(self, slot: InstanceSlot) -> None:
        slot.generation += 1
        owner = f"w{slot.uid}g{slot.generation}"
        spec = self._make_spec(slot.plan, owner, slot.lanes)
        worker = self._new_worker(spec, slot.plan.name,
                                  lambda w, reason: self._on_worker_exit(slot, w, reason))
        slot.worker = worker
        if self.decoupled:
            worker.on_partial = lambda frame: self._on_partial(slot, worker, frame)
        slot.output_reader.close()
        slot.served = False
        await worker.start(self.limits)
        slot.started_at = time.monotonic()
        slot.add_lanes(getattr(worker, "concurrency", 1))
        slot.free_lanes = list(range(slot.lanes))

    async def stop(self, timeout: float) -> None:
        self.closing = True
        if self._trim_timer is not None:
            self._trim_timer.cancel()
        for task in list(self._restarts):
            task.cancel()
        await asyncio.gather(*(slot.worker.stop(timeout) for slot in self.slots
                               if slot.worker is not None), return_exceptions=True)
        for slot in self.slots:
            slot.close()

    @property
    def ready(self) -> bool:
        return not self.closing and all(slot.serving for slot in self.slots)

    def crash_loop_reason(self) -> str:
        """Why the version is not serving, while an instance of it is crash-looping."""
        reasons = []
        for slot in self.slots:
            if slot.crash_looping:
                waiting = f"; next restart in {slot.backoff:.1f}s" if slot.backoff else ""
                reasons.append(
                    f"instance {slot.plan.name} failed {slot.failures} starts in a row before "
                    f"serving ({_restarts(slot)}; last exit: {slot.last_exit}){waiting}")
        return "crash-looping: " + "; ".join(reasons) if reasons else ""

    @property
    def busy(self) -> bool:
        """Some frame is in flight, or a decoupled request is still open."""
        return any(slot.inflight or slot.streams for slot in self.slots)

    def release_regions(self, region_ids: list[int]) -> None:
        for slot in self.slots:
            if slot.worker is not None:
                slot.worker.release_regions(region_ids)

    # --- sending ------------------------------------------------------------------------
    def least_loaded(self) -> InstanceSlot | None:
        """The live instance with the most free lanes, if it has one (and, rate limited,
        its resources are free)."""
        best: InstanceSlot | None = None
        for slot in self.slots:
            if slot.free_lanes and (best is None or len(slot.free_lanes) > len(best.free_lanes))\
                    and slot.alive and (self.limiter is None or self.may_run(slot)):
                best = slot
                if len(slot.free_lanes) == slot.lanes:
                    break
        return best

    def may_run(self, slot: InstanceSlot) -> bool:
        """Whether the rate limiter lets ``slot`` start a frame now; if not, the owner's
        dispatch runs again once resources are released."""
        limiter = self.limiter
        if limiter is None or limiter.can_run(slot.plan):
            return True
        limiter.wait(slot.plan, self._owner.dispatch)
        return False

    def free_instances(self) -> int:
        return sum(1 for slot in self.slots if slot.free_lanes and slot.alive)

    def withdraw(self, request: InferRequest) -> None:
        """A request sent ahead whose caller gave up: the worker skips it if not started.
        A decoupled request is over at once (its regions released): the model sees
        is_cancelled(), and what it still sends is dropped."""
        if request.sent is None:
            return
        worker, batch_id, index = request.sent
        if not self.decoupled:
            worker.withdraw(batch_id, index)
            return
        worker.withdraw(batch_id, index, streaming=True)
        for slot in self.slots:
            if slot.streams.get((batch_id, index)) is request:
                del slot.streams[(batch_id, index)]
        if not request.done:
            self._owner.finish(request, unavailable("request cancelled by the client"))
        self._owner.dispatch()  # (the version may be idle now)

    def send(self, slot: InstanceSlot, batch: list[InferRequest], each: bool) -> None:
        """Stage ``batch`` into a free lane of ``slot`` and send it as one frame. Inputs of
        ``OFF_LOOP_BYTES`` or more are written into the lane's arena by a thread meanwhile
        the loop serves others; the frame goes once they are in."""
        worker = slot.worker
        assert worker is not None
        lane = slot.free_lanes.pop()
        if self.limiter is not None:
            self.limiter.acquire(slot.plan)
        try:
            frames, writes = self._frames(slot.input_arenas[lane], batch, worker)
        except Exception as exc:  # e.g. /dev/shm full while growing the arena
            self._staging_failed(slot, worker, lane, batch, exc)
            return
        if not writes:
            self._execute(slot, worker, lane, batch, each, frames)
            return
        loop = asyncio.get_running_loop()
        jobs = [(os.dup(segment.fd), offset, data) for segment, offset, data in writes]
        staged_bytes = sum(len(data) for _, _, data in writes)
        copied = loop.run_in_executor(None, _write_inputs, jobs)

        def staged(done: asyncio.Future[None]) -> None:
            for fd, _, _ in jobs:
                os.close(fd)
            jobs.clear()  # its views of the door's buffers, before the heap is trimmed
            exc = done.exception()
            if exc is not None:
                self._staging_failed(slot, worker, lane, batch, exc)
                return
            for request in batch:
                for tensor in request.inputs:
                    if tensor.region is None and tensor.data is not None \
                            and len(tensor.data) > INLINE_LIMIT and not self.keep_inputs:
                        tensor.data = None  # staged: the door's buffer can go
            if staged_bytes >= KEEP_BYTES:  # smaller ones stay for the next (heap.py)
                trim_heap()  # gRPC's receive buffers for it were freed: give their pages back
            self._execute(slot, worker, lane, batch, each, frames)

        copied.add_done_callback(staged)

    def _execute(self, slot: InstanceSlot, worker: WorkerHandle, lane: int,
                 batch: list[InferRequest], each: bool, frames: list[list[Any]]) -> None:
        on_done = self._on_done_streams if self.decoupled else self._on_done
        batch_id = worker.execute(
            frames, lane, each, lambda result: on_done(slot, worker, lane, batch, result))
        for index, request in enumerate(batch):
            request.sent = (worker, batch_id, index)
            if self.decoupled and not request.done:
                slot.streams[(batch_id, index)] = request

    def _staging_failed(self, slot: InstanceSlot, worker: WorkerHandle, lane: int,
                        batch: list[InferRequest], exc: BaseException) -> None:
        if slot.worker is worker:  # (a replaced worker's lanes were all freed)
            slot.free_lanes.append(lane)
        if self.limiter is not None:
            self.limiter.release(slot.plan)
        error = exc if isinstance(exc, ServeError) else unavailable(
            f"failed to stage inputs in shared memory: {exc}")
        for request in batch:
            if not request.done:
                self._owner.finish(request, error)
        self._owner.dispatch()

    def _frames(self, arena: Arena, batch: list[InferRequest], worker: WorkerHandle
                ) -> tuple[list[list[Any]], list[tuple[Segment, int, bytes | memoryview | Pieces]]]:
        """The frames of ``batch``, its large inputs staged into ``arena``; or, when they
        come to OFF_LOOP_BYTES or more, the writes still to do (segment, offset, data)."""
        staged = sum(_align(len(t.data)) for r in batch for t in r.inputs
                     if t.data is not None and len(t.data) > INLINE_LIMIT)
        segment = arena.ensure(staged) if staged else None
        off_loop = staged >= OFF_LOOP_BYTES
        writes: list[tuple[Segment, int, bytes | memoryview | Pieces]] = []
        offset = 0
        frames = []
        for request in batch:
            refs = []
            for tensor in request.inputs:
                if tensor.region is not None:
                    region = tensor.region
                    refs.append(TensorRef(tensor.name, tensor.datatype, tensor.shape,
                                          *_region_location(region, worker),
                                          region.offset + tensor.offset, tensor.nbytes).pack())
                elif tensor.data is not None and len(tensor.data) > INLINE_LIMIT:
                    assert segment is not None
                    size = len(tensor.data)
                    if off_loop:
                        writes.append((segment, offset, tensor.data))
                    else:
                        segment.write(offset, tensor.data)
                        if not self.keep_inputs:
                            tensor.data = None  # staged: the door's buffer can go
                    refs.append(TensorRef(tensor.name, tensor.datatype, tensor.shape, ARENA,
                                          segment.key, offset, size).pack())
                    offset += _align(size)
                else:
                    refs.append(packed_inline(tensor.name, tensor.datatype, tensor.shape,
                                              bytes(tensor.data or b"")))
            outputs: list[list[Any]] = []
            for output in request.outputs:
                destination = None
                if output.region is not None:
                    region = output.region
                    destination = TensorRef(output.name, "", [], *_region_location(region,
                                                                                   worker),
                                            region.offset + output.offset,
                                            output.byte_size).pack()
                if output.class_count:
                    outputs.append([output.name, destination, output.by_reference,
                                    output.class_count])
                else:
                    outputs.append([output.name, destination, True] if output.by_reference
                                   else [output.name, destination])
            reply = request.reply
            tag = reply.direct_tag(worker) if reply.direct and self.direct_answers else None
            ring = None
            if request.ring is not None:
                ring_at = request.ring
                ring = [TensorRef("", "", [], *_region_location(ring_at.region, worker),
                                  ring_at.region.offset + ring_at.offset,
                                  ring_bytes(ring_at.slot_bytes, ring_at.slots)).pack(),
                        ring_at.slot_bytes, ring_at.slots]
            frames.append(packed_exec_request(request.request_id, refs, outputs,
                                              request.parameters, request.correlation_id, tag,
                                              ring))
        if staged >= KEEP_BYTES and not off_loop:  # smaller ones stay for the next (heap.py)
            trim_heap()  # gRPC's receive buffers for it were freed: give their pages back now
        return frames, writes

    # --- answers ------------------------------------------------------------------------
    def _on_done(self, slot: InstanceSlot, worker: WorkerHandle, lane: int,
                 batch: list[InferRequest], result: Done | BaseException) -> None:
        if isinstance(result, BaseException):
            for request in batch:
                self._owner.finish(request, result)
            self._frame_answered(slot, worker, lane)
            return
        answers: list[Answer] = []
        for _, answer in zip(batch, result.results, strict=True):
            kind = answer[0]
            if kind == RESULT_OK:
                try:
                    answers.append([self._read_output(slot, raw) for raw in answer[1]])
                except OSError as exc:
                    answers.append(unavailable(f"failed to read outputs: {exc}"))
            elif kind == RESULT_ANSWERED:
                answers.append(None)
            elif kind == RESULT_RESCHEDULED:
                answers.append(RESCHEDULE)
            else:  # RESULT_ERROR
                answers.append(ServeError.from_tuple((answer[1], answer[2])))
        pending = sum(output.nbytes for outputs in answers if isinstance(outputs, list)
                      for output in outputs if output.pending)
        if pending >= OFF_LOOP_BYTES:
            self._answer_off_loop(slot, worker, lane, batch, result, answers)
        else:
            self._answer(slot, worker, lane, batch, result, answers)

    def _answer(self, slot: InstanceSlot, worker: WorkerHandle, lane: int,
                batch: list[InferRequest], result: Done,
                answers: list[Answer]) -> None:
        slot.served = True
        _note_executions(batch, result.executions)  # before the requests finish
        finish = self._owner.finish
        for request, outputs in zip(batch, answers, strict=True):
            if isinstance(outputs, _Reschedule):
                self._owner.reschedule(request)
                continue
            finish(request, outputs)
            if isinstance(outputs, list) and not request.cancelled:  # (nobody holds those)
                _settle(outputs)
        for indices, *timings in result.executions:
            self._owner.executed(sum(batch[i].batch_size for i in indices), len(indices),
                                 timings)
        self._frame_answered(slot, worker, lane)

    def _answer_off_loop(self, slot: InstanceSlot, worker: WorkerHandle, lane: int,
                         batch: list[InferRequest], result: Done,
                         answers: list[Answer]) -> None:
        """Large outputs: each request's reply ``prepare``s its answer (copies the outputs
        out of the arena) on a thread, through descriptors of its own (a restart may close
        the slot's meanwhile); the lane stays held until then, the loop serves others."""
        readers: dict[int, FileReader] = {}
        jobs = []
        for request, outputs in zip(batch, answers, strict=True):
            if not isinstance(outputs, list) or request.cancelled:
                continue
            for output in outputs:
                output.read_through(readers)
            jobs.append((request.reply, outputs))
        copied = asyncio.get_running_loop().run_in_executor(None, _prepare_answers, jobs)

        def prepared(_: asyncio.Future[None]) -> None:
            try:
                self._answer(slot, worker, lane, batch, result, answers)
            finally:
                for reader in readers.values():
                    reader.close()

        copied.add_done_callback(prepared)

    def _frame_answered(self, slot: InstanceSlot, worker: WorkerHandle, lane: int) -> None:
        if slot.worker is worker:  # not a replaced worker's late answer
            slot.free_lanes.append(lane)  # only now: its outputs were read
        if self.limiter is not None:
            self.limiter.release(slot.plan)
        slot.frames_done += 1
        self._owner.dispatch()

    def _on_done_streams(self, slot: InstanceSlot, worker: WorkerHandle, lane: int,
                         batch: list[InferRequest], result: Done | BaseException) -> None:
        """Done of a decoupled model's frame: a request answered STREAMING stays open until
        its final Partial (which may have come already); any other result ends it."""
        finish = self._owner.finish
        if not isinstance(result, BaseException):
            _note_executions(batch, result.executions)  # before the requests finish
        answers: list[Any] = ([None] * len(batch) if isinstance(result, BaseException)
                              else result.results)
        for request, answer in zip(batch, answers, strict=True):
            if request.done:
                continue
            if answer is not None and answer[0] == RESULT_STREAMING:
                continue
            if request.sent is not None:
                slot.streams.pop(request.sent[1:], None)
            if answer is not None and answer[0] == RESULT_RESCHEDULED:
                self._owner.reschedule(request)
            elif answer is None:
                assert isinstance(result, BaseException)
                finish(request, result)
            elif answer[0] == RESULT_OK:
                try:
                    outputs = [self._read_output(slot, raw) for raw in answer[1]]
                except OSError as exc:
                    finish(request, unavailable(f"failed to read outputs: {exc}"))
                    continue
                finish(request, outputs)
                _settle(outputs)
            else:
                finish(request, ServeError.from_tuple((answer[1], answer[2])))
        if not isinstance(result, BaseException):
            slot.served = True
            for indices, *timings in result.executions:
                self._owner.executed(sum(batch[i].batch_size for i in indices), len(indices),
                                     timings)
        if slot.worker is worker:
            slot.free_lanes.append(lane)
        if self.limiter is not None:
            self.limiter.release(slot.plan)
        slot.frames_done += 1
        self._owner.dispatch()

    def _on_partial(self, slot: InstanceSlot, worker: WorkerHandle, frame: list[Any]) -> None:
        """One response of a decoupled request, from the worker."""
        partial = Partial.unpack(frame)
        key = (partial.batch, partial.index)
        request = slot.streams.get(key)
        if request is None or request.sent is None or request.sent[0] is not worker:
            return  # cancelled, or already ended (the worker's late words)
        if partial.final:
            del slot.streams[key]
        answer = partial.result
        response: list[OutputTensor] | ServeError | None = None
        if answer is not None:
            if answer[0] == RESULT_OK:
                try:
                    response = [self._read_output(slot, raw) for raw in answer[1]]
                except OSError as exc:
                    response = unavailable(f"failed to read outputs: {exc}")
            else:
                response = ServeError.from_tuple((answer[1], answer[2]))
        self._owner.respond(request, response, partial.final)
        if isinstance(response, list):
            _settle(response)

    def _fail_streams(self, slot: InstanceSlot, worker: WorkerHandle, reason: str) -> None:
        """The worker is gone: its decoupled requests still open end with an error."""
        for key, request in list(slot.streams.items()):
            if request.sent is not None and request.sent[0] is worker:
                del slot.streams[key]
                self._owner.finish(request, unavailable(
                    f"worker for model instance '{slot.plan.name}' {reason} while the "
                    f"request's responses were being sent; the request is ended"))

    def _read_output(self, slot: InstanceSlot, raw: list[Any]) -> OutputTensor:
        if raw[3] == INLINE:  # the common small case, read off the packed TensorRef
            return OutputTensor(raw[0], raw[1], raw[2], raw[4])
        ref = TensorRef.unpack(raw)
        if ref.where == ARENA:
            segment = slot.output_reader.view(ref.location)
            if segment.size > ARENA_INITIAL_BYTES:
                slot.output_grown = True
            if ref.offset < 0 or ref.nbytes < 0 or ref.offset + ref.nbytes > segment.size:
                raise OSError(f"output '{ref.name}' lies past the end of the output arena")
            # Pending: the door may copy it straight into its answer (see OutputTensor).
            return OutputTensor(ref.name, ref.datatype, ref.shape, None,
                                (segment, ref.offset, ref.nbytes))
        return OutputTensor(ref.name, ref.datatype, ref.shape, None,
                            region_nbytes=ref.nbytes, offset=ref.offset,
                            region_id=ref.location[0])

    # --- worker death -------------------------------------------------------------------
    def _on_worker_exit(self, slot: InstanceSlot, worker: WorkerHandle, reason: str) -> None:
        if slot.streams:
            self._fail_streams(slot, worker, reason)
        if slot.worker is not worker or self.closing or not worker.became_ready:
            return
        slot.free_lanes = list(range(slot.lanes))
        slot.last_exit = reason
        lived = time.monotonic() - slot.started_at
        if slot.served or lived >= _SETTLED_SECS:
            slot.failures = 0  # not a failing start: restart at once
        else:
            slot.failures += 1
        task = asyncio.get_running_loop().create_task(self._restart(slot))
        self._restarts.add(task)
        task.add_done_callback(self._restarts.discard)

    async def _restart(self, slot: InstanceSlot) -> None:
        while not self.closing:
            delay = restart_delay(slot.failures, self._settings.restart_backoff_max_secs)
            if delay:
                slot.backoff = delay
                log.warning("model '%s' instance %s failed %d start(s) in a row before serving "
                            "(%s; last exit: %s)%s; restarting in %.1fs", self.model,
                            slot.plan.name, slot.failures, _restarts(slot), slot.last_exit,
                            "; crash-looping" if slot.crash_looping else "", delay)
                try:
                    await asyncio.sleep(delay)
                finally:
                    slot.backoff = 0.0
                if self.closing:
                    return
            try:
                await self._start_slot(slot)
            except ServeError as exc:
                slot.failures += 1
                slot.last_exit = exc.message
                if not any(s.alive for s in self.slots):
                    self._owner.no_live_instance(unavailable(
                        f"model '{self.model}' has no live instance: {exc.message}"))
                continue
            log.info("instance %s restarted (pid %s)", slot.plan.name, slot.worker and
                     slot.worker.pid)
            self._owner.dispatch()
            return
