"""Worker process entry point: one model instance, pinned before anything imports CUDA.

The supervisor starts ``run_worker`` through the multiprocessing forkserver, so this process
never inherits gRPC or CUDA state. The control socket carries msgpack frames (see protocol.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import sys
import threading
import time
from collections import deque
from typing import Any

import msgpack
import numpy as np

from shmserve.protos import response_ring
from shmserve.workers import bls, protocol
from shmserve.workers.backend import (
    MODEL_LOGGER,
    Backend,
    BackendError,
    Request,
    Response,
    resolve_backend,
)
from shmserve.workers.busy_poll import BusyPoll
from shmserve.workers.classification import ClassificationError, Labels, classify
from shmserve.workers.copying import copy_bytes
from shmserve.workers.cuda_ipc import CudaRegions, DeviceOutput, host_array
from shmserve.workers.direct_answers import DirectAnswers
from shmserve.workers.lineage import set_parent_death_signal
from shmserve.workers.log_switches import LogSwitchFilter, apply_switches
from shmserve.workers.proctitle import set_process_title, worker_title
from shmserve.workers.protocol import (
    CUDA,
    INLINE_LIMIT,
    SYSTEM,
    ExecRequest,
    TensorRef,
    WorkerSpec,
)
from shmserve.workers.region_fds import adopt_region_fd
from shmserve.workers.reporter import start_reporter
from shmserve.workers.sequence_state import SequenceStates, StateConfigError
from shmserve.workers.shm import Arena, ReaderMapping, SegmentCache, trim_heap
from shmserve.workers.tensors import InputResolver, map_region, output_bytes
from shmserve.workers.warmup import run_warmup

log = logging.getLogger("shmserve.worker")


def pin_process(visible: str | None, cpus: list[int] | None) -> None:
    """Pin the process to its device and CPUs. Must run before anything imports CUDA."""
    if visible is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(visible)
    if cpus:
        os.sched_setaffinity(0, set(cpus))


def run_worker(sock: socket.socket, spec: WorkerSpec,
               fd_socket: socket.socket | None = None,
               bls_socket: socket.socket | None = None) -> None:
    pin_process(spec.cuda_visible_devices, spec.cpus)
    set_parent_death_signal()  # the fork server's death (it dies with the supervisor)
    set_process_title(worker_title(spec.model.name, spec.instance.name),
                      short_name=spec.instance.name)
    # Imported here, never at module level: the supervisor imports this module too and must
    # keep its own SIGTERM handling.
    from shmserve.workers.forkserver_setup import ignore_group_signals
    ignore_group_signals()
    logging.basicConfig(
        level=spec.log_level,
        format=f"%(asctime)s %(levelname)s [worker {spec.instance.name}] %(message)s",
        stream=sys.stderr,
    )
    # Model code's pb_utils.Logger: log_info is on by default, as in Triton (GetLogSettings
    # reports log_info true), while the rest of the worker logs warnings only.
    model_log = logging.getLogger(MODEL_LOGGER)
    model_log.setLevel(min(spec.log_level, logging.INFO))
    model_handler = logging.StreamHandler(sys.stderr)
    model_handler.setFormatter(logging.Formatter(
        f"%(asctime)s %(levelname)s [model {spec.model.name} version {spec.model.version}, "
        f"instance {spec.instance.name}] %(filename)s:%(lineno)d: %(message)s"))
    model_log.addHandler(model_handler)
    model_log.propagate = False
    _LOG_HANDLERS[:] = [*logging.getLogger().handlers, model_handler]
    for handler in _LOG_HANDLERS:
        handler.addFilter(_LOG_FILTER)
    if spec.log_switches is not None:
        _follow_log_switches(protocol.LogSwitches.unpack(spec.log_switches))
    bls.install(bls_socket, spec.model.name, spec.instance.name, spec.instance_count)
    host = WorkerHost(sock, spec, fd_socket)
    code = host.serve()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# The worker's log handlers and the filter they share (set up in main()).
_LOG_FILTER = LogSwitchFilter()
_LOG_HANDLERS: list[logging.Handler] = []


def _follow_log_switches(switches: protocol.LogSwitches) -> None:
    apply_switches(switches, _LOG_FILTER, _LOG_HANDLERS)
    verbose = switches.verbose > 0
    logging.getLogger().setLevel(logging.DEBUG if verbose else logging.WARNING)
    logging.getLogger(MODEL_LOGGER).setLevel(logging.DEBUG if verbose else logging.INFO)


class WorkerHost:
    def __init__(self, sock: socket.socket, spec: WorkerSpec,
                 fd_socket: socket.socket | None = None) -> None:
        self._sock = sock
        self._spec = spec
        self._send_lock = threading.Lock()
        self._stopped = threading.Event()
        self._regions = SegmentCache()
        self._input_arena = ReaderMapping()
        self._model = spec.model
        self._instance = spec.instance
        # Opens client CUDA IPC handles on first use (imports cuda-python/torch only then).
        self._cuda = CudaRegions(spec.instance.device_id
                                 if spec.instance.kind == "KIND_GPU" else None)
        self._resolver = InputResolver(self._regions, self._input_arena, self._cuda)
        self._output_arenas: dict[int, Arena] = {}
        self._backend: Backend | None = None
        self._hooks_done: list[str] = []
        self._incoming = BusyPoll(sock, spec.busy_poll_us)
        self._cancelled: set[tuple[int, int]] = set()  # (batch, index) withdrawn before running
        self._last_batch = 0
        self._direct = DirectAnswers(fd_socket)
        self._fd_socket = fd_socket
        self._model_version = str(spec.model.version)
        policy = spec.model.config.get("model_transaction_policy") or {}
        self._iterative = bool((spec.model.config.get("sequence_batching") or {})
                               .get("iterative_sequence"))
        self._decoupled = bool(policy.get("decoupled", False))
        self._streams: dict[tuple[int, int], StreamSink] = {}  # decoupled requests not final
        self._unpacker = protocol.new_unpacker()
        self._pending: deque[list[Any]] = deque()
        self._executing = False
        self._main_thread = threading.get_ident()
        # Implicit state of a sequence model's live sequences (set up in _initialize).
        self._states: SequenceStates | None = None
        self._labels: Labels | None = None    # classification labels, read on first use
        self._output_buffers = False  # the backend writes outputs into client regions itself

    def send(self, frame: list[Any]) -> None:
        data = protocol.encode(frame)
        with self._send_lock:
            self._sock.sendall(data)

    def serve(self) -> int:
        try:
            protocol.check_version(self._spec.protocol_version, "the supervisor")
            self._initialize()
        except Exception as exc:
            code = exc.code if isinstance(exc, BackendError) else "INTERNAL"
            message = exc.message if isinstance(exc, BackendError) else f"{exc}"
            log.debug("initialize failed: %s", message)  # the supervisor logs it, once
            with contextlib.suppress(OSError):
                self.send(protocol.InitFailed(protocol.PROTOCOL_VERSION, code, message).pack())
            self._finalize()
            return 3
        heartbeat = threading.Thread(target=self._heartbeat, name="heartbeat", daemon=True,
                                     args=(self._spec.heartbeat_secs,))
        heartbeat.start()
        concurrent = self._backend is not None and self._backend.concurrent
        bls.set_concurrent(concurrent)
        self.send(protocol.Ready(protocol.PROTOCOL_VERSION, os.getpid(),
                                 protocol.CONCURRENT_FRAMES if concurrent else 1).pack())
        if self._backend is not None:
            start_reporter(self._backend, self.send, self._stopped)
        try:
            if concurrent:
                asyncio.run(self._concurrent_loop())
            else:
                self._loop()
        finally:
            self._stopped.set()
            self._finalize()
        return 0

    def _initialize(self) -> None:
        spec = self._spec
        try:
            self._states = SequenceStates.from_config(spec.model.config,
                                                      spec.model.repository_path)
        except StateConfigError as exc:
            raise BackendError(str(exc), "INVALID_ARGUMENT") from None
        backend_cls = resolve_backend(spec.backend)
        backend = backend_cls()
        self._backend = backend
        self.send(protocol.Stage("backend_initialize").pack())
        backend.backend_initialize(spec.backend_config)
        self._hooks_done.append("backend")
        self.send(protocol.Stage("model_initialize").pack())
        backend.model_initialize(self._model)
        self._hooks_done.append("model")
        self.send(protocol.Stage("instance_initialize").pack())
        backend.instance_initialize(self._model, self._instance)
        self._hooks_done.append("instance")
        self._output_buffers = bool(backend.wants_output_buffers)
        if self._model.config.get("model_warmup"):
            self.send(protocol.Stage("model_warmup").pack())
            run_warmup(backend, self._model)

    def _finalize(self) -> None:
        backend = self._backend
        hooks = {"instance": "instance_finalize", "model": "model_finalize",
                 "backend": "backend_finalize"}
        for done in reversed(self._hooks_done):
            try:
                getattr(backend, hooks[done])()
            except Exception:
                log.exception("%s failed", hooks[done])
        self._hooks_done.clear()
        self._regions.close_all()
        self._cuda.close_all()
        self._input_arena.close()
        for arena in self._output_arenas.values():
            arena.close()
        self._direct.close_all()

    def _heartbeat(self, interval: float) -> None:
        """Prove from a second thread that the process and its interpreter still make progress.

        The main thread reads the control socket itself: handing frames over from a reader
        thread would cost a thread switch per request.
        """
        while not self._stopped.wait(interval):
            try:
                self.send(protocol.PONG_FRAME)
            except OSError:
                return

    def _loop(self) -> None:
        """Frames are handled in order, except that before each batch runs the frames already
        waiting are read: control frames among them (cancel, release, ping) take effect
        first, so a request withdrawn while it waited behind another batch is skipped."""
        unpacker = self._unpacker
        pending = self._pending
        just_read = False  # the socket was just drained: nothing can have waited since
        while True:
            if not pending:
                chunk = self._incoming.recv(1 << 20)
                if not chunk:
                    log.info("supervisor closed the control channel; exiting")
                    return
                unpacker.feed(chunk)
                pending.extend(unpacker)
                just_read = True
                continue
            frame = pending.popleft()
            kind = frame[0]
            if kind == protocol.EXEC:
                self._absorb(unpacker, pending, read_socket=not just_read)
                just_read = False
                self._executing = True
                try:
                    done = self._execute(protocol.Exec.unpack(frame))
                finally:
                    self._executing = False
                self.send(done)
            elif kind == protocol.STOP:
                return
            else:
                self._control(frame)

    async def _concurrent_loop(self) -> None:
        """The loop of a concurrent backend: every Exec frame runs as a task on this asyncio
        loop (Triton's ``async def execute``: requests of one instance overlap while they
        await), control frames are handled as they arrive. STOP waits for the running
        frames."""
        loop = asyncio.get_running_loop()
        unpacker = protocol.new_unpacker()
        running: set[asyncio.Task[None]] = set()
        finished: asyncio.Future[None] = loop.create_future()

        def readable() -> None:
            try:
                # The socket stays blocking for the sends (Done, heartbeat): read without it.
                chunk = self._sock.recv(1 << 20, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                chunk = b""
            if not chunk:
                log.info("supervisor closed the control channel; exiting")
                if not finished.done():
                    finished.set_result(None)
                return
            unpacker.feed(chunk)
            for frame in unpacker:
                kind = frame[0]
                if kind == protocol.EXEC:
                    task = loop.create_task(self._execute_async(protocol.Exec.unpack(frame)))
                    running.add(task)
                    task.add_done_callback(running.discard)
                elif kind == protocol.STOP:
                    if not finished.done():
                        finished.set_result(None)
                else:
                    self._control(frame)

        loop.add_reader(self._sock.fileno(), readable)
        try:
            await finished
        finally:
            loop.remove_reader(self._sock.fileno())
        if running:
            await asyncio.gather(*running, return_exceptions=True)

    def _control(self, frame: list[Any]) -> None:
        kind = frame[0]
        if kind == protocol.CANCEL:
            cancel = protocol.Cancel.unpack(frame)
            stream = self._streams.get((cancel.batch, cancel.index))
            if stream is not None:
                stream.cancelled = True
            elif cancel.batch > self._last_batch:
                self._cancelled.add((cancel.batch, cancel.index))
        elif kind == protocol.RELEASE:
            for region_id in protocol.Release.unpack(frame).region_ids:
                self._regions.release(region_id)
                self._cuda.release(region_id)
        elif kind == protocol.PING:
            self.send(protocol.PONG_FRAME)
        elif kind == protocol.ATTACH:
            attach = protocol.Attach.unpack(frame)
            self._direct.attach(attach.channel, attach.base, attach.capacity)
        elif kind == protocol.DETACH:
            self._direct.detach(protocol.Detach.unpack(frame).channel)
        elif kind == protocol.SHARE_REGION:
            adopt_region_fd(self._fd_socket, self._regions,
                            protocol.ShareRegion.unpack(frame).region_id)
        elif kind == protocol.TRIM:
            self._trim_arenas()
        elif kind == protocol.END_SEQUENCES:
            if self._states is not None:
                self._states.end(protocol.EndSequences.unpack(frame).correlation_ids)
        elif kind == protocol.LOG_SWITCHES:
            _follow_log_switches(protocol.LogSwitches.unpack(frame))
        else:
            log.error("unknown frame kind %r", kind)

    def _absorb(self, unpacker: msgpack.Unpacker, pending: deque[list[Any]],
                read_socket: bool) -> None:
        """Take the frames that arrived already (without waiting; not when the socket was
        just read) and apply the control frames among the pending ones; batches and STOP keep
        their order."""
        if read_socket:
            chunk = self._incoming.recv_waiting(1 << 20)
            if chunk:
                unpacker.feed(chunk)
                pending.extend(unpacker)
        if not pending:
            return
        kept = [frame for frame in pending if frame[0] in (protocol.EXEC, protocol.STOP)]
        if len(kept) != len(pending):
            for frame in pending:
                if frame[0] not in (protocol.EXEC, protocol.STOP):
                    self._control(frame)
            pending.clear()
            pending.extend(kept)

    def _execute(self, frame: protocol.Exec) -> list[Any]:
        """Run one Exec frame: its requests as one batch, or (``each``) one execute per
        request; outputs go to the arena of the frame's pipeline lane once all ran. Returns
        the Done frame."""
        run = _FrameRun(frame)
        self._last_batch = run.batch_id
        if self._output_buffers:
            run.placer = _ArenaPlacer(self._lane_arena(frame.lane))
        for group in run.groups:
            started = time.perf_counter_ns()
            requests, positions = self._requests(run.batch_id, run.exec_requests, group,
                                                 run.results, run.placer)
            if not requests:
                continue
            input_done = time.perf_counter_ns()
            chain = _bls_chain(requests)
            if chain:  # requests sent by BLS calls: calls they make extend their chain
                token = bls.current_chain.set(chain)
                try:
                    responses = self._run_backend(requests)
                finally:
                    bls.current_chain.reset(token)
            else:
                responses = self._run_backend(requests)
            if self._states is not None:
                self._keep_states(requests, responses)
            self._finish_group(run, positions, responses, started, input_done)
        return self._finish_frame(frame, run)

    async def _execute_async(self, frame: protocol.Exec) -> None:
        """``_execute`` for a concurrent backend, on the worker's loop; sends Done itself."""
        run = _FrameRun(frame)
        self._last_batch = max(self._last_batch, run.batch_id)
        backend = self._backend
        assert backend is not None
        for group in run.groups:
            started = time.perf_counter_ns()
            requests, positions = self._requests(run.batch_id, run.exec_requests, group,
                                                 run.results)
            if not requests:
                continue
            input_done = time.perf_counter_ns()
            bls.current_chain.set(_bls_chain(requests))  # this task's own context
            try:
                responses = await backend.execute_async(requests)
                if not isinstance(responses, list) or len(responses) != len(requests):
                    raise BackendError(f"backend returned no list of {len(requests)} "
                                       f"responses")
            except Exception as exc:
                log.exception("execute failed")
                error = exc if isinstance(exc, BackendError) else BackendError(f"{exc}")
                responses = [Response(error=error) for _ in requests]
            if self._states is not None:
                self._keep_states(requests, responses)
            self._finish_group(run, positions, responses, started, input_done)
        self.send(self._finish_frame(frame, run))

    def _finish_group(self, run: _FrameRun, positions: list[int], responses: list[Response],
                      started: int, input_done: int) -> None:
        """One execution's responses: answered directly, or kept for the lane's arena."""
        infer_done = time.perf_counter_ns()
        exec_requests, results, ready = run.exec_requests, run.results, run.ready
        for position, response in zip(positions, responses, strict=True):
            if response.streamed:  # answered through Partial frames (decoupled)
                results[position] = protocol.STREAMING
                continue
            if response.rescheduled:
                results[position] = self._rescheduled(run.batch_id, position)
                continue
            try:
                outputs = self._prepare_outputs(response, exec_requests[position].outputs,
                                                exec_requests[position].inputs)
            except BackendError as exc:
                results[position] = protocol.error_result(exc.code, exc.message)
                continue
            tag = exec_requests[position].tag
            if tag is not None and self._direct.fits(
                    tag, sum(len(item[3]) for item in outputs if item[4] is None)):
                results[position] = self._answer_directly(tag, outputs)
            else:
                ready.append((position, outputs))
        run.executions.append([positions, input_done - started, infer_done - input_done,
                               time.perf_counter_ns() - infer_done])

    def _finish_frame(self, frame: protocol.Exec, run: _FrameRun) -> list[Any]:
        """Ring the doorbells, write the outputs to the lane's arena: the Done frame."""
        self._direct.ring_doorbells()
        results, executions = run.results, run.executions
        writing = time.perf_counter_ns()
        arena = self._lane_arena(frame.lane)
        placed = run.placer.placed(run.ready) if run.placer is not None else {}
        arena_total = sum(_align(len(item[3])) for _, outputs in run.ready for item in outputs
                          if item[4] is None and len(item[3]) > INLINE_LIMIT
                          and id(item[3]) not in placed)
        arena_offset = run.placer.used if placed and run.placer is not None else 0
        segment = arena.segment
        if placed and arena_total and (segment is None
                                       or segment.size < arena_offset + arena_total):
            # Growing replaces the segment: what the backend placed is written again (its
            # memory stays mapped while the outputs refer to it).
            placed, arena_offset = {}, 0
            arena_total = sum(_align(len(item[3])) for _, outputs in run.ready
                              for item in outputs
                              if item[4] is None and len(item[3]) > INLINE_LIMIT)
        if arena_total:
            arena.ensure(arena_offset + arena_total)
        for position, outputs in run.ready:
            try:
                refs, arena_offset = self._write_outputs(outputs, arena, arena_offset, placed)
            except BackendError as exc:
                results[position] = protocol.error_result(exc.code, exc.message)
                continue
            results[position] = protocol.ok_result(refs)
        if executions:
            share = (time.perf_counter_ns() - writing) // len(executions)
            for execution in executions:
                execution[3] += share
        # protocol.Done(batch_id, results, executions).pack(), without the object
        return [protocol.DONE, run.batch_id, results, executions]

    def _requests(self, batch_id: int, exec_requests: list[ExecRequest], group: list[int],
                  results: list[list[Any] | None], placer: _ArenaPlacer | None = None
                  ) -> tuple[list[Request], list[int]]:
        """The group's requests with their inputs mapped; withdrawn or unreadable ones are
        answered in ``results`` instead."""
        requests: list[Request] = []
        positions: list[int] = []
        for index in group:
            if self._cancelled and (batch_id, index) in self._cancelled:
                self._cancelled.discard((batch_id, index))
                results[index] = protocol.error_result("CANCELLED",
                                                       "request cancelled by the client")
                continue
            raw = exec_requests[index]
            try:
                inputs = {}
                for packed in raw.inputs:
                    ref = TensorRef.unpack(packed)
                    inputs[ref.name] = self._resolver.array(ref)
            except BackendError as exc:
                results[index] = protocol.error_result(exc.code, exc.message)
                continue
            request = Request(raw.request_id, inputs, [o[0] for o in raw.outputs],
                              raw.parameters or {}, raw.correlation_id)
            if self._states is not None:
                self._states.add_inputs(request.correlation_id, request.parameters, inputs)
            if self._output_buffers:
                request.output_buffers = self._destinations(raw.outputs)
                if placer is not None:
                    request.allocate_output = placer.allocate
            if self._decoupled:
                sink = StreamSink(self, batch_id, index, raw.outputs, raw.ring)
                if self._states is not None:
                    sink.sequence = request  # its responses carry the sequence's state
                self._streams[(batch_id, index)] = sink
                request.sink = sink
            requests.append(request)
            positions.append(index)
        return requests, positions

    def _rescheduled(self, batch_id: int, position: int) -> list[Any]:
        """The result of a request the model released for another run (its sink, if
        decoupled, takes no more responses from this run)."""
        sink = self._streams.pop((batch_id, position), None)
        if sink is not None:
            sink.retire()
        if not self._iterative:
            return protocol.error_result(
                "INVALID_ARGUMENT", "Request is released with "
                "TRITONSERVER_REQUEST_RELEASE_RESCHEDULE, while the model is not configured "
                "to handle such a flag.")
        return protocol.RESCHEDULED

    def _keep_streamed_state(self, request: Request, response: Response | None,
                             final: bool) -> None:
        """A decoupled sequence model's response: its state outputs become the sequence's
        state (the last one sent wins); the state is dropped after the final response of
        the sequence's END."""
        assert self._states is not None
        outputs = None if response is None or response.error is not None else response.outputs
        self._states.take_outputs(request.correlation_id,
                                  request.parameters if final else {},
                                  request.requested_outputs, outputs)

    def _keep_states(self, requests: list[Request], responses: list[Response]) -> None:
        """The state outputs of an execution become its sequences' next states."""
        assert self._states is not None
        for request, response in zip(requests, responses, strict=True):
            self._states.take_outputs(
                request.correlation_id, request.parameters, request.requested_outputs,
                None if response.error is not None or response.streamed or response.rescheduled
                else response.outputs)
    def _input_memory(self, data: memoryview | bytes | DeviceOutput,
                      inputs: list[list[Any]]) -> _InputMemory | None:
        """Where ``data`` lies inside one of the request's inputs in a system shared-memory
        region (the model passed that input, or a contiguous part of it, through); None if
        it lies in none of them."""
        if not isinstance(data, memoryview) or not len(data):
            return None
        start = 0
        for packed in inputs:
            if packed[3] != SYSTEM:  # arena slots are reused once the request ends
                continue
            if not start:
                start = _address(data)
            ref = TensorRef.unpack(packed)
            try:
                segment = map_region(self._regions, *ref.location)
            except BackendError:
                continue
            base = _address(segment.buf) + ref.offset
            if base <= start and start + len(data) <= base + ref.nbytes:
                return _InputMemory(ref.location, ref.offset + start - base)
        return None

    def _destinations(self, outputs: list[list[Any]]) -> dict[str, memoryview] | None:
        """The client-region memory each output was asked into (Request.output_buffers);
        a region that cannot be mapped is left out: writing the output reports it."""
        buffers: dict[str, memoryview] = {}
        for entry in outputs:
            name, destination = entry[0], entry[1]
            if destination is None:
                continue
            target = TensorRef.unpack(destination)
            if target.where != SYSTEM:
                continue
            try:
                segment = map_region(self._regions, *target.location)
            except BackendError:
                continue
            if 0 <= target.offset and target.offset + target.nbytes <= segment.size:
                buffers[name] = segment.buf[target.offset:target.offset + target.nbytes]
        return buffers or None

    def _answer_directly(self, tag: list[int], outputs: list[_Prepared]) -> list[Any]:
        """Answer through the client's channel: every output travels inline there, or is in
        the client's region, so nothing goes to the arena. What cannot be delivered is
        returned for Done. The doorbells ring once the whole frame ran (ringing after each
        execution woke clients for partial results: c8 throughput fell by a fifth)."""
        try:
            refs, _ = self._write_outputs(outputs, None, 0)
        except BackendError as exc:
            return protocol.error_result(exc.code, exc.message)
        if self._direct.deliver(tag, self._model_version, refs):
            return protocol.ANSWERED
        return protocol.ok_result(refs)

    def send_partial(self, sink: StreamSink, response: Response | None, final: bool) -> None:
        """One response of a decoupled request, from any thread (the caller holds the sink's
        lock): outputs inline or into the client's region (the lane's arena may already
        serve another frame)."""
        result: list[Any] | None = None
        if sink.sequence is not None:
            self._keep_streamed_state(sink.sequence, response, final)
        if response is not None:
            try:
                prepared = self._prepare_outputs(response, sink.outputs)
                if sink.ring is not None:
                    ringed = self._into_ring(sink, prepared)
                    if ringed is None:
                        return  # cancelled while it waited for a slot: nobody reads it
                    prepared = ringed
                refs, _ = self._write_outputs(prepared, None, 0)
                result = protocol.ok_result(refs)
            except BackendError as exc:
                result = protocol.error_result(exc.code, exc.message)
        if final:
            self._streams.pop((sink.batch, sink.index), None)
        with contextlib.suppress(OSError):  # the supervisor is gone: nothing to answer
            self.send(protocol.Partial(sink.batch, sink.index, result, final).pack())

    def _into_ring(self, sink: StreamSink, prepared: list[_Prepared]) -> list[_Prepared] | None:
        """The outputs with destinations in the request's response ring (those without one
        of their own), once the client is done with the slot's previous response; None if
        the request was cancelled meanwhile. Raises BackendError (no slot is used then)."""
        assert sink.ring is not None
        target, slot_bytes, slots = sink.ring
        # BYTES outputs travel in the response (their size is not known from their shape).
        free = [item for item in prepared if item[4] is None and item[1] != "BYTES"]
        if not free:
            return prepared
        offsets, needed = response_ring.output_offsets(len(item[3]) for item in free)
        if needed > slot_bytes:
            raise BackendError(f"the response's outputs need {needed} bytes, more than the "
                               f"response ring's slots of {slot_bytes} bytes",
                               "INVALID_ARGUMENT")
        region_id, key = target.location
        segment = map_region(self._regions, region_id, key)
        if target.offset + target.nbytes > segment.size:
            raise BackendError("the response ring lies outside its shared memory segment")
        response = sink.ring_responses
        if not self._wait_for_slot(sink, segment.buf, target.offset, response - slots):
            return None
        sink.ring_responses += 1
        base = response_ring.slot_offset(target.offset, slot_bytes, slots, response)
        placed = iter(offsets)
        result: list[_Prepared] = []
        for name, datatype, shape, data, destination in prepared:
            if destination is None and datatype != "BYTES":
                at = next(placed)
                destination = TensorRef(name, "", [], SYSTEM, target.location, base + at,
                                        slot_bytes - at).pack()
            result.append((name, datatype, shape, data, destination))
        return result

    def _wait_for_slot(self, sink: StreamSink, memory: memoryview, header: int,
                       reused: int) -> bool:
        """Wait until the client is done with response ``reused`` (the header counts the
        responses it is done with); False if the request was cancelled meanwhile."""
        delay = 0.0002
        while int.from_bytes(memory[header:header + 8], "little") <= reused:
            if sink.cancelled or self._stopped.is_set():
                return False
            self.poll_control()
            time.sleep(delay)
            delay = min(delay * 2, 0.01)
        return True

    def poll_control(self) -> None:
        """Apply the control frames (Cancel) that arrived while the model executes; only
        from the main thread inside execute (it owns the socket's reader then)."""
        if self._executing and threading.get_ident() == self._main_thread:
            self._absorb(self._unpacker, self._pending, read_socket=True)

    def _trim_arenas(self) -> None:
        """The supervisor saw this instance idle after a large request: unmap its input
        arenas (it unlinked the grown ones; our mappings would keep their pages) and shrink
        our grown output arenas."""
        self._input_arena.close()
        for arena in self._output_arenas.values():
            arena.shrink()
        trim_heap()

    def _lane_arena(self, lane: int) -> Arena:
        """Each pipeline lane has its own output arena: the supervisor reads a frame's outputs
        while the next frame (another lane) already runs here."""
        arena = self._output_arenas.get(lane)
        if arena is None:
            arena = self._output_arenas[lane] = Arena(
                self._spec.supervisor_pid, f"{self._spec.arena_owner}o{lane}")
        return arena

    def _run_backend(self, requests: list[Request]) -> list[Response]:
        assert self._backend is not None
        try:
            responses = self._backend.execute(requests)
            if not isinstance(responses, list) or len(responses) != len(requests):
                raise BackendError(
                    f"backend returned {len(responses) if isinstance(responses, list) else 'no'}"
                    f" responses for {len(requests)} requests")
            return responses
        except Exception as exc:
            log.exception("execute failed")
            error = exc if isinstance(exc, BackendError) else BackendError(f"{exc}")
            return [Response(error=error) for _ in requests]

    def _prepare_outputs(self, response: Response, requested: list[list[Any]],
                         inputs: list[list[Any]] | None = None) -> list[_Prepared]:
        """The outputs to send as (name, datatype, shape, bytes, destination); raises
        BackendError for the request's error. An output the request lets pass by reference
        (an ensemble intermediate) that is the memory of one of ``inputs`` in a shared-memory
        region gets an ``_InputMemory`` destination: it is answered as a reference to it; if
        it is small (INLINE_LIMIT), it travels inline instead of into its region."""
        if response.error is not None:
            raise response.error
        outputs = response.outputs
        destinations = {entry[0]: entry[1] for entry in requested} if requested else {}
        prepared: list[_Prepared] = []
        for name in destinations or outputs:
            if name not in outputs:
                raise BackendError(f"unexpected inference output '{name}' for model "
                                   f"'{self._model.name}'", "INVALID_ARGUMENT")
            value = outputs[name]
            class_count = _class_count(requested, name)
            if class_count:
                value = self._classified(value, class_count, name)
            try:
                datatype, shape, data = output_bytes(value)
            except (ValueError, TypeError) as exc:
                raise BackendError(f"output '{name}' cannot be sent: {exc}") from None
            destination = destinations.get(name)
            if inputs and destination is not None and _by_reference(requested, name):
                if len(data) > INLINE_LIMIT:
                    found = self._input_memory(data, inputs)
                    if found is not None:
                        prepared.append((name, datatype, shape, data, found))
                        continue
                elif not isinstance(data, DeviceOutput):
                    # A small intermediate travels inline, as any small tensor: cheaper than
                    # a region both sides touch.
                    prepared.append((name, datatype, shape, data, None))
                    continue
            if destination is not None:
                capacity = destination[6]
                if len(data) > capacity:
                    raise BackendError(f"shared memory size specified with the request for "
                                       f"output '{name}' ({capacity} bytes) should be at "
                                       f"least {len(data)} bytes to hold the results")
            prepared.append((name, datatype, shape, data, destination))
        return prepared

    def _classified(self, value: Any, count: int, name: str) -> Any:
        """Output ``name``'s top ``count`` entries (Triton's classification extension)."""
        model = self._model
        if self._labels is None:
            self._labels = Labels(model.config, model.repository_path)
        batching = int(model.config.get("max_batch_size") or 0) > 0
        try:
            return classify(host_array(value), count, batching, self._labels.of(name))
        except ClassificationError as exc:
            raise BackendError(str(exc), "INVALID_ARGUMENT") from None

    def _write_outputs(self, prepared: list[_Prepared], arena: Arena | None,
                       arena_offset: int, placed: dict[int, int] | None = None
                       ) -> tuple[list[list[Any]], int]:
        """Outputs into their client regions, inline, or (large, unless ``arena`` is None)
        into the lane's arena: the packed TensorRefs and the arena offset after them. Raises
        BackendError (the arena offset is then unchanged). ``placed``: id of an output's
        data -> its offset in the arena, where the backend already wrote it."""
        refs: list[list[Any]] = []
        for name, datatype, shape, data, destination in prepared:
            nbytes = len(data)
            if isinstance(destination, _InputMemory):  # no copy: it is an input's memory
                refs.append(TensorRef(name, datatype, shape, SYSTEM, destination.location,
                                      destination.offset, nbytes).pack())
                continue
            if destination is not None:
                target = TensorRef.unpack(destination)
                if target.where == CUDA:
                    self._cuda.write(target, data, name)  # one device-to-device/host copy
                    refs.append(TensorRef(name, datatype, shape, CUDA, target.location,
                                          target.offset, nbytes).pack())
                    continue
                region_id, key = target.location
                segment = map_region(self._regions, region_id, key)
                if target.offset < 0 or target.offset + nbytes > segment.size:
                    # The client replaced its segment by a smaller one after registering.
                    raise BackendError(f"output '{name}' lies outside its shared memory "
                                       f"segment")
                view = segment.buf[target.offset:target.offset + nbytes]
                if not (self._output_buffers and _same_memory(view, data)):
                    _copy_into(view, data)  # else the backend wrote it there (output_buffers)
                refs.append(TensorRef(name, datatype, shape, target.where, target.location,
                                      target.offset, nbytes).pack())
            elif nbytes <= INLINE_LIMIT or arena is None:
                refs.append(protocol.packed_inline(name, datatype, shape, bytes(data)))
            elif placed and id(data) in placed and arena is not None \
                    and arena.segment is not None:
                refs.append(TensorRef(name, datatype, shape, protocol.ARENA, arena.segment.key,
                                      placed[id(data)], nbytes).pack())
            else:
                segment = arena.ensure(arena_offset + nbytes)
                if isinstance(data, DeviceOutput):
                    data.write_to(segment.buf[arena_offset:arena_offset + nbytes])
                else:
                    segment.write(arena_offset, data)
                refs.append(TensorRef(name, datatype, shape, protocol.ARENA, segment.key,
                                      arena_offset, nbytes).pack())
                arena_offset += _align(nbytes)
        return refs, arena_offset


