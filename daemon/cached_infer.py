"""The core's side of the response cache: look a request up before its scheduler sees it,
answer a hit from the cache, and keep a miss's answer.

A hit is answered where the request wants its outputs: the cached bytes, or a copy into the
output's client region (a response never goes to a destination it was not written to). A miss
is queued as usual with its reply wrapped: the answer is kept (outputs the worker wrote into a
client region are read back once) and then passed on. Hashing, copying into a region and
reading one back happen off the event loop above ``LOOP_BYTES``.

Statistics follow Triton: a hit counts as a success with its lookup-and-extract time in
``cache_hit`` (no execution, no inference count); a miss adds its lookup-and-insert time to
``cache_miss`` (and to the request's duration) when its response is inserted.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from shmserve.daemon.errors import ServeError, internal, unavailable
from shmserve.daemon.region_writer import RegionWriter
from shmserve.daemon.reply import Reply
from shmserve.daemon.request import InferRequest, OutputTensor, RequestedOutput
from shmserve.daemon.response_cache import (
    CachedOutput,
    CacheEntry,
    ResponseCache,
    Uncacheable,
    input_bytes,
    open_region,
    read_region,
    request_key,
)
from shmserve.daemon.statistics import ModelStats
from shmserve.protos.datatypes import ELEMENT_SIZE, element_count

if TYPE_CHECKING:
    from shmserve.daemon.models import ModelVersion

from shmserve.daemon.infer_request import model_plan

log = logging.getLogger("shmserve.cache")
LOOP_BYTES = 1 << 20  # hashed, or copied to or from a region, on the event loop up to this
# (region, position, bytes): one copy into a client's region
RegionWrite = tuple[Any, int, bytes]


class CacheFront:
    def __init__(self, cache: ResponseCache,
                 finished: Callable[[InferRequest], None]) -> None:
        self.cache = cache
        self._finished = finished  # the core's accounting, once per request it accepted
        self.writer = RegionWriter()
        self._tasks: set[asyncio.Task[None]] = set()

    def forget_regions(self, region_ids: list[int]) -> None:
        """Regions the registry released: no request uses them any more."""
        self.writer.forget(region_ids)

    @staticmethod
    def enabled_for(model: ModelVersion) -> bool:
        return model.config.response_cache.enable

    def submit(self, model: ModelVersion, request: InferRequest) -> None:
        """Answer ``request`` from the cache, or queue it with its scheduler and keep its
        answer. Raises ServeError as the scheduler's submit does (nothing was queued)."""
        start = time.perf_counter_ns()
        request.received_ns = start
        if input_bytes(request) > LOOP_BYTES:
            self._spawn(self._submit_later(model, request, start))
            return
        try:
            key = request_key(request, model_plan(model).outputs)
        except Uncacheable:
            model.scheduler.submit(request)
            return
        self._look_up(model, request, key, start)

    async def _submit_later(self, model: ModelVersion, request: InferRequest,
                            start: int) -> None:
        try:
            key: bytes | None = await asyncio.to_thread(request_key, request,
                                                        model_plan(model).outputs)
        except Uncacheable:
            key = None
        try:
            if key is None:
                model.scheduler.submit(request)
            else:
                self._look_up(model, request, key, start)
        except ServeError as error:  # e.g. the queue is full: nothing was queued
            self._finished(request)
            request.reply.fail(error)
        except Exception as exc:
            log.exception("queueing a request after its cache lookup failed")
            self._finished(request)
            request.reply.fail(internal(f"{type(exc).__name__}: {exc}"))

    def _look_up(self, model: ModelVersion, request: InferRequest, key: bytes,
                 start: int) -> None:
        entry = self.cache.lookup(key)
        stats: ModelStats = model.scheduler.stats
        if entry is None:
            reply = CachingReply(request.reply, self, key, stats,
                                 time.perf_counter_ns() - start)
            reply.request = request
            request.reply = reply
            model.scheduler.submit(request)
            return
        try:
            outputs, writes = _hit_outputs(entry, request.outputs)
        except ServeError as error:
            self._answer_hit(request, stats, start, error)
            return
        for region, _, _ in writes:
            self.writer.prepare(region)
        if sum(len(data) for _, _, data in writes) > LOOP_BYTES:
            # Straight to a thread, answered from its done callback: no task in between (the
            # copy is most of a hit's time, the hops around it the rest).
            copied = asyncio.get_running_loop().run_in_executor(None, _write_all, self.writer,
                                                                writes)
            copied.add_done_callback(functools.partial(self._written, request, stats, start,
                                                       outputs))
            return
        self._answer_hit(request, stats, start, _write_all(self.writer, writes) or outputs)

    def _written(self, request: InferRequest, stats: ModelStats, start: int,
                 outputs: list[OutputTensor], copied: asyncio.Future[ServeError | None]
                 ) -> None:
        failure = copied.exception()
        if failure is not None:
            log.error("response cache: copying a hit into its region failed: %r", failure)
            error: ServeError | None = internal(f"{type(failure).__name__}: {failure}")
        else:
            error = copied.result()
        self._answer_hit(request, stats, start, error or outputs)

    def _answer_hit(self, request: InferRequest, stats: ModelStats, start: int,
                    result: list[OutputTensor] | ServeError) -> None:
        now = time.perf_counter_ns()
        ok = not isinstance(result, ServeError)
        stats.record_request(ok, now - start)
        if ok:
            stats.cache_hit.add(now - start)
        self._finished(request)  # after the copies: the request's regions stay pinned till now
        if request.cancelled:
            return
        try:
            if isinstance(result, ServeError):
                request.reply.fail(result)
            else:
                request.reply.send(result, True)
        except Exception:
            log.exception("answering a request from the cache failed")

    def keep(self, key: bytes, response: list[OutputTensor], outputs: list[RequestedOutput],
             stats: ModelStats, lookup_ns: int, answer: Callable[[], None]) -> None:
        """A miss's ``response`` came: keep it, then ``answer`` (pass it on)."""
        start = time.perf_counter_ns()
        try:
            reads = _reads(response, outputs)
        except Uncacheable:
            answer()
            return
        if sum(nbytes for _, _, _, nbytes in reads.values()) > LOOP_BYTES or any(
                not isinstance(o.data, bytes) and o.data is not None and len(o.data) > LOOP_BYTES
                for o in response):
            self._spawn(self._keep_later(key, response, reads, stats, lookup_ns, start, answer))
            return
        self._insert(key, _entry(response, reads), stats, lookup_ns, start)
        answer()

    async def _keep_later(self, key: bytes, response: list[OutputTensor],
                          reads: dict[str, tuple[int, int, Any, int]], stats: ModelStats,
                          lookup_ns: int, start: int, answer: Callable[[], None]) -> None:
        try:
            entry = await asyncio.to_thread(_entry, response, reads)
            self._insert(key, entry, stats, lookup_ns, start)
        finally:
            answer()

    def _insert(self, key: bytes, entry: CacheEntry | None, stats: ModelStats,
                lookup_ns: int, start: int) -> None:
        if entry is None:
            return
        if not self.cache.insert(key, entry) and self.cache.lookup(key) is not None:
            return  # an identical request's answer came first: that one was the miss
        miss_ns = lookup_ns + time.perf_counter_ns() - start
        stats.cache_miss.add(miss_ns)
        stats.success.ns += miss_ns

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("response cache: %r", task.exception())


