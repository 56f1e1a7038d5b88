"""Issue 8: ``simple`` through the local shared-memory channel vs gRPC vs the bare gRPC ceiling.

One run, three targets, interleaved at every concurrency (1, 4, 8 by default):

- ``local``: ``shmserve.client`` with ``local://<socket>`` against shmserve,
- ``grpc``:  ``shmserve.client`` over gRPC against the same shmserve,
- ``ceiling``: a bare grpc.aio unary server answering a canned ModelInferResponse (no
  validation, no scheduling, no worker) in its own process (bench/echo_server.py, or a tiny
  built-in one), driven by the cheapest Python gRPC client: a request serialized once, sent
  as bytes.

The load comes from spawned generator processes (closed loop: each keeps its share of the
outstanding requests busy), so one client process's GIL is not the bottleneck; each reports
its latencies and the CPU it used. Server and host CPU come from /proc. Run from the
repository root:

    python bench/local_channel.py [--duration 5] [--procs 2] [--server-arg=--flag=value]
                                  [--json out.json]

Issue 8's targets, checked at the end: local p50 <= 0.25 x gRPC p50, and local throughput at
concurrency 8 >= 3 x the ceiling's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing as mp
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from bench.procstat import host_busy_seconds, process_cpu_seconds, tree_cpu_seconds

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "models"
INFER = "/inference.GRPCInferenceService/ModelInfer"
TARGETS = ("local", "grpc", "ceiling")
A = np.arange(16, dtype=np.int32).reshape(1, 16)
B = np.ones((1, 16), dtype=np.int32)


# --- the generator processes -----------------------------------------------------------------
@dataclass(slots=True)
class Job:
    target: str          # local | grpc | ceiling
    url: str
    outstanding: int     # requests this process keeps in flight
    start_at: float      # time.monotonic() of the common start
    warmup_s: float
    duration_s: float
    request: bytes = b""  # ceiling: the serialized request


@dataclass(slots=True)
class Share:
    latencies_ns: list[int] = field(default_factory=list)
    errors: int = 0
    first_error: str = ""
    wrong: int = 0
    cpu_s: float = 0.0
    window: tuple[float, float] = (0.0, 0.0)


class _Loop:
    """Closed-loop bookkeeping shared by the generator flavours."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.share = Share()
        self.measure_from = job.start_at + job.warmup_s
        self.measure_until = self.measure_from + job.duration_s
        self.first = math.inf
        self.last = 0.0

    def going(self, now: float) -> bool:
        return now < self.measure_until and self.share.errors < 100

    def record(self, started: float, ended: float, ok: bool, error: BaseException | None = None
               ) -> None:
        if error is not None:
            self.share.errors += 1
            self.share.first_error = self.share.first_error or f"{type(error).__name__}: {error}"
            return
        if not ok:
            self.share.wrong += 1
        if started >= self.measure_from and ended <= self.measure_until:
            self.share.latencies_ns.append(int((ended - started) * 1e9))
            self.first = min(self.first, started)
            self.last = max(self.last, ended)


def _run_client_sync(job: Job, loop: _Loop) -> None:
    from shmserve.client import Client
    with Client(job.url) as client:
        client.infer("simple", {"INPUT0": A, "INPUT1": B})  # connect, warm
        _sleep_until(job.start_at)
        cpu0 = time.process_time()
        clock = time.monotonic
        i = 0
        while loop.going(clock()):
            x = A + i
            started = clock()
            try:
                out = client.infer("simple", {"INPUT0": x, "INPUT1": B})
            except Exception as exc:
                loop.record(started, clock(), False, exc)
                continue
            loop.record(started, clock(), bool(out["OUTPUT0"][0, 1] == i + 2))
            i = (i + 1) & 0xFFFF
        loop.share.cpu_s = time.process_time() - cpu0


async def _run_client_async(job: Job, loop: _Loop) -> None:
    from shmserve.client import AsyncClient
    async with AsyncClient(job.url) as client:
        await client.infer("simple", {"INPUT0": A, "INPUT1": B})
        await asyncio.sleep(max(0.0, job.start_at - time.monotonic()))
        cpu0 = time.process_time()

        async def one(worker: int) -> None:
            clock = time.monotonic
            i = worker
            while loop.going(clock()):
                x = A + i
                started = clock()
                try:
                    out = await client.infer("simple", {"INPUT0": x, "INPUT1": B})
                except Exception as exc:
                    loop.record(started, clock(), False, exc)
                    continue
                loop.record(started, clock(), bool(out["OUTPUT0"][0, 1] == i + 2))
                i = (i + 7) & 0xFFFF

        await asyncio.gather(*(one(w) for w in range(job.outstanding)))
        loop.share.cpu_s = time.process_time() - cpu0