class StreamSink:
    """Where a decoupled model sends one request's responses (workers/backend.py)."""

    __slots__ = ("_host", "_lock", "batch", "cancelled", "closed", "index", "outputs", "ring",
                 "ring_responses", "sequence")

    def __init__(self, host: WorkerHost, batch: int, index: int,
                 outputs: list[list[Any]], ring: list[Any] | None = None) -> None:
        self._host = host
        self.batch = batch
        self.index = index
        self.outputs = outputs
        self.cancelled = False
        self.closed = False
        # The response ring (protos/response_ring.py): (ring TensorRef, slot bytes, slots).
        self.ring: tuple[TensorRef, int, int] | None = None if ring is None else (
            TensorRef.unpack(ring[0]), int(ring[1]), int(ring[2]))
        self.ring_responses = 0  # responses written into the ring so far
        # The request, for a model with implicit state: its responses update the state.
        self.sequence: Request | None = None
        # The model's threads may send at once: one response is written and framed at a
        # time, in the order the sends took the lock, and nothing follows the final one.
        self._lock = threading.Lock()

    def send(self, response: Response | None, final: bool) -> None:
        with self._lock:
            if self.closed:
                return
            self.closed = final
            self._host.send_partial(self, response, final)

    def is_cancelled(self) -> bool:
        if not self.cancelled:
            self._host.poll_control()
        return self.cancelled

    def retire(self) -> None:
        """The request was rescheduled: this run's sender takes no more responses."""
        with self._lock:
            self.closed = True