class CachingReply(Reply):
    """A miss's reply: keeps the answer in the cache, then passes it to the door's reply.
    Never answered by a worker directly: the cache needs the outputs."""

    __slots__ = ("front", "inner", "key", "lookup_ns", "stats")
    direct = False

    def __init__(self, inner: Reply, front: CacheFront, key: bytes, stats: ModelStats,
                 lookup_ns: int) -> None:
        self.request = None
        self.inner = inner
        self.front = front
        self.key = key
        self.stats = stats
        self.lookup_ns = lookup_ns

    def send(self, response: list[OutputTensor], final: bool) -> None:
        request = self.request
        assert request is not None
        inner = self.inner
        self.front.keep(self.key, response, request.outputs, self.stats, self.lookup_ns,
                        lambda: inner.send(response, final))

    def fail(self, error: ServeError) -> None:
        self.inner.fail(error)

    def send_error(self, error: ServeError, final: bool) -> None:
        self.inner.send_error(error, final)

    def end(self) -> None:
        self.inner.end()

    def answered_directly(self) -> None:
        self.inner.answered_directly()


def _hit_outputs(entry: CacheEntry, requested: list[RequestedOutput]
                 ) -> tuple[list[OutputTensor], list[RegionWrite]]:
    """The hit's outputs, and the copies into client regions they need."""
    destinations = {output.name: output for output in requested if output.region is not None}
    outputs: list[OutputTensor] = []
    writes: list[RegionWrite] = []
    for cached in entry.outputs:
        wanted = destinations.get(cached.name)
        if wanted is None:
            outputs.append(OutputTensor(cached.name, cached.datatype, list(cached.shape),
                                        cached.data))
            continue
        if len(cached.data) > wanted.byte_size:
            raise internal(f"shared memory size specified with the request for output "
                           f"'{cached.name}' ({wanted.byte_size} bytes) should be at least "
                           f"{len(cached.data)} bytes to hold the results")
        region = wanted.region
        assert region is not None
        writes.append((region, region.offset + wanted.offset, cached.data))
        outputs.append(OutputTensor(cached.name, cached.datatype, list(cached.shape), None))
    return outputs, writes


