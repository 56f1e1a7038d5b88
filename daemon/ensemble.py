"""Ensembles at run time: a small DAG over the core's own submit, one Reply per step.

An ensemble version has no worker. Its scheduler (``EnsembleScheduler``) takes the validated
ensemble request from the core and runs the steps of ``ensemble_scheduling``: a step is
submitted through the core (the same validation, batching and statistics as any request to
its model) as soon as every tensor it reads exists, so independent steps run in parallel;
the ensemble answers once every step finished, or fails with the first step's error (the
steps still in flight are cancelled).

Where tensor bytes go:
* ensemble inputs in a client's shared-memory region are handed to the steps that read them
  by reference to the region (no copy); other inputs are the door's bytes, shared by every
  step that reads them;
* an ensemble output the client asked for in a shared-memory region is written there by the
  worker of the step that produces it;
* intermediate tensors (a step's output that another step reads) never cross the
  supervisor: the producing step's request asks for the output in a region of the
  ensemble's own (``IntermediatePool``: sparse sealed memfds, never visible to clients), its
  worker writes it there, and the consuming step's request names that region as its input,
  which its worker maps (passed by fd once per worker, as any memfd region). A region goes
  back to the pool when its run finished and no step request pins it any more. An ensemble
  output that is also an intermediate is read from the region once, for the response.
* an intermediate that is not an ensemble output *passes by reference*: when the model
  returns one of its inputs (or a contiguous part of it) and that input lies in a system
  region (a client's region the ensemble request pins, or an intermediate region of this run
  or its parents), the worker answers with a reference to that memory instead of copying it
  into the region it was given, and the readers of the tensor read the input's memory. Both
  kinds of region outlive every reader: the request pins the client's until it ends, the run
  holds its intermediates until it finished. Inputs in an arena slot (gRPC/HTTP payload) are
  never referenced: the slot is reused once the step's request ends. So a chain of
  pass-through steps costs one copy, into the client's output region. As for any tensor
  read by several steps, a model must not write into its input arrays. Such an intermediate
  of at most INLINE_LIMIT bytes travels inline in the frames instead, as any small tensor.

An ensemble with a decoupled step is decoupled itself (as in Triton): every response of
that step runs the steps downstream of it (a *branch*, see ``_Run``) and becomes one response
of the ensemble; the final flag follows once the step sent its own and every branch is done.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from shmserve.daemon.dispatcher import InstanceSlot
from shmserve.daemon.errors import ServeError, internal, unavailable, unimplemented
from shmserve.daemon.infer_request import OutputIn, RequestItems, ShmRef, TensorIn
from shmserve.daemon.reply import Reply
from shmserve.daemon.request import InferRequest, OutputTensor
from shmserve.daemon.scheduler import Scheduler
from shmserve.daemon.shm_registry import Region, ShmRegistry
from shmserve.daemon.statistics import ModelStats
from shmserve.daemon.tracing import Trace
from shmserve.protos import shmserve_model_config_pb2 as mc
from shmserve.protos.datatypes import ELEMENT_SIZE, element_count
from shmserve.workers.shm import Pieces

log = logging.getLogger("shmserve.ensemble")


class StepDoor(Protocol):
    """What an ensemble needs of the core: its submit and cancel, and the shared-memory
    registry for its intermediate regions (daemon/core.py)."""

    registry: ShmRegistry

    def submit(self, model_name: str, version: str, parse: Callable[[], RequestItems],
               reply: Reply, streaming: bool = False,
               parent: Trace | None = None) -> InferRequest: ...

    def cancel(self, request: InferRequest) -> None: ...


@dataclass(frozen=True, slots=True)
class _Step:
    model: str
    version: str                    # "" = the latest ready version
    inputs: dict[str, str]          # model input -> ensemble tensor
    outputs: dict[str, str]         # model output -> ensemble tensor


@dataclass(slots=True)
class _Value:
    datatype: str
    shape: list[int]
    data: bytes | memoryview | Pieces | None
    shm: ShmRef | None = None
    internal: Region | None = None  # the intermediate region holding it (shm names it)


#: Virtual size of each intermediate region: a tensor may be this large; only the pages
#: written cost memory.
INTERMEDIATE_CAPACITY = 1 << 32
_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


class IntermediatePool:
    """An ensemble's regions for intermediate tensors, reused from run to run (each worker
    maps one once). A region is free when its run let go of it and no request pins it: a
    step withdrawn while its worker ran may still write until that request ends."""

    def __init__(self, registry: ShmRegistry, model: str) -> None:
        self._registry = registry
        self._model = model
        self._free: list[Region] = []
        self._all: list[Region] = []

    def take(self) -> Region:
        for index, region in enumerate(self._free):
            if region.users == 0:
                return self._free.pop(index)
        fd = os.memfd_create(f"shmserve_ensemble_{self._model}",
                             os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, INTERMEDIATE_CAPACITY)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
        except BaseException:
            os.close(fd)
            raise
        region = self._registry.add_internal_memfd(
            f"ensemble '{self._model}' intermediate {len(self._all) + 1}", fd,
            INTERMEDIATE_CAPACITY)
        self._all.append(region)
        return region

    def give_back(self, regions: list[Region]) -> None:
        self._free.extend(regions)

    def close(self) -> None:
        for region in self._all:
            self._registry.drop_internal(region)
        self._all.clear()
        self._free.clear()


class _StepReply(Reply):
    __slots__ = ("_index", "_run")
    records_compute = True

    def __init__(self, run: _Run, index: int) -> None:
        super().__init__()
        self._run = run
        self._index = index

    # Each final answer lets go of the request (the core set ``request``): the pair is a
    # reference cycle, left to the cyclic garbage collector otherwise (see _Run._finish).
    def send(self, response: list[OutputTensor], final: bool) -> None:
        if final:
            self.request = None
        self._run.step_response(self._index, response, final)

    def end(self) -> None:
        self.request = None
        self._run.step_response(self._index, None, True)

    def computed(self, input_ns: int, infer_ns: int, output_ns: int) -> None:
        total = self._run.root.compute_ns
        total[0] += input_ns
        total[1] += infer_ns
        total[2] += output_ns

    def send_error(self, error: ServeError, final: bool) -> None:
        if final:
            self.request = None
        self._run.step_failed(self._index, error, ended=final)

    def fail(self, error: ServeError) -> None:
        self.request = None
        self._run.step_failed(self._index, error)


#: The result of a request whose responses were all sent: its final flag alone follows.
_END: list[OutputTensor] = []


class _Run:
    """One ensemble request on its way through the steps or, with ``parent``, one *branch*
    of it: the steps downstream of one response of a decoupled step, run on that response's
    tensors (and the tensors the parent had then). A branch whose steps are done is one
    response of the ensemble; the request ends (its final flag alone) once the decoupled
    steps sent their final flags and every branch is done. A request without a decoupled
    step that answered more than once is answered as before: one final response."""

    def __init__(self, owner: EnsembleScheduler, request: InferRequest,
                 parent: _Run | None = None, waiting: set[int] | None = None) -> None:
        self.owner = owner
        self.request = request
        self.parent = parent
        self._root = None if parent is None else parent.root  # (None: itself, no cycle)
        self.values: dict[str, _Value] = {} if parent is None else dict(parent.values)
        self.waiting = set(range(len(owner.steps))) if waiting is None else waiting
        self.inflight: dict[int, InferRequest] = {}
        self.step_requests: dict[int, InferRequest] = {}  # every step submitted, by index
        self.streamed: set[int] = set()  # decoupled steps answering in several responses
        self.branches: list[_Run] = []   # open branches of this run
        self.finished = False
        # Intermediate regions this run holds, by name (the steps' requests may use them).
        self.internal: dict[str, Region] = {}
        self.runs: set[_Run] = set()     # the root's: every run of the request still open
        self.responses = 0               # the root's: responses sent (response statistics)
        self.responded_ns = request.received_ns
        self.started_ns = 0
        # The root's: its steps' compute durations (input, infer, output) summed.
        self.compute_ns = [0, 0, 0]
        self.root.runs.add(self)
        self.shm_owner: str = request.regions[0].owner if request.regions else ""
        # Ensemble outputs the client wants in its shared memory: tensor -> (ref, region).
        self.output_regions: dict[str, ShmRef] = {
            output.name: (output.region.name, output.offset, output.byte_size)
            for output in request.outputs if output.region is not None}

    @property
    def root(self) -> _Run:
        return self._root or self

    def start(self) -> None:
        self.started_ns = time.perf_counter_ns()
        for tensor in self.request.inputs:
            shm = ((tensor.region.name, tensor.offset, tensor.nbytes)
                   if tensor.region is not None else None)
            self.values[tensor.name] = _Value(tensor.datatype, list(tensor.shape), tensor.data,
                                              shm)
        self._launch_ready()

    def _launch_ready(self) -> None:
        root = self.root
        if self.waiting:
            steps = self.owner.steps
            values = self.values
            for index in sorted(self.waiting):
                if root.finished:
                    return
                step = steps[index]
                for name in step.inputs.values():
                    if name not in values:
                        break
                else:
                    self.waiting.discard(index)
                    self._launch(index, step)
        if not root.finished and not self.waiting and not self.inflight \
                and not self.branches:
            self._complete()

    def _inherit(self, values: dict[str, _Value]) -> None:
        """Tensors the parent produced after this branch began (a step parallel to the
        decoupled one): a downstream step of the branch may read them too."""
        added = {name: value for name, value in values.items() if name not in self.values}
        if not added:
            return
        self.values.update(added)
        for branch in list(self.branches):
            branch._inherit(added)
        self._launch_ready()

    def _launch(self, index: int, step: _Step) -> None:
        request = self.request
        # A decoupled step's outputs stay out of the pool: its next response would
        # overwrite the region while a branch still reads it.
        pooled = index not in self.owner.decoupled_steps

        def parse() -> RequestItems:
            inputs = []
            for model_input, tensor_name in step.inputs.items():
                value = self.values[tensor_name]
                inputs.append(TensorIn(model_input, value.datatype, list(value.shape),
                                       value.data, value.shm))
            outputs = []
            for model_output, tensor_name in step.outputs.items():
                shm = self.output_regions.get(tensor_name)
                by_reference = False
                if shm is None and pooled and tensor_name in self.owner.intermediates:
                    region = self.owner.pool.take()
                    self.internal[region.name] = region
                    shm = (region.name, 0, region.byte_size)
                    by_reference = tensor_name in self.owner.passable
                outputs.append(OutputIn(model_output, shm, by_reference=by_reference))
            return RequestItems(inputs, outputs,
                                dict(request.parameters) if request.parameters else {},
                                request.request_id, self.shm_owner,
                                internal=self._regions_in_reach())

        try:
            step_request = self.owner.door.submit(step.model, step.version, parse,
                                                  _StepReply(self, index), streaming=True,
                                                  parent=request.trace)
            self.inflight[index] = self.step_requests[index] = step_request
        except ServeError as exc:
            self.step_failed(index, exc)
            return
        scheduler = step_request.scheduler
        if isinstance(scheduler, Scheduler) and not step_request.done:
            scheduler.dispatch_now()  # the step is on the request's critical path

    def _regions_in_reach(self) -> dict[str, Region]:
        """The regions this run's steps may use besides the registered ones: its own and its
        parents' intermediates, and the regions the ensemble request's own tensors are in
        (the request holds them; a private one, such as a frontend process's spill of a
        large payload, is unregistered by name as soon as the request was accepted)."""
        if self.parent is None:
            if not self.request.regions:
                return self.internal
            return {**{region.name: region for region in self.request.regions},
                    **self.internal}
        return {**self.parent._regions_in_reach(), **self.internal}

    def step_response(self, index: int, outputs: list[OutputTensor] | None,
                      final: bool) -> None:
        """A response of step ``index`` (None: its final flag alone)."""
        if self.root.finished:
            return
        if final and outputs is not None and index not in self.streamed:
            self.step_done(index, outputs)  # one response: the step is done
            return
        if index not in self.streamed:  # its downstream steps run in branches from now on
            self.streamed.add(index)
            self.waiting -= self.owner.downstream[index]
        if final:
            self.inflight.pop(index, None)
        if outputs is not None:
            branch = _Run(self.owner, self.request, self, set(self.owner.downstream[index]))
            self.branches.append(branch)
            if not branch.take_outputs(index, outputs):
                return
            branch._launch_ready()
        if final and not self.root.finished:
            self._launch_ready()

    def step_done(self, index: int, outputs: list[OutputTensor]) -> None:
        self.inflight.pop(index, None)
        if self.root.finished:
            return
        if self.take_outputs(index, outputs):
            for branch in list(self.branches):
                if not self.root.finished:
                    branch._inherit(self.values)
            self._launch_ready()

    def take_outputs(self, index: int, outputs: list[OutputTensor]) -> bool:
        """Record step ``index``'s outputs as ensemble tensors; False if the run failed."""
        step = self.owner.steps[index]
        for output in outputs:
            tensor_name = step.outputs.get(output.name)
            if tensor_name is None:
                continue
            shm = None
            held = None
            if output.data is None:
                ref = self.output_regions.get(tensor_name)
                if ref is None:
                    held = self._intermediate_region(index, output.name)
                    if held is None:
                        self.step_failed(index, internal(
                            f"output '{output.name}' of model '{step.model}' came back "
                            f"without data"))
                        return False
                    ref = (held.name, 0, held.byte_size)
                    if output.region_id >= 0 and output.region_id != held.region_id:
                        # Passed by reference: the output is the memory of a step input.
                        source = self._input_region(index, output.region_id)
                        if source is None:
                            self.step_failed(index, internal(
                                f"output '{output.name}' of model '{step.model}' came back "
                                f"in a region it was not given"))
                            return False
                        held = source if source.name in self._regions_in_reach() else None
                        ref = (source.name, output.offset - source.offset, source.byte_size)
                size = ELEMENT_SIZE.get(output.datatype, -1)
                nbytes = output.region_nbytes if output.region_nbytes >= 0 else \
                    size * element_count(output.shape) if size > 0 else ref[2]
                shm = (ref[0], ref[1], nbytes)
            self.values[tensor_name] = _Value(output.datatype, list(output.shape), output.data,
                                              shm, held)
        return True

    def _input_region(self, index: int, region_id: int) -> Region | None:
        """The region of one of step ``index``'s inputs with ``region_id``: its run (or the
        client, for an ensemble input) holds it for as long as this run's steps may read
        it, so an output referencing it outlives every reader (see EnsembleScheduler)."""
        run: _Run | None = self
        while run is not None:
            step_request = run.step_requests.get(index)
            if step_request is not None:
                for tensor in step_request.inputs:
                    if tensor.region is not None and tensor.region.region_id == region_id:
                        return tensor.region
                return None
            run = run.parent
        return None

    def _intermediate_region(self, index: int, model_output: str) -> Region | None:
        """The intermediate region the step's request named for ``model_output``."""
        run: _Run | None = self
        while run is not None:  # a branch's outputs came from its parent's step request
            step_request = run.step_requests.get(index)
            if step_request is not None:
                for requested in step_request.outputs:
                    if requested.name == model_output and requested.region is not None \
                            and requested.region.name in run.internal:
                        return requested.region
                return None
            run = run.parent
        return None

    def step_failed(self, index: int, error: ServeError, ended: bool = True) -> None:
        """Step ``index`` failed: so does the request (a decoupled step that may still send
        more, ``ended`` False, is cancelled with the others)."""
        if ended:
            self.inflight.pop(index, None)
        self.root._finish(error)

    def cancel(self) -> None:
        self.request.cancelled = True
        self._finish(None)

    def _complete(self) -> None:
        """Every step of this run is done."""
        if self.streamed:
            response = _END  # its responses were its branches'
        else:
            built = self._response()
            if built is None:
                return
            response = built
        parent = self.parent
        if parent is None:
            self._finish(response)
            return
        self.finished = True
        self.owner.pool.give_back(list(self.internal.values()))
        self.internal = {}
        self.values = {}  # a long stream keeps no finished branch's tensors
        self.root.runs.discard(self)
        if response is not _END:
            self.owner.respond(self.root, response)
        parent.branches.remove(self)
        parent._launch_ready()

    def _response(self) -> list[OutputTensor] | None:
        wanted = [output.name for output in self.request.outputs] or self.owner.output_names
        response = []
        for name in wanted:
            value = self.values.get(name)
            if value is None:
                self.root._finish(internal(f"ensemble '{self.owner.model}' produced no data "
                                           f"for output '{name}'"))
                return None
            in_region = name in self.output_regions
            if in_region:
                data = None
            elif value.internal is not None and value.shm is not None:
                # An intermediate that is also an output: read once for the response.
                data = os.pread(value.internal.fd, value.shm[2], value.shm[1])
            else:
                data = bytes(value.data or b"")
            response.append(OutputTensor(name, value.datatype, value.shape, data))
        return response

    def _finish(self, result: list[OutputTensor] | ServeError | None) -> None:
        """The root's end: ``result`` is the final response (``_END``: its final flag
        alone), the error, or None when the caller gave up."""
        if self.finished:
            return
        self.finished = True
        runs = list(self.runs)
        for run in runs:
            for step_request in list(run.inflight.values()):
                self.owner.door.cancel(step_request)
            run.inflight.clear()
            self.owner.pool.give_back(list(run.internal.values()))
            run.internal = {}
        self.owner.finished(self, result)
        # Drop the references that make cycles (runs <-> branches, step requests <-> their
        # replies <-> runs): a finished request is freed at once, not by a garbage
        # collection that would cost every request in flight its pause.
        for run in runs:
            run.step_requests = {}
            run.branches = []
            run.values = {}
        self.runs = set()


