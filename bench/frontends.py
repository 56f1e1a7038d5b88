"""gRPC throughput with 1 and 2 frontend processes (--grpc-frontends), against the bare
grpc.aio echo (bench/echo_server.py, one process) and Triton 2.51, in the same run.

For ``simple`` and ``simple_dyn`` (bench/models; python-backend models that run unmodified
on both servers) at each concurrency, perf_analyzer (C++, gRPC) drives each server in turn;
rounds are interleaved and each figure is the median of the rounds. Next to infer/s and p50,
the server's CPU per request: the CPU its whole process tree used during the point (frontends
and workers included; Triton's stub processes too) divided by the requests it answered.

    .venv/bin/python -m bench.frontends [--quick] [--json out.json]
    .venv/bin/python -m bench.frontends --frontends 1 2 4 8 --concurrency 64   # many cores

Triton listens on gRPC 18401 / HTTP 18400 (other benches use other ports).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench import perf_analyzer
from bench.local_channel import Ceiling
from bench.procstat import tree_cpu_seconds
from bench.triton_peer import TritonPeer, available
from bench.triton_peer import perf_analyzer as triton_perf_analyzer
from shmserve.tests.serverproc import ServerProcess

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "bench" / "models"
MODEL_NAMES = ["simple", "simple_dyn"]
TRITON_GRPC_PORT, TRITON_HTTP_PORT = 18401, 18400
Server = tuple[str, int]  # (gRPC url, pid whose process tree is the server)


@contextmanager
def shmserve(frontends: int) -> Iterator[Server]:
    logs = tempfile.TemporaryDirectory(prefix="bench-frontends-")
    server = ServerProcess(MODELS, "--grpc-frontends", str(frontends),
                           "--allow-client-shm", "false",
                           log_path=Path(logs.name) / "server.log")
    try:
        server.wait_ready(120)
        yield server.url, server.pid
    finally:
        server.stop()
        logs.cleanup()


@contextmanager
def echo() -> Iterator[Server]:
    ceiling = Ceiling(MODELS)
    try:
        yield ceiling.url, ceiling.process.pid
    finally:
        ceiling.stop()


@contextmanager
def triton() -> Iterator[Server]:
    with TritonPeer(MODELS, grpc_port=TRITON_GRPC_PORT, http_port=TRITON_HTTP_PORT) as peer:
        yield peer.grpc_url, peer.pid


def targets(frontends: list[int], with_triton: bool) -> dict[str, Callable[[], Any]]:
    """The servers of a run, in the order they are measured in each round."""
    chosen: dict[str, Callable[[], Any]] = {"echo": echo}
    for count in frontends:
        chosen[f"shmserve-{count}fe"] = lambda count=count: shmserve(count)
    if with_triton:
        chosen["triton"] = triton
    return chosen


def measure(url: str, pid: int, model: str, concurrency: int, duration: float,
            quick: bool) -> dict[str, float]:
    before = tree_cpu_seconds(pid)
    started = time.monotonic()
    result = perf_analyzer.run_point(url, model, concurrency, duration_s=duration, quick=quick)
    wall = time.monotonic() - started
    cpu = tree_cpu_seconds(pid) - before
    # perf_analyzer runs warm-up and trials around its window: CPU over the whole run, per
    # request at the measured rate over the same wall time.
    requests = result.infer_per_s * wall
    return {"infer_per_s": result.infer_per_s, "p50_ms": result.p50_ms,
            "server_cpu_us_per_req": cpu / requests * 1e6 if requests else math.nan}


def run(args: argparse.Namespace) -> dict[str, Any]:
    binary = triton_perf_analyzer()
    if binary is None:
        raise SystemExit("perf_analyzer not found (../shared/peers/setup_triton.sh)")
    os.environ["PERF_ANALYZER"] = binary
    servers = targets(args.frontends, available() and not args.no_triton)
    rounds: dict[tuple[str, str, int], list[dict[str, float]]] = {}
    for round_index in range(args.rounds):
        for target, start in servers.items():
            with start() as (url, pid):
                models = args.models if target != "echo" else ["simple"]
                for model in models:
                    for concurrency in args.concurrency:
                        point = measure(url, pid, model, concurrency, args.duration,
                                        args.quick)
                        rounds.setdefault((target, model, concurrency), []).append(point)
                        print(f"round {round_index + 1} {target:13} {model:10} "
                              f"c{concurrency:<3} {point['infer_per_s']:9.0f}/s "
                              f"p50 {point['p50_ms']:.2f} ms "
                              f"cpu {point['server_cpu_us_per_req']:.0f} us/req",
                              file=sys.stderr, flush=True)
    rows = []
    for (target, model, concurrency), points in rounds.items():
        median = {key: statistics.median(p[key] for p in points) for key in points[0]}
        rows.append({"target": target, "model": model, "concurrency": concurrency, **median})
    return {"rounds": args.rounds, "duration_s": args.duration, "rows": rows}


def report(document: dict[str, Any]) -> str:
    rows = document["rows"]

    def find(target: str, model: str, concurrency: int) -> dict[str, Any] | None:
        for row in rows:
            if (row["target"], row["model"], row["concurrency"]) == (target, model,
                                                                     concurrency):
                return row
        return None

    lines = [f"medians of {document['rounds']} interleaved round(s), perf_analyzer gRPC; "
             "echo: bare grpc.aio parse-only (the same answer for either model)", "",
             "| model | c | server | infer/s | p50 ms | server CPU µs/req | x echo | x Triton |",
             "|---|---|---|---|---|---|---|---|"]
    for row in sorted(rows, key=lambda r: (r["model"], r["concurrency"], r["target"])):
        base = find("echo", "simple", row["concurrency"])
        peer = find("triton", row["model"], row["concurrency"])

        def ratio(other: dict[str, Any] | None, row: dict[str, Any] = row) -> str:
            return f"{row['infer_per_s'] / other['infer_per_s']:.2f}" \
                if other and other["infer_per_s"] else "-"

        lines.append(f"| {row['model']} | {row['concurrency']} | {row['target']} | "
                     f"{row['infer_per_s']:,.0f} | {row['p50_ms']:.2f} | "
                     f"{row['server_cpu_us_per_req']:.0f} | {ratio(base)} | {ratio(peer)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8, 32])
    parser.add_argument("--frontends", type=int, nargs="+", default=[1, 2],
                        help="shmserve's --grpc-frontends values to measure (default 1 2)")
    parser.add_argument("--models", nargs="+", default=MODEL_NAMES, choices=MODEL_NAMES)
    parser.add_argument("--no-triton", action="store_true",
                        help="leave Triton out even where ../shared/peers installed it")
    parser.add_argument("--duration", type=float, default=None,
                        help="seconds per window (default 5, quick 0.3)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true",
                        help="one round of at most 3 windows each, short unless --duration")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds = 1
    if args.duration is None:
        args.duration = 0.3 if args.quick else 5.0
    document = run(args)
    if args.json:
        args.json.write_text(json.dumps(document, indent=2))
    print(report(document))
    return 0


if __name__ == "__main__":
    sys.exit(main())