def _run_ceiling(job: Job, loop: _Loop) -> None:
    import grpc
    options = [("grpc.max_receive_message_length", -1)]
    if job.outstanding == 1:
        with grpc.insecure_channel(job.url, options=options) as channel:
            call = channel.unary_unary(INFER, _registered_method=True)
            call(job.request, timeout=30)
            _sleep_until(job.start_at)
            cpu0 = time.process_time()
            clock = time.monotonic
            while loop.going(clock()):
                started = clock()
                try:
                    answer = call(job.request, timeout=30)
                except grpc.RpcError as exc:
                    loop.record(started, clock(), False, exc)
                    continue
                loop.record(started, clock(), len(answer) > 0)
            loop.share.cpu_s = time.process_time() - cpu0
        return

    async def main() -> None:
        async with grpc.aio.insecure_channel(job.url, options=options) as channel:
            call = channel.unary_unary(INFER, _registered_method=True)
            await call(job.request, timeout=30)
            await asyncio.sleep(max(0.0, job.start_at - time.monotonic()))
            cpu0 = time.process_time()

            async def one() -> None:
                clock = time.monotonic
                while loop.going(clock()):
                    started = clock()
                    try:
                        answer = await call(job.request, timeout=30)
                    except grpc.RpcError as exc:
                        loop.record(started, clock(), False, exc)
                        continue
                    loop.record(started, clock(), len(answer) > 0)

            await asyncio.gather(*(one() for _ in range(job.outstanding)))
            loop.share.cpu_s = time.process_time() - cpu0

    _uvloop_run(main())


def _uvloop_run(coroutine: Any) -> None:
    import uvloop
    event_loop = uvloop.new_event_loop()
    try:
        event_loop.run_until_complete(coroutine)
    finally:
        event_loop.close()


def _sleep_until(when: float) -> None:
    delay = when - time.monotonic()
    if delay > 0:
        time.sleep(delay)


def generator_main(conn: Connection) -> None:
    """One generator process: run jobs until told to stop (None)."""
    while True:
        job: Job | None = conn.recv()
        if job is None:
            return
        loop = _Loop(job)
        try:
            if job.target == "ceiling":
                _run_ceiling(job, loop)
            elif job.outstanding == 1:
                _run_client_sync(job, loop)
            else:
                _uvloop_run(_run_client_async(job, loop))
        except BaseException as exc:
            loop.share.errors += 1
            loop.share.first_error = loop.share.first_error or f"{type(exc).__name__}: {exc}"
        loop.share.window = (loop.first, loop.last)
        conn.send(loop.share)


class Generators:
    def __init__(self, count: int) -> None:
        context = mp.get_context("spawn")
        self.conns: list[Connection] = []
        self.procs: list[Any] = []
        for _ in range(count):
            parent, child = context.Pipe()
            proc = context.Process(target=generator_main, args=(child,), daemon=True)
            proc.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(proc)

    def run(self, target: str, url: str, concurrency: int, warmup_s: float, duration_s: float,
            request: bytes = b"") -> list[Share]:
        used = min(concurrency, len(self.conns))
        start_at = time.monotonic() + 1.0  # time to connect
        for index in range(used):
            outstanding = concurrency // used + (1 if index < concurrency % used else 0)
            self.conns[index].send(Job(target, url, outstanding, start_at, warmup_s,
                                       duration_s, request))
        return [self.conns[index].recv() for index in range(used)]

    def close(self) -> None:
        for conn in self.conns:
            conn.send(None)
        for proc in self.procs:
            proc.join(10)