def _write_all(writer: RegionWriter, writes: list[RegionWrite]) -> ServeError | None:
    """Copy a hit's outputs into their regions; the error, if one failed."""
    for region, position, data in writes:
        try:
            writer.write(region, position, data)
        except (OSError, Uncacheable) as exc:
            return unavailable(f"failed to write outputs: {exc}")
    return None


def _reads(response: list[OutputTensor], requested: list[RequestedOutput]
           ) -> dict[str, tuple[int, int, Any, int]]:
    """For each output the worker wrote into a client region: (fd, position, region, nbytes),
    the fd opened now (while the region is surely registered). Raises Uncacheable."""
    reads: dict[str, tuple[int, int, Any, int]] = {}
    regions = {output.name: output for output in requested if output.region is not None}
    try:
        for output in response:
            if output.data is not None:
                continue
            wanted = regions.get(output.name)
            size = ELEMENT_SIZE.get(output.datatype, -1)
            if wanted is None or wanted.region is None or size < 0:
                raise Uncacheable(f"output '{output.name}' has no size known here")
            region = wanted.region
            reads[output.name] = (open_region(region, writable=False),
                                  region.offset + wanted.offset, region,
                                  size * element_count(output.shape))
    except Uncacheable:
        for fd, _, _, _ in reads.values():
            os.close(fd)
        raise
    return reads


def _entry(response: list[OutputTensor], reads: dict[str, tuple[int, int, Any, int]]
           ) -> CacheEntry | None:
    """The cache's copy of a response (None if a region could not be read back); closes the
    fds of ``reads``."""
    outputs: list[CachedOutput] = []
    try:
        for output in response:
            data = output.data
            if data is None:
                fd, position, _, nbytes = reads[output.name]
                data = read_region(fd, position, nbytes)
            elif not isinstance(data, bytes):
                data = bytes(data)
            outputs.append(CachedOutput(output.name, output.datatype, tuple(output.shape),
                                        data))
    except Uncacheable:
        return None
    finally:
        for fd, _, _, _ in reads.values():
            os.close(fd)
    return CacheEntry(tuple(outputs))