_Prepared = tuple[str, str, list[int], "memoryview | bytes | DeviceOutput", Any]


class _InputMemory:
    """The destination of an output answered by reference: the memory of an input in a
    system region (``location`` as in its TensorRef, ``offset`` absolute in the segment)."""

    __slots__ = ("location", "offset")

    def __init__(self, location: list[Any], offset: int) -> None:
        self.location = location
        self.offset = offset


def _class_count(requested: list[list[Any]], name: str) -> int:
    """How many top entries the request wants of output ``name`` (0: the output itself)."""
    for entry in requested:
        if entry[0] == name:
            return int(entry[3]) if len(entry) > 3 else 0
    return 0


def _by_reference(requested: list[list[Any]], name: str) -> bool:
    """Whether the request lets output ``name`` pass by reference (its entry's flag)."""
    for entry in requested:
        if entry[0] == name:
            return len(entry) > 2 and bool(entry[2])
    return False


def _bls_chain(requests: list[Request]) -> str:
    """The BLS chain the requests carry ("" for requests no BLS call sent: the usual case)."""
    for request in requests:
        if request.parameters:
            return bls.chain_of([r.parameters for r in requests])
    return ""


class _FrameRun:
    """What one Exec frame collects while it runs."""

    __slots__ = ("batch_id", "exec_requests", "executions", "groups", "placer", "ready",
                 "results")

    def __init__(self, frame: protocol.Exec) -> None:
        self.exec_requests = [ExecRequest.unpack(raw) for raw in frame.requests]
        self.batch_id = frame.batch
        count = len(self.exec_requests)
        self.groups = [[i] for i in range(count)] if frame.each else [list(range(count))]
        self.results: list[list[Any] | None] = [None] * count
        self.ready: list[tuple[int, list[_Prepared]]] = []
        # [request indices, input ns, infer ns, output ns] per execution
        self.executions: list[list[Any]] = []
        self.placer: _ArenaPlacer | None = None


