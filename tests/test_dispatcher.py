"""The scheduler and dispatcher with fake workers (no processes): batches go to the worker the
factory made, replies come back, a dead worker's frames fail and its instance restarts."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from typing import Any

import grpc

from shmserve.daemon.dispatcher import DoneCallback
from shmserve.daemon.errors import ServeError, unavailable
from shmserve.daemon.model_config import InstancePlan
from shmserve.daemon.reply import Reply
from shmserve.daemon.request import InferRequest, InputTensor, OutputTensor
from shmserve.daemon.scheduler import Scheduler
from shmserve.daemon.settings import Settings
from shmserve.daemon.worker_limits import WorkerLimits
from shmserve.protos import shmserve_model_config_pb2 as mc
from shmserve.workers import protocol
from shmserve.workers.backend import InstanceSpec, ModelSpec


class FakeWorker:
    """Answers every request of a frame with its input as OUT (unless ``hold``)."""

    def __init__(self, spec: protocol.WorkerSpec, label: str,
                 on_exit: Callable[[Any, str], None]) -> None:
        self.spec = spec
        self.label = label
        self.on_exit = on_exit
        self.pid: int | None = None
        self.alive = False
        self.became_ready = False
        self.unresponsive = False
        self.report = None
        self.hold = False
        self.frames: list[tuple[int, list[list[Any]], bool]] = []
        self.withdrawn: list[tuple[int, int]] = []
        self.trims = 0
        self._inflight: dict[int, DoneCallback] = {}
        self._ids = 0

    async def start(self, limits: WorkerLimits) -> None:
        self.alive = self.became_ready = True
        self.pid = 1000 + len(made)

    async def stop(self, timeout: float) -> None:
        self.alive = False

    def execute(self, requests: list[list[Any]], lane: int, each: bool,
                on_done: DoneCallback) -> int:
        self._ids += 1
        self.frames.append((self._ids, requests, each))
        self._inflight[self._ids] = on_done
        if not self.hold:
            asyncio.get_running_loop().call_soon(self.answer, self._ids)
        return self._ids

    def answer(self, batch_id: int) -> None:
        requests = next(r for b, r, _ in self.frames if b == batch_id)
        results = []
        for raw in requests:
            request = protocol.ExecRequest.unpack(raw)
            ref = protocol.TensorRef.unpack(request.inputs[0])
            results.append(protocol.ok_result(
                [protocol.packed_inline("OUT", ref.datatype, ref.shape, ref.location)]))
        done = protocol.Done(batch_id, results, [[list(range(len(requests))), 1, 2, 3]])
        self._inflight.pop(batch_id)(protocol.Done.unpack(done.pack()))

    def die(self) -> None:
        self.alive = False
        for on_done in self._inflight.values():
            on_done(unavailable(f"worker for model instance '{self.label}' was killed"))
        self._inflight.clear()
        self.on_exit(self, "was killed")

    def withdraw(self, batch_id: int, index: int) -> None:
        self.withdrawn.append((batch_id, index))

    def trim_arenas(self) -> None:
        self.trims += 1

    def end_sequences(self, correlation_ids: list[int | str]) -> None:
        pass

    def release_regions(self, region_ids: list[int]) -> None:
        pass

    def attach_channel(self, channel_id: int, memfd: int, client_socket: int,
                       ring_base: int, ring_capacity: int) -> bool:
        return False

    def detach_channel(self, channel_id: int) -> None:
        pass


made: list[FakeWorker] = []


def fake_factory(spec: protocol.WorkerSpec, label: str,
                 on_exit: Callable[[Any, str], None]) -> FakeWorker:
    worker = FakeWorker(spec, label, on_exit)
    made.append(worker)
    return worker


class Collect(Reply):
    __slots__ = ("error", "outputs")

    def __init__(self) -> None:
        super().__init__()
        self.outputs: list[OutputTensor] | None = None
        self.error: ServeError | None = None

    def send(self, response: list[OutputTensor], final: bool) -> None:
        assert final
        self.outputs = response

    def fail(self, error: ServeError) -> None:
        self.error = error


def make_spec(plan: InstancePlan, owner: str, lanes: int) -> protocol.WorkerSpec:
    return protocol.WorkerSpec(ModelSpec("m", 1, {}, "", ""),
                               InstanceSpec(plan.name, plan.kind, 0, plan.index), "fake",
                               os.getpid(), owner, lanes)


def scheduler(finished: list[InferRequest], batching: Any = None,
              max_batch_size: int = 0) -> Scheduler:
    made.clear()
    return Scheduler("m", 1, max_batch_size, batching,
                     [InstancePlan("m_0_0", "KIND_CPU", 0, 0)], make_spec,
                     Settings(model_repository="", pipeline_depth=2), os.getpid(),
                     finished.append, fake_factory)


def request(value: int, batch_size: int = 1) -> InferRequest:
    data = value.to_bytes(4, "little")
    reply = Collect()
    internal = InferRequest("m", 1, f"r{value}", [InputTensor("IN", "INT32", [batch_size], data,
                                                              None, 0, 4)], [], batch_size,
                            reply)
    reply.request = internal
    return internal


def replies(requests: list[InferRequest]) -> list[Collect]:
    return [r.reply for r in requests]  # type: ignore[misc]


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_requests_queued_together_go_in_one_dynamic_batch_and_are_answered() -> None:
    async def run() -> None:
        finished: list[InferRequest] = []
        batching = mc.ModelDynamicBatching(preferred_batch_size=[4])
        sched = scheduler(finished, batching, max_batch_size=4)
        await sched.start()
        requests = [request(i) for i in range(5)]
        for r in requests:
            sched.submit(r)
        await settle()
        [worker] = made
        assert [(len(reqs), each) for _, reqs, each in worker.frames] == [(4, False),
                                                                          (1, False)]
        for i, reply in enumerate(replies(requests)):
            assert reply.error is None and reply.outputs is not None
            [out] = reply.outputs
            assert (out.name, out.data) == ("OUT", i.to_bytes(4, "little"))
        assert finished == requests
        assert sched.stats.success.count == 5 and sched.stats.pending == 0
        assert sched.stats.batches[4].compute_infer.count == 1
        assert all(slot.inflight == 0 for slot in sched.instances)
        await sched.stop(1.0)

    asyncio.run(run())


def test_a_dead_workers_frames_fail_and_the_instance_restarts() -> None:
    async def run() -> None:
        finished: list[InferRequest] = []
        sched = scheduler(finished)
        await sched.start()
        [first] = made
        first.hold = True
        lost = [request(1), request(2)]
        for r in lost:
            sched.submit(r)
        await settle()
        assert len(first.frames) == 2  # pipeline depth 2: both sent ahead
        first.die()
        for reply in replies(lost):
            assert reply.error is not None and reply.error.code == grpc.StatusCode.UNAVAILABLE
            assert "was killed" in reply.error.message
        assert not sched.ready
        for _ in range(200):  # a quick death: restarted after the first backoff step
            if sched.ready:
                break
            await asyncio.sleep(0.01)
        assert len(made) == 2 and sched.ready  # restarted through the factory
        later = request(3)
        sched.submit(later)
        await settle()
        assert made[1].frames and replies([later])[0].outputs is not None
        assert finished == [*lost, later]
        await sched.stop(1.0)

    asyncio.run(run())


def test_a_cancelled_request_is_dropped_when_queued_and_withdrawn_when_sent() -> None:
    async def run() -> None:
        finished: list[InferRequest] = []
        sched = scheduler(finished)
        await sched.start()
        [worker] = made
        worker.hold = True
        sent, also_sent, queued = request(1), request(2), request(3)
        for r in (sent, also_sent, queued):
            sched.submit(r)
        await settle()
        assert len(worker.frames) == 2  # both lanes busy, the third waits
        sched.cancel(queued)
        assert finished == [queued] and sched.stats.pending == 0
        sched.cancel(also_sent)
        assert worker.withdrawn == [(2, 0)]
        worker.answer(1)
        worker.answer(2)
        assert replies([sent])[0].outputs is not None
        cancelled = replies([also_sent, queued])
        assert all(r.outputs is None and r.error is None for r in cancelled)
        assert finished == [queued, sent, also_sent]
        await sched.stop(1.0)

    asyncio.run(run())


def test_a_staged_input_is_let_go_and_an_idle_instance_shrinks_its_grown_arena() -> None:
    async def run() -> None:
        finished: list[InferRequest] = []
        made.clear()
        sched = Scheduler("m", 1, 0, None, [InstancePlan("m_0_0", "KIND_CPU", 0, 0)],
                          make_spec, Settings(model_repository="", arena_idle_secs=0.05),
                          os.getpid(), finished.append, fake_factory)
        await sched.start()
        big = request(0)
        big.inputs[0].data = bytes(2 << 20)
        big.inputs[0].shape = [1 << 19]
        sched.submit(big)
        await settle()
        assert replies([big])[0].outputs is not None
        assert big.inputs[0].data is None  # staged: the request no longer holds the bytes
        slot = sched._dispatcher.slots[0]
        assert any(arena.grown for arena in slot.input_arenas)
        small = request(1)
        sched.submit(small)  # small requests keep the instance busy, but do not grow it
        await settle()
        await asyncio.sleep(0.3)
        assert not any(arena.grown for arena in slot.input_arenas)
        assert made[0].trims == 1
        await sched.stop(1.0)

    asyncio.run(run())
