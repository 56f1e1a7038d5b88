"""Per model-version scheduling: one queue, its instances, dynamic batching, restarts.

An instance executes one batch at a time; up to ``pipeline_depth`` batches are sent to it ahead,
so the next one is already in the worker's socket when the current one ends (the worker never
waits a round trip through the supervisor between batches). Payload inputs above the inline
limit are written once into the instance's input arena when the batch is dispatched;
everything else travels as a reference. Outputs come back inline, in the worker's output
arena (copied once here), or already written into the client's region; a local-channel
request's answer may have gone to its client from the worker already (``Reply.direct_tag``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from shmserve.daemon.errors import ServeError, internal, unavailable
from shmserve.daemon.model_config import InstancePlan
from shmserve.daemon.request import InferRequest, OutputTensor
from shmserve.daemon.settings import Settings
from shmserve.daemon.shm_registry import Region
from shmserve.daemon.statistics import ModelStats
from shmserve.daemon.worker_process import WorkerProcess
from shmserve.workers.protocol import (
    ARENA,
    CUDA,
    INLINE,
    INLINE_LIMIT,
    RESULT_ANSWERED,
    RESULT_OK,
    SYSTEM,
    Done,
    TensorRef,
    WorkerSpec,
    packed_exec_request,
    packed_inline,
)
from shmserve.workers.shm import Arena, ReaderMapping

log = logging.getLogger("shmserve.scheduler")
_slot_ids = itertools.count(1)
_STABLE_SECS = 30.0
FRAME_WORK_NS = 200_000      # see Scheduler._requests_per_frame
MAX_FRAME_REQUESTS = 16
_TIMED_BEFORE_GROUPING = 8


def _align(nbytes: int) -> int:
    return (nbytes + 63) // 64 * 64


def _region_location(region: Region) -> tuple[str, list[Any]]:
    """(where, location) of a client region in a TensorRef.

    CUDA regions travel as [id, raw 64-byte handle, device id]: the worker opens the handle.
    """
    if region.kind == "cuda":
        return CUDA, [region.region_id, region.raw_handle, region.device_id]
    return SYSTEM, [region.region_id, region.key]


class InstanceSlot:
    """One model instance: its current worker process and the arenas it shares with it.

    Each batch in flight holds a *lane*: its own input arena here and output arena in the
    worker, so a batch sent ahead never overwrites the one running or being read back.
    """

    def __init__(self, plan: InstancePlan, supervisor_pid: int, lanes: int) -> None:
        self.plan = plan
        self.uid = next(_slot_ids)
        self.worker: WorkerProcess | None = None
        self.lanes = lanes
        self.free_lanes = list(range(lanes))
        self.generation = 0
        self.failures = 0
        self.started_at = 0.0
        self.input_arenas = [Arena(supervisor_pid, f"w{self.uid}i{lane}")
                             for lane in range(lanes)]
        self.output_reader = ReaderMapping(capacity=2 * lanes)

    @property
    def inflight(self) -> int:
        """Frames sent and not answered yet."""
        return self.lanes - len(self.free_lanes)

    @property
    def alive(self) -> bool:
        return self.worker is not None and self.worker.alive

    def close(self) -> None:
        for arena in self.input_arenas:
            arena.close()
        self.output_reader.close()


class Scheduler:
    def __init__(self, model: str, version: int, max_batch_size: int, batching: Any,
                 plans: list[InstancePlan],
                 make_spec: Callable[[InstancePlan, str, int], WorkerSpec],
                 settings: Settings, supervisor_pid: int,
                 on_finished: Callable[[InferRequest], None]) -> None:
        self.model = model
        self.version = version
        self.stats = ModelStats()
        self._max_batch = max(max_batch_size, 1)
        self._dynamic = batching is not None
        self._preferred = sorted(batching.preferred_batch_size) if batching is not None else []
        self._delay_ns = batching.max_queue_delay_microseconds * 1000 if batching else 0
        self._max_queue = (batching.default_queue_policy.max_queue_size
                           if batching is not None else 0)
        self._make_spec = make_spec
        self._on_finished = on_finished  # the core's accounting, once per request
        self._settings = settings
        depth = max(1, settings.pipeline_depth)
        self._slots = [InstanceSlot(plan, supervisor_pid, depth) for plan in plans]
        self._queue: deque[InferRequest] = deque()
        self._timer: asyncio.TimerHandle | None = None
        self._abandoned = 0
        self._dispatch_scheduled = False
        self._closing = False
        self._restarts: set[asyncio.Task[None]] = set()
        self._idle = asyncio.Event()
        self._idle.set()

    # --- lifecycle ----------------------------------------------------------------------
    async def start(self) -> None:
        """Start every instance; the first failure stops the others and is raised."""
        results = await asyncio.gather(*(self._start_slot(slot) for slot in self._slots),
                                       return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            await self.stop(timeout=5.0)
            error = errors[0]
            raise error if isinstance(error, ServeError) else unavailable(str(error))

    async def _start_slot(self, slot: InstanceSlot) -> None:
        slot.generation += 1
        owner = f"w{slot.uid}g{slot.generation}"
        spec = self._make_spec(slot.plan, owner, slot.lanes)
        worker = WorkerProcess(spec, slot.plan.name,
                               lambda w, reason: self._on_worker_exit(slot, w, reason))
        slot.worker = worker
        slot.output_reader.close()
        await worker.start(self._settings.worker_heartbeat_secs, self._settings.worker_hang_secs)
        slot.started_at = time.monotonic()
        slot.free_lanes = list(range(slot.lanes))

    @property
    def ready(self) -> bool:
        return not self._closing and all(slot.alive for slot in self._slots)

    @property
    def instances(self) -> list[InstanceSlot]:
        return list(self._slots)

    async def drain(self, timeout: float) -> None:
        """Wait until queued and executing requests finished (or the timeout passed)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout)

    async def stop(self, timeout: float) -> None:
        self._closing = True
        for task in list(self._restarts):
            task.cancel()
        if self._timer is not None:
            self._timer.cancel()
        self._fail_queue(unavailable(f"model '{self.model}' is being unloaded"))
        await asyncio.gather(*(slot.worker.stop(timeout) for slot in self._slots
                               if slot.worker is not None), return_exceptions=True)
        for slot in self._slots:
            slot.close()

    # --- requests -----------------------------------------------------------------------
    def submit(self, request: InferRequest) -> None:
        if self._closing:
            raise unavailable(f"model '{self.model}' is being unloaded")
        if self._max_queue and len(self._queue) >= self._max_queue:
            raise unavailable("Exceeds maximum queue size")
        request.received_ns = request.received_ns or time.perf_counter_ns()
        request.scheduler = self
        self._queue.append(request)
        self.stats.pending += 1
        self._idle.clear()
        if not self._dispatch_scheduled:
            # Dispatched once the loop has handled what else arrived in this iteration:
            # requests that came together (one client doorbell) travel in one frame.
            self._dispatch_scheduled = True
            asyncio.get_running_loop().call_soon(self._scheduled_dispatch)

    def _scheduled_dispatch(self) -> None:
        self._dispatch_scheduled = False
        self._dispatch()

    def release_regions(self, region_ids: list[int]) -> None:
        for slot in self._slots:
            if slot.worker is not None:
                slot.worker.release_regions(region_ids)

    def _dispatch(self) -> None:
        self._drop_abandoned()
        queue = self._queue
        while queue:
            slot = self._least_loaded()
            if slot is None:
                break
            if self._dynamic:
                batch = self._take_batch()
                if batch is None:
                    break
                self._send(slot, batch, each=False)
            else:
                count = min(len(queue), self._requests_per_frame())
                self._send(slot, [queue.popleft() for _ in range(count)], each=count > 1)
        if not self._queue and not any(s.inflight for s in self._slots):
            self._idle.set()

    def _least_loaded(self) -> InstanceSlot | None:
        """The live instance with the most free lanes, if it has one."""
        best: InstanceSlot | None = None
        for slot in self._slots:
            if slot.free_lanes and (best is None or len(slot.free_lanes) > len(best.free_lanes))\
                    and slot.alive:
                best = slot
                if len(slot.free_lanes) == slot.lanes:
                    break
        return best

    def _requests_per_frame(self) -> int:
        """Without dynamic batching every request is its own execution, but a quick model's
        requests travel to the worker several to a frame (one wake-up and one answer for
        them all) while the frame's expected work stays under FRAME_WORK_NS, so a result is
        never held back long. Until timings exist, one per frame."""
        stats = self.stats
        executed = stats.compute_infer.count
        if executed < _TIMED_BEFORE_GROUPING:
            return 1
        per_request = (stats.compute_input.ns + stats.compute_infer.ns
                       + stats.compute_output.ns) // executed
        count = max(1, min(MAX_FRAME_REQUESTS, FRAME_WORK_NS // max(per_request, 1)))
        if count > 1 and len(self._slots) > 1:  # share what is queued among free instances
            free = sum(1 for slot in self._slots if slot.free_lanes and slot.alive)
            count = max(1, min(count, -(-len(self._queue) // max(free, 1))))
        return count

    def cancel(self, request: InferRequest) -> None:
        """Its caller gave up: drop it from the queue, or withdraw it from the worker it was
        sent ahead to (skipped there unless it started); its reply is not called."""
        request.cancelled = True
        if request.sent is not None:
            worker, batch_id, index = request.sent
            worker.withdraw(batch_id, index)
            return
        self._abandoned += 1
        self._dispatch()

    def _drop_abandoned(self) -> None:
        """Drop queued requests whose caller gave up (counted, so no scan per dispatch)."""
        if self._abandoned:
            self._abandoned = 0
            kept: deque[InferRequest] = deque()
            for request in self._queue:
                if request.cancelled:
                    self.stats.pending -= 1
                    self._finish(request, unavailable("request cancelled by the client"))
                else:
                    kept.append(request)
            self._queue = kept

    def _take_batch(self) -> list[InferRequest] | None:
        queue = self._queue
        if not self._dynamic:
            return [queue.popleft()]
        total = 0
        count = 0
        sizes: list[int] = []
        for request in queue:
            if total + request.batch_size > self._max_batch:
                break
            total += request.batch_size
            count += 1
            sizes.append(total)
        count = max(count, 1)
        full = total >= self._max_batch or count < len(queue)
        if not full and self._delay_ns and total not in self._preferred:
            waited = time.perf_counter_ns() - queue[0].received_ns
            if waited < self._delay_ns:
                if self._timer is None:
                    delay = (self._delay_ns - waited) / 1e9
                    self._timer = asyncio.get_running_loop().call_later(delay, self._on_timer)
                return None
        if self._preferred and total not in self._preferred:
            best = max((i for i, size in enumerate(sizes) if size in self._preferred),
                       default=None)
            if best is not None:
                count = best + 1
        return [queue.popleft() for _ in range(count)]

    def _on_timer(self) -> None:
        self._timer = None
        self._dispatch()

    def _send(self, slot: InstanceSlot, batch: list[InferRequest], each: bool) -> None:
        worker = slot.worker
        assert worker is not None
        lane = slot.free_lanes.pop()
        now = time.perf_counter_ns()
        for request in batch:
            self.stats.queue.add(now - request.received_ns)
            self.stats.pending -= 1
        try:
            frames = self._frames(slot.input_arenas[lane], batch, worker)
        except Exception as exc:  # e.g. /dev/shm full while growing the arena
            slot.free_lanes.append(lane)
            error = exc if isinstance(exc, ServeError) else unavailable(
                f"failed to stage inputs in shared memory: {exc}")
            for request in batch:
                self._finish(request, error)
            self._dispatch()
            return
        batch_id = worker.execute(
            frames, lane, each, lambda result: self._on_done(slot, worker, lane, batch, result))
        for index, request in enumerate(batch):
            request.sent = (worker, batch_id, index)

    def _frames(self, arena: Arena, batch: list[InferRequest], worker: WorkerProcess
                ) -> list[list[Any]]:
        staged = sum(_align(len(t.data)) for r in batch for t in r.inputs
                     if t.data is not None and len(t.data) > INLINE_LIMIT)
        segment = arena.ensure(staged) if staged else None
        offset = 0
        frames = []
        for request in batch:
            refs = []
            for tensor in request.inputs:
                if tensor.region is not None:
                    region = tensor.region
                    refs.append(TensorRef(tensor.name, tensor.datatype, tensor.shape,
                                          *_region_location(region),
                                          region.offset + tensor.offset, tensor.nbytes).pack())
                elif tensor.data is not None and len(tensor.data) > INLINE_LIMIT:
                    assert segment is not None
                    size = len(tensor.data)
                    segment.buf[offset:offset + size] = tensor.data
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
                    destination = TensorRef(output.name, "", [], *_region_location(region),
                                            region.offset + output.offset,
                                            output.byte_size).pack()
                outputs.append([output.name, destination])
            reply = request.reply
            tag = reply.direct_tag(worker) if reply.direct else None
            frames.append(packed_exec_request(request.request_id, refs, outputs,
                                              request.parameters, request.correlation_id, tag))
        return frames

    def _on_done(self, slot: InstanceSlot, worker: WorkerProcess, lane: int,
                 batch: list[InferRequest], result: Done | BaseException) -> None:
        if isinstance(result, BaseException):
            for request in batch:
                self._finish(request, result)
        else:
            for request, answer in zip(batch, result.results, strict=True):
                kind = answer[0]
                if kind == RESULT_OK:
                    try:
                        outputs = [self._read_output(slot, raw) for raw in answer[1]]
                    except OSError as exc:
                        self._finish(request, unavailable(f"failed to read outputs: {exc}"))
                        continue
                    self._finish(request, outputs)
                elif kind == RESULT_ANSWERED:
                    self._finish(request, None)
                else:  # RESULT_ERROR
                    self._finish(request, ServeError.from_tuple((answer[1], answer[2])))
            for indices, *timings in result.executions:
                self.stats.record_batch(sum(batch[i].batch_size for i in indices),
                                        len(indices), timings)
        if slot.worker is worker:  # not a replaced worker's late answer
            slot.free_lanes.append(lane)  # only now: its outputs were read above
        self._dispatch()

    def _read_output(self, slot: InstanceSlot, raw: list[Any]) -> OutputTensor:
        if raw[3] == INLINE:  # the common small case, read off the packed TensorRef
            return OutputTensor(raw[0], raw[1], raw[2], raw[4])
        ref = TensorRef.unpack(raw)
        if ref.where == ARENA:
            segment = slot.output_reader.view(ref.location)
            return OutputTensor(ref.name, ref.datatype, ref.shape,
                                bytes(segment.buf[ref.offset:ref.offset + ref.nbytes]))
        return OutputTensor(ref.name, ref.datatype, ref.shape, None)

    def _finish(self, request: InferRequest,
                result: list[OutputTensor] | BaseException | None) -> None:
        """Account for a completed request and answer it through its reply (``None``: the
        worker answered it directly), unless its caller gave up."""
        ok = not isinstance(result, BaseException)
        self.stats.record_request(ok, time.perf_counter_ns() - request.received_ns)
        self._on_finished(request)
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

    def _fail_queue(self, error: ServeError) -> None:
        while self._queue:
            request = self._queue.popleft()
            self.stats.pending -= 1
            self._finish(request, error)
        self._idle.set()

    # --- worker death -------------------------------------------------------------------
    def _on_worker_exit(self, slot: InstanceSlot, worker: WorkerProcess, reason: str) -> None:
        if slot.worker is not worker or self._closing or not worker.became_ready:
            return
        slot.free_lanes = list(range(slot.lanes))
        lived = time.monotonic() - slot.started_at
        slot.failures = 0 if lived > _STABLE_SECS else slot.failures + 1
        task = asyncio.get_running_loop().create_task(self._restart(slot))
        self._restarts.add(task)
        task.add_done_callback(self._restarts.discard)

    async def _restart(self, slot: InstanceSlot) -> None:
        while not self._closing:
            delay = min(0.05 * (2 ** slot.failures), 10.0) if slot.failures else 0.0
            await asyncio.sleep(delay)
            try:
                await self._start_slot(slot)
            except ServeError as exc:
                slot.failures += 1
                log.error("restart of %s failed: %s", slot.plan.name, exc.message)
                if not any(s.alive for s in self._slots):
                    self._fail_queue(unavailable(
                        f"model '{self.model}' has no live instance: {exc.message}"))
                continue
            log.info("instance %s restarted (pid %s)", slot.plan.name, slot.worker and
                     slot.worker.pid)
            self._dispatch()
            return