class _ArenaPlacer:
    """Lends a backend that asks for it (``Request.allocate_output``) the lane's output arena
    during the frame's executions, so a large output is computed where the supervisor reads
    it. Space is handed out front to back; the arena grows only while nothing was placed
    (growing replaces the segment)."""

    __slots__ = ("_arena", "used")

    def __init__(self, arena: Arena) -> None:
        self._arena = arena
        self.used = 0            # bytes handed out (aligned)

    def allocate(self, nbytes: int) -> memoryview | None:
        if nbytes <= INLINE_LIMIT:
            return None          # travels inline: no arena space
        offset = self.used
        end = offset + nbytes
        segment = self._arena.segment
        if segment is None or segment.size < end:
            if offset:
                return None
            segment = self._arena.ensure(end)
        self.used = _align(end)
        return segment.buf[offset:end]

    def placed(self, ready: list[tuple[int, list[_Prepared]]]) -> dict[int, int]:
        """id of each output's data that lies in the space handed out -> its offset."""
        segment = self._arena.segment
        if not self.used or segment is None:
            return {}
        base = _address(segment.buf)
        found: dict[int, int] = {}
        for _, outputs in ready:
            for item in outputs:
                data = item[3]
                if item[4] is None and isinstance(data, memoryview) and len(data):
                    offset = _address(data) - base
                    if 0 <= offset and offset + len(data) <= self.used:
                        found[id(data)] = offset
        return found


def _copy_into(target: memoryview, data: memoryview | bytes | DeviceOutput) -> None:
    """Host bytes are copied (large ones on several cores); a GPU output is copied
    device-to-host straight into ``target``."""
    if isinstance(data, DeviceOutput):
        data.write_to(target)
    else:
        copy_bytes(target, data)


def _same_memory(target: memoryview, data: memoryview | bytes | DeviceOutput) -> bool:
    """``data`` already is ``target``'s memory (a backend wrote the output in place)."""
    if not isinstance(data, memoryview) or not len(target):
        return False
    return _address(data) == _address(target)


def _address(view: memoryview) -> int:
    return int(np.frombuffer(view, np.uint8).__array_interface__["data"][0])


def _align(nbytes: int, alignment: int = 64) -> int:
    return (nbytes + alignment - 1) // alignment * alignment