class EnsembleScheduler:
    """Stands where a worker-backed Scheduler stands for a model version (models.py)."""

    def __init__(self, model: str, version: int, config: mc.ModelConfig, door: StepDoor,
                 composing_ready: Callable[[], bool],
                 on_finished: Callable[[InferRequest], None],
                 decoupled_models: frozenset[str] = frozenset()) -> None:
        self.model = model
        self.version = version
        self.stats = ModelStats()
        self.door = door
        self.steps = [_Step(step.model_name,
                            str(step.model_version) if step.model_version > 0 else "",
                            dict(step.input_map), dict(step.output_map))
                      for step in config.ensemble_scheduling.step]
        self.output_names = [output.name for output in config.output]
        # Tensors a step produces and another step reads: they go through the pool.
        self.intermediates = {name for step in self.steps for name in step.inputs.values()}
        # Intermediates a worker may answer by reference to the input its model passed
        # through: not ensemble outputs (the response reads only pooled regions).
        self.passable = self.intermediates - set(self.output_names)
        self.pool = IntermediatePool(door.registry, model)
        self.decoupled_steps = {index for index, step in enumerate(self.steps)
                                if step.model in decoupled_models}
        self.downstream = _downstream(self.steps)
        self._composing_ready = composing_ready
        self._on_finished = on_finished
        self._runs: dict[int, _Run] = {}
        self._closing = False
        self._idle = asyncio.Event()
        self._idle.set()

    # --- what models.py, metrics and statistics read ---------------------------------------
    @property
    def ready(self) -> bool:
        return not self._closing and self._composing_ready()

    @property
    def instances(self) -> list[InstanceSlot]:
        return []

    def crash_loop_reason(self) -> str:
        return ""

    # --- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        """Nothing to start: the composing models were loaded before (models.py)."""

    async def drain(self, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout)

    async def stop(self, timeout: float) -> None:
        self._closing = True
        await self.drain(timeout)
        for run in list(self._runs.values()):
            run._finish(unavailable(f"model '{self.model}' is being unloaded"))
        self.pool.close()

    def release_regions(self, region_ids: list[int]) -> None:
        """Regions are held by the steps' own requests."""

    # --- requests --------------------------------------------------------------------------
    def submit(self, request: InferRequest) -> None:
        if self._closing:
            raise unavailable(f"model '{self.model}' is being unloaded")
        if any(output.class_count for output in request.outputs):
            raise unimplemented("classification outputs of an ensemble are not supported by "
                                "shmserve")
        request.received_ns = request.received_ns or time.perf_counter_ns()
        request.scheduler = self  # type: ignore[assignment]  # the core cancels through it
        run = _Run(self, request)
        self._runs[id(request)] = run
        self._idle.clear()
        self.stats.pending += 1
        run.start()

    def cancel(self, request: InferRequest) -> None:
        run = self._runs.get(id(request))
        if run is not None:
            run.cancel()

    def finished(self, run: _Run, result: list[OutputTensor] | ServeError | None) -> None:
        request = run.request
        self._runs.pop(id(request), None)
        if not self._runs:
            self._idle.set()
        stats = self.stats
        stats.pending -= 1
        ok = isinstance(result, list)
        now = time.perf_counter_ns()
        if self.decoupled_steps and result is not None:  # a decoupled ensemble's final one
            kind = "fail" if not ok else "empty_response" if result is _END else "success"
            stats.record_response(run.responses, kind, now - run.responded_ns)
        stats.record_request(ok, now - request.received_ns)
        if ok:
            # As Triton's ensemble scheduler reports them: the wait for its first step as
            # queue time, the composing models' compute durations summed as its own.
            stats.queue.add(run.started_ns - request.received_ns)
            stats.record_batch(request.batch_size, 1, run.compute_ns)
            if request.reply.records_compute:       # a step of an enclosing ensemble
                request.reply.computed(*run.compute_ns)
        self._on_finished(request)
        if result is None or request.cancelled:
            return
        try:
            if isinstance(result, ServeError):
                request.reply.fail(result)
            elif result is _END:
                request.reply.end()
            else:
                request.reply.send(result, True)
        except Exception:
            log.exception("answering an ensemble request failed")

    def respond(self, run: _Run, response: list[OutputTensor]) -> None:
        """One response of a streaming ensemble request; more follow."""
        if run.request.cancelled:
            return
        now = time.perf_counter_ns()
        self.stats.record_response(run.responses, "success", now - run.responded_ns)
        run.responses += 1
        run.responded_ns = now
        try:
            run.request.reply.send(response, False)
        except Exception:
            log.exception("answering an ensemble request failed")


def _downstream(steps: list[_Step]) -> list[frozenset[int]]:
    """For each step, the steps that read its outputs, directly or through other steps."""
    readers: dict[str, list[int]] = {}
    for index, step in enumerate(steps):
        for tensor in step.inputs.values():
            readers.setdefault(tensor, []).append(index)
    result = []
    for step in steps:
        found: set[int] = set()
        frontier = list(step.outputs.values())
        while frontier:
            for reader in readers.get(frontier.pop(), []):
                if reader not in found:
                    found.add(reader)
                    frontier.extend(steps[reader].outputs.values())
        result.append(frozenset(found))
    return result