# --- servers --------------------------------------------------------------------------------
class Ceiling:
    """bench/echo_server.py when present, else the tiny built-in canned-response server."""

    def __init__(self, repository: Path) -> None:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
        if (ROOT / "bench" / "echo_server.py").exists():
            command = [sys.executable, "-m", "bench.echo_server", "--port", "0",
                       "--model-repository", str(repository)]
        else:
            command = [sys.executable, str(Path(__file__).resolve()), "--serve-ceiling"]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, env=env, cwd=ROOT)
        assert self.process.stdout is not None
        line = self.process.stdout.readline().decode()
        match = re.search(r"ECHO READY (\d+)", line)
        if not match:
            self.stop()
            raise RuntimeError(f"ceiling server did not start: {line!r}")
        self.url = f"127.0.0.1:{match.group(1)}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


def serve_ceiling() -> None:
    """The built-in ceiling: ModelInfer answered with one canned response, on uvloop."""
    import grpc

    from shmserve.protos import shmserve_service_pb2 as pb

    response = pb.ModelInferResponse(model_name="simple", model_version="1")
    for name, value in (("OUTPUT0", A + B), ("OUTPUT1", A - B)):
        response.outputs.add(name=name, datatype="INT32", shape=[1, 16])
        response.raw_output_contents.append(value.tobytes())
    canned: bytes = response.SerializeToString()

    async def infer(_request: bytes, _context: Any) -> bytes:
        return canned

    async def main() -> None:
        server = grpc.aio.server()
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
            "inference.GRPCInferenceService", {"ModelInfer": grpc.unary_unary_rpc_method_handler(
                infer)})])
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        print(f"ECHO READY {port}", flush=True)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        await server.stop(0)

    _uvloop_run(main())


# --- the run --------------------------------------------------------------------------------
def summarize(shares: list[Share], wall_s: float, server_cpu_s: tuple[float, float],
              host: tuple[float, float]) -> dict[str, Any]:
    latencies = sorted(v for s in shares for v in s.latencies_ns)
    start = min((s.window[0] for s in shares if s.latencies_ns), default=0.0)
    end = max((s.window[1] for s in shares if s.latencies_ns), default=0.0)
    window = max(end - start, 1e-9)

    def pct(q: float) -> float:
        if not latencies:
            return math.nan
        return latencies[min(len(latencies) - 1, max(0, math.ceil(q * len(latencies)) - 1))] / 1e6

    client_cpu = sum(s.cpu_s for s in shares)
    busy, total = host
    return {"count": len(latencies), "infer_per_s": len(latencies) / window,
            "p50_ms": pct(0.50), "p90_ms": pct(0.90), "p99_ms": pct(0.99),
            "errors": sum(s.errors for s in shares),
            "first_error": next((s.first_error for s in shares if s.first_error), ""),
            "wrong": sum(s.wrong for s in shares), "processes": len(shares),
            "client_cpu_cores": client_cpu / wall_s,
            "server_cpu_cores": server_cpu_s[0] / wall_s,
            "server_main_cpu_cores": server_cpu_s[1] / wall_s,
            "client_cpu_us_per_infer": client_cpu / len(latencies) * 1e6 if latencies
            else math.nan,
            "server_cpu_us_per_infer": server_cpu_s[0] / len(latencies) * 1e6 if latencies
            else math.nan,
            "host_busy_cores": busy / total * (os.cpu_count() or 1) if total else math.nan}


def measure(generators: Generators, target: str, url: str, concurrency: int, args: Any,
            server_pid: int, request: bytes) -> dict[str, Any]:
    cpu0, main0 = tree_cpu_seconds(server_pid), process_cpu_seconds(server_pid)
    busy0, total0 = host_busy_seconds()
    started = time.monotonic()
    shares = generators.run(target, url, concurrency, args.warmup, args.duration, request)
    wall = time.monotonic() - started
    busy1, total1 = host_busy_seconds()
    return summarize(shares, wall, (tree_cpu_seconds(server_pid) - cpu0,
                                    process_cpu_seconds(server_pid) - main0),
                     (busy1 - busy0, total1 - total0))


