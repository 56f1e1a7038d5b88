"""A multi-process closed-loop load generator for one unary gRPC method.

The generator must never be the bottleneck, so each process sends a request that was
serialized once by the parent and keeps the response as bytes (no protobuf work per call).
Responses are checked by byte comparison against the reference answer the parent verified
(falling back to a field-by-field comparison when a server's bytes differ, e.g. map order).

Concurrency ``c`` is split over up to ``procs`` spawned processes; a process with one
outstanding request uses a blocking call in its main thread (the cheapest client Python gRPC
has), several use grpc.aio on uvloop. Every process reports its latencies, completions and the
CPU time it used, so a report can show how many cores the client itself took.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import multiprocessing as mp
import os
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

INT32_MAX = 2**31 - 1
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", INT32_MAX),
    ("grpc.max_receive_message_length", INT32_MAX),
]
# Responses above this size are compared on a sample only (every CHECK_EVERY-th one).
FULL_CHECK_LIMIT = 1 << 20
CHECK_EVERY = 8


@dataclass(slots=True)
class Job:
    url: str
    method: str                   # e.g. "/inference.GRPCInferenceService/ModelInfer"
    request: bytes                # serialized once, sent as is
    expected: bytes               # the verified reference response
    concurrency: int
    warmup_s: float
    duration_s: float
    min_requests: int = 1
    timeout_s: float = 60.0
    metadata: tuple[tuple[str, str], ...] = ()


@dataclass(slots=True)
class Share:
    """What one generator process reports for its part of a job."""

    latencies_ns: list[int] = field(default_factory=list)
    measured: int = 0
    total: int = 0
    errors: int = 0
    first_error: str = ""
    mismatches: int = 0
    window_start: float = 0.0
    window_end: float = 0.0
    cpu_s: float = 0.0
    wall_s: float = 0.0


@dataclass(slots=True)
class LoadResult:
    concurrency: int
    count: int
    errors: int
    first_error: str
    mismatches: int
    window_s: float
    infer_per_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    min_ms: float
    client_cpu_cores: float       # generator CPU seconds per wall second, all processes
    client_cpu_us_per_infer: float
    processes: int

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def percentile(sorted_values: list[int], fraction: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return float(sorted_values[min(rank, len(sorted_values)) - 1])


def responses_match(got: bytes, expected: bytes) -> bool:
    if got == expected:
        return True
    from shmserve.protos import shmserve_service_pb2 as pb
    try:
        a = pb.ModelInferResponse.FromString(got)
        b = pb.ModelInferResponse.FromString(expected)
    except Exception:
        return False
    if list(a.raw_output_contents) != list(b.raw_output_contents):
        return False
    tensors_a = [(t.name, t.datatype, list(t.shape)) for t in a.outputs]
    tensors_b = [(t.name, t.datatype, list(t.shape)) for t in b.outputs]
    return tensors_a == tensors_b


# --- the generator process --------------------------------------------------------------------
class _Runner:
    def __init__(self, job: Job, outstanding: int, quota: int, start_at: float) -> None:
        self.job = job
        self.outstanding = outstanding
        self.quota = quota            # this process's share of min_requests
        self.measure_from = start_at + job.warmup_s
        self.measure_until = self.measure_from + job.duration_s
        self.share = Share(window_start=self.measure_from)
        self.start_at = start_at
        self.big = len(job.expected) > FULL_CHECK_LIMIT

    def keep_going(self, now: float) -> bool:
        return now < self.measure_until or self.share.measured < self.quota

    def record(self, started: float, ended: float, response: bytes | None,
               error: BaseException | None) -> None:
        share = self.share
        share.total += 1
        if error is not None:
            share.errors += 1
            if not share.first_error:
                share.first_error = _describe(error)
        elif not self.big or share.total % CHECK_EVERY == 1:
            assert response is not None
            if not responses_match(response, self.job.expected):
                share.mismatches += 1
        elif len(response or b"") != len(self.job.expected):
            share.mismatches += 1
        if started >= self.measure_from and error is None:
            share.measured += 1
            share.latencies_ns.append(int((ended - started) * 1e9))
            share.window_end = max(share.window_end, ended)

    def run_blocking(self, channel: Any) -> Share:
        import grpc
        job = self.job
        call = channel.unary_unary(job.method)
        metadata = job.metadata or None
        call(job.request, timeout=job.timeout_s, metadata=metadata)  # connect, warm
        _sleep_until(self.start_at)
        cpu0 = time.process_time()
        wall0 = time.monotonic()
        clock = time.monotonic
        while True:
            started = clock()
            if not self.keep_going(started) or self.share.errors > 100:
                break
            try:
                response = call(job.request, timeout=job.timeout_s, metadata=metadata)
            except grpc.RpcError as exc:
                self.record(started, clock(), None, exc)
                continue
            self.record(started, clock(), response, None)
        self.share.cpu_s = time.process_time() - cpu0
        self.share.wall_s = time.monotonic() - wall0
        return self.share

    async def run_async(self, channel: Any) -> Share:
        import grpc
        job = self.job
        call = channel.unary_unary(job.method)
        metadata = job.metadata or None
        await call(job.request, timeout=job.timeout_s, metadata=metadata)  # connect, warm
        await asyncio.sleep(max(0.0, self.start_at - time.monotonic()))
        cpu0 = time.process_time()
        wall0 = time.monotonic()

        async def loop() -> None:
            clock = time.monotonic
            while True:
                started = clock()
                if not self.keep_going(started) or self.share.errors > 100:
                    return
                try:
                    response = await call(job.request, timeout=job.timeout_s,
                                          metadata=metadata)
                except grpc.RpcError as exc:
                    self.record(started, clock(), None, exc)
                    continue
                self.record(started, clock(), response, None)

        await asyncio.gather(*(loop() for _ in range(self.outstanding)))
        self.share.cpu_s = time.process_time() - cpu0
        self.share.wall_s = time.monotonic() - wall0
        return self.share


def _describe(error: BaseException) -> str:
    code = getattr(error, "code", None)
    details = getattr(error, "details", None)
    if callable(code) and callable(details):
        return f"{code()}: {details()}"
    return f"{type(error).__name__}: {error}"


def _sleep_until(deadline: float) -> None:
    delay = deadline - time.monotonic()
    if delay > 0:
        time.sleep(delay)


def _generator_main(conn: Connection) -> None:
    """Body of one generator process: run jobs until told to stop (None).

    Channels are kept per URL (and the aio ones on one long-lived uvloop loop), so a job only
    pays for connecting the first time it talks to a server.
    """
    import grpc
    import uvloop
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    sync_channels: dict[str, Any] = {}
    aio_channels: dict[str, Any] = {}

    async def aio_channel(url: str) -> Any:
        return grpc.aio.insecure_channel(url, options=CHANNEL_OPTIONS)

    try:
        while True:
            message = conn.recv()
            if message is None:
                return
            job, outstanding, quota, start_at = message
            runner = _Runner(job, outstanding, quota, start_at)
            try:
                if outstanding == 1:
                    channel = sync_channels.get(job.url)
                    if channel is None:
                        channel = grpc.insecure_channel(job.url, options=CHANNEL_OPTIONS)
                        sync_channels[job.url] = channel
                    share = runner.run_blocking(channel)
                else:
                    channel = aio_channels.get(job.url)
                    if channel is None:
                        channel = loop.run_until_complete(aio_channel(job.url))
                        aio_channels[job.url] = channel
                    share = loop.run_until_complete(runner.run_async(channel))
            except BaseException as exc:  # report, never leave the parent waiting
                share = runner.share
                share.errors += 1
                share.first_error = share.first_error or _describe(exc)
            conn.send(share)
    finally:
        for channel in sync_channels.values():
            channel.close()
        for channel in aio_channels.values():
            loop.run_until_complete(channel.close())
        loop.close()


class LoadGenerator:
    """A pool of spawned generator processes (spawned, never forked: the parent runs gRPC)."""

    def __init__(self, processes: int, lead_s: float = 0.2) -> None:
        self.size = max(1, processes)
        self.lead_s = lead_s
        context = mp.get_context("spawn")
        self._procs: list[Any] = []
        self._conns: list[Connection] = []
        for _ in range(self.size):
            parent, child = context.Pipe()
            proc = context.Process(target=_generator_main, args=(child,), daemon=True,
                                   name="bench-loadgen")
            proc.start()
            child.close()
            self._procs.append(proc)
            self._conns.append(parent)

    def run(self, job: Job, processes: int | None = None) -> LoadResult:
        used = max(1, min(processes or self.size, self.size, job.concurrency))
        outstanding = [job.concurrency // used + (1 if i < job.concurrency % used else 0)
                       for i in range(used)]
        # Time for every process to connect before the common start.
        start_at = time.monotonic() + self.lead_s
        for index, count in enumerate(outstanding):
            quota = math.ceil(job.min_requests * count / job.concurrency)
            self._conns[index].send((job, count, quota, start_at))
        shares: list[Share] = []
        deadline = time.monotonic() + job.warmup_s + job.duration_s + job.timeout_s * 3 + 30
        for index in range(used):
            conn = self._conns[index]
            if not conn.poll(max(0.0, deadline - time.monotonic())):
                raise TimeoutError("a load generator process did not answer")
            shares.append(conn.recv())
        return _combine(job, shares)

    def close(self) -> None:
        for conn in self._conns:
            try:
                conn.send(None)
            except (OSError, BrokenPipeError):
                pass
        for proc in self._procs:
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        for conn in self._conns:
            conn.close()
        self._procs.clear()
        self._conns.clear()

    def __enter__(self) -> LoadGenerator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _combine(job: Job, shares: list[Share]) -> LoadResult:
    latencies = sorted(value for share in shares for value in share.latencies_ns)
    count = len(latencies)
    start = min(share.window_start for share in shares)
    end = max((share.window_end for share in shares), default=start)
    window = max(end - start, 1e-9)
    cpu = sum(share.cpu_s for share in shares)
    wall = max((share.wall_s for share in shares), default=0.0)
    total = sum(share.total for share in shares)
    errors = sum(share.errors for share in shares)

    def ms(value: float) -> float:
        return value / 1e6

    return LoadResult(
        concurrency=job.concurrency, count=count, errors=errors,
        first_error=next((s.first_error for s in shares if s.first_error), ""),
        mismatches=sum(share.mismatches for share in shares), window_s=window,
        infer_per_s=count / window if count else 0.0,
        p50_ms=ms(percentile(latencies, 0.50)), p90_ms=ms(percentile(latencies, 0.90)),
        p99_ms=ms(percentile(latencies, 0.99)),
        mean_ms=ms(sum(latencies) / count) if count else math.nan,
        min_ms=ms(latencies[0]) if latencies else math.nan,
        client_cpu_cores=cpu / wall if wall else 0.0,
        client_cpu_us_per_infer=cpu / total * 1e6 if total else math.nan,
        processes=len(shares))


def default_processes() -> int:
    return max(1, min(4, os.cpu_count() or 1))