def run(args: argparse.Namespace) -> dict[str, Any]:
    from shmserve.client import Client
    from shmserve.tests.serverproc import ServerProcess, build_repository

    work = Path(tempfile.mkdtemp(prefix="bench-local-"))
    repo = build_repository(work / "repo", ["simple"])
    if args.batching:  # the same model with dynamic batching (queued requests run together)
        with open(repo / "simple" / "config.pbtxt", "a") as config:
            config.write("\ndynamic_batching { max_queue_delay_microseconds: 0 }\n")
    socket_path = work / "shmserve.sock"
    extra = ["--local-socket", str(socket_path), *args.server_arg]
    server = ServerProcess(repo, *extra, log_path=work / "server.log")
    ceiling: Ceiling | None = None
    generators: Generators | None = None
    results: dict[str, Any] = {"concurrency": args.concurrency, "points": {},
                               "batching": args.batching,
                               "loadavg_before": os.getloadavg(), "cpus": os.cpu_count(),
                               "duration_s": args.duration, "procs": args.procs,
                               "server_args": args.server_arg}
    try:
        server.wait_ready()
        ceiling = Ceiling(repo)
        with Client(server.url) as client:
            request = client.serialize_infer_request("simple", {"INPUT0": A, "INPUT1": B})
        urls = {"local": f"local://{socket_path}", "grpc": server.url, "ceiling": ceiling.url}
        pids = {"local": server.pid, "grpc": server.pid, "ceiling": ceiling.process.pid}
        generators = Generators(args.procs)
        for concurrency in args.concurrency:
            for target in TARGETS:
                point = measure(generators, target, urls[target], concurrency, args,
                                pids[target], request)
                results["points"][f"{target}/c{concurrency}"] = point
                print(f"  {target:<8} c={concurrency:<3} {point['infer_per_s']:9.0f} infer/s  "
                      f"p50 {point['p50_ms']:7.3f} ms  p99 {point['p99_ms']:7.3f} ms  "
                      f"client {point['client_cpu_cores']:.2f} cores  "
                      f"server {point['server_cpu_cores']:.2f} "
                      f"(supervisor {point['server_main_cpu_cores']:.2f})  host "
                      f"{point['host_busy_cores']:.2f}"
                      + (f"  ERRORS {point['errors']}: {point['first_error']}"
                         if point["errors"] else "")
                      + (f"  WRONG {point['wrong']}" if point["wrong"] else ""), flush=True)
        results["loadavg_after"] = os.getloadavg()
    finally:
        if generators is not None:
            generators.close()
        if ceiling is not None:
            ceiling.stop()
        server.stop()
    return results


def report(results: dict[str, Any]) -> str:
    points = results["points"]
    lines = ["| target | c | infer/s | p50 ms | p99 ms | client CPU cores (µs/infer) | "
             "server CPU cores (µs/infer) | of which supervisor | host busy cores |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for concurrency in results["concurrency"]:
        for target in TARGETS:
            p = points[f"{target}/c{concurrency}"]
            lines.append(f"| {target} | {concurrency} | {p['infer_per_s']:.0f} | "
                         f"{p['p50_ms']:.3f} | {p['p99_ms']:.3f} | "
                         f"{p['client_cpu_cores']:.2f} ({p['client_cpu_us_per_infer']:.0f}) | "
                         f"{p['server_cpu_cores']:.2f} ({p['server_cpu_us_per_infer']:.0f}) | "
                         f"{p['server_main_cpu_cores']:.2f} | {p['host_busy_cores']:.2f} |")
    lines.append("")
    for concurrency in results["concurrency"]:
        local, grpc_, ceiling = (points[f"{t}/c{concurrency}"] for t in TARGETS)
        lines.append(f"c={concurrency}: local p50 = {local['p50_ms'] / grpc_['p50_ms']:.2f} x "
                     f"gRPC p50 (target <= 0.25); local throughput = "
                     f"{local['infer_per_s'] / ceiling['infer_per_s']:.2f} x ceiling"
                     + (" (target >= 3)" if concurrency == 8 else ""))
    if results.get("server_args"):
        lines.append(f"server arguments: {' '.join(results['server_args'])}")
    lines.append(f"load average before {results['loadavg_before']}, after "
                 f"{results.get('loadavg_after')}; {results['cpus']} CPUs")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per point")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--procs", type=int, default=2, help="generator processes")
    parser.add_argument("--batching", action="store_true",
                        help="give simple dynamic batching (max_queue_delay 0)")
    parser.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                        help="extra `shmserve serve` argument (repeatable), e.g. "
                             "--server-arg=--worker-busy-poll-us=200")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--serve-ceiling", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_ceiling:
        serve_ceiling()
        return 0
    results = run(args)
    print(report(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=asdict))
    return 0


if __name__ == "__main__":
    sys.exit(main())
