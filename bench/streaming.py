"""Decoupled streaming: shmserve (gRPC and local://) against Triton 2.51, same model, same run.

``python -m bench.streaming [--quick]`` serves bench/models_streaming/stream_repeat (a
python-backend model that sends COUNT small responses, then the final flag) on shmserve and on
Triton (bench/triton_peer.py), and measures, per target:

- responses/s of one stream carrying one request of COUNT responses (10,000 by default);
- time to first response, p50 and p99, of requests sent one after another on one stream;
- responses/s of 8 streams at once (one client process per stream);
- the server's CPU per response (its whole process tree).

gRPC targets use tritonclient's stream API for both servers (the same client code);
``local`` uses shmserve.client over the local channel. Triton is skipped when it is not
installed here (../shared/peers/setup_triton.sh).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import queue
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench import triton_peer
from bench.procstat import tree_cpu_seconds
from bench.report import save_dated

MODEL = "stream_repeat"
REPOSITORY = Path(__file__).resolve().parent / "models_streaming"
RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclass
class RequestTiming:
    first_s: float  # send -> first response
    final_s: float  # send -> final flag
    responses: int


# --- one stream, requests one after another ------------------------------------------------
def grpc_requests(url: str, counts: list[int]) -> list[RequestTiming]:
    """tritonclient's stream API: one stream, each request sent after the previous ended."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    answers: queue.Queue[tuple[float, Any, Any]] = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put(
        (time.perf_counter(), result, error)))
    timings = []
    try:
        for count in counts:
            count_input = grpcclient.InferInput("COUNT", [1], "INT32")
            count_input.set_data_from_numpy(np.array([count], dtype=np.int32))
            sent = time.perf_counter()
            client.async_stream_infer(MODEL, [count_input], enable_empty_final_response=True)
            first, responses = None, 0
            while True:
                at, result, error = answers.get(timeout=120)
                if error is not None:
                    raise RuntimeError(f"stream error: {error}")
                first = at if first is None else first
                final = result.get_response().parameters.get("triton_final_response")
                if final is not None and final.bool_param:
                    break
                responses += 1
            if responses != count:
                raise RuntimeError(f"expected {count} responses, got {responses}")
            timings.append(RequestTiming(first - sent, at - sent, responses))
    finally:
        client.stop_stream()
        client.close()
    return timings


def local_requests(url: str, counts: list[int]) -> list[RequestTiming]:
    """shmserve.client over local://: one stream fed request by request from a queue."""
    from shmserve.client import Client

    feed: queue.Queue[dict[str, np.ndarray] | None] = queue.Queue()
    timings = []
    with Client(url) as client:
        stream = client.stream_infer(
            MODEL, iter(feed.get, None),
            parameters={"triton_enable_empty_final_response": True})
        try:
            for count in counts:
                sent = time.perf_counter()
                feed.put({"COUNT": np.array([count], dtype=np.int32)})
                first, responses = None, 0
                for result in stream:
                    at = time.perf_counter()
                    first = at if first is None else first
                    if result.error is not None:
                        raise RuntimeError(f"stream error: {result.error}")
                    if result.final:
                        break
                    responses += 1
                if responses != count:
                    raise RuntimeError(f"expected {count} responses, got {responses}")
                timings.append(RequestTiming(first - sent, at - sent, responses))
        finally:
            feed.put(None)
            stream.close()
    return timings


RUNNERS: dict[str, Callable[[str, list[int]], list[RequestTiming]]] = {
    "grpc": grpc_requests, "local": local_requests}


# --- several streams at once ------------------------------------------------------------------
def _stream_process(kind: str, url: str, count: int, barrier: Any,
                    results: Any) -> None:
    RUNNERS[kind](url, [1])  # connect and warm up before the barrier
    barrier.wait()
    timing = RUNNERS[kind](url, [count])[0]
    results.put(asdict(timing))


def concurrent_streams(kind: str, url: str, streams: int, count: int) -> float:
    """Responses/s of ``streams`` client processes, each one stream of ``count`` responses."""
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(streams + 1)
    results = context.Queue()
    processes = [context.Process(target=_stream_process, args=(kind, url, count, barrier, results))
                 for _ in range(streams)]
    for process in processes:
        process.start()
    barrier.wait(timeout=120)
    started = time.perf_counter()
    finished = [results.get(timeout=600) for _ in processes]
    wall = time.perf_counter() - started
    for process in processes:
        process.join(30)
    return sum(item["responses"] for item in finished) / wall


# --- one target --------------------------------------------------------------------------------
def measure(kind: str, url: str, server_pid: int, args: argparse.Namespace) -> dict[str, Any]:
    run = RUNNERS[kind]
    run(url, [10] * 5)  # warm-up: both instances, the stream path
    cpu_before = tree_cpu_seconds(server_pid)
    one = run(url, [args.responses])[0]
    cpu_one = tree_cpu_seconds(server_pid) - cpu_before
    single = run(url, [1] * args.ttfr_requests)
    firsts = sorted(t.first_s for t in single)
    cpu_before = tree_cpu_seconds(server_pid)
    concurrent = concurrent_streams(kind, url, args.streams, args.responses // args.streams)
    cpu_concurrent = tree_cpu_seconds(server_pid) - cpu_before
    return {
        "one_stream_responses_per_s": one.responses / one.final_s,
        "one_stream_first_ms": one.first_s * 1e3,
        "ttfr_p50_ms": statistics.median(firsts) * 1e3,
        "ttfr_p99_ms": firsts[min(len(firsts) - 1, int(len(firsts) * 0.99))] * 1e3,
        "concurrent_responses_per_s": concurrent,
        "server_cpu_us_per_response_one_stream": cpu_one / one.responses * 1e6,
        "server_cpu_us_per_response_concurrent": cpu_concurrent / args.responses * 1e6,
    }


def targets(stack: ExitStack, args: argparse.Namespace) -> Iterator[tuple[str, str, str, int]]:
    """(label, kind, url, server pid) for each target, servers started as needed."""
    from shmserve.tests.serverproc import ServerProcess

    work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-stream-")))
    socket_path = work / "shmserve.sock"
    server = ServerProcess(REPOSITORY, "--local-socket", str(socket_path),
                           log_path=work / "server.log")
    stack.callback(server.stop)
    server.wait_ready()
    yield "shmserve grpc", "grpc", server.url, server.pid
    yield "shmserve local", "local", f"local://{socket_path}", server.pid
    server.stop()
    if args.no_triton or not triton_peer.available():
        print("  (Triton skipped: not installed here)" if not args.no_triton else "")
        return
    triton = stack.enter_context(triton_peer.TritonPeer(
        REPOSITORY, grpc_port=args.triton_grpc_port, http_port=args.triton_http_port))
    yield "triton grpc", "grpc", triton.grpc_url, triton.pid


def report(results: dict[str, dict[str, Any]]) -> str:
    rows = ["| target | 1 stream resp/s | TTFR p50 ms | TTFR p99 ms | "
            f"{results_streams(results)} streams resp/s | server CPU µs/resp (1 stream) |",
            "|---|---|---|---|---|---|"]
    for label, point in results.items():
        if label.startswith("_"):
            continue
        rows.append(f"| {label} | {point['one_stream_responses_per_s']:,.0f} | "
                    f"{point['ttfr_p50_ms']:.2f} | {point['ttfr_p99_ms']:.2f} | "
                    f"{point['concurrent_responses_per_s']:,.0f} | "
                    f"{point['server_cpu_us_per_response_one_stream']:.0f} |")
    triton = results.get("triton grpc")
    if triton:
        rows.append("")
        for label in ("shmserve grpc", "shmserve local"):
            point = results[label]
            ratios = [point[key] / triton[key] for key in (
                "one_stream_responses_per_s", "concurrent_responses_per_s", "ttfr_p50_ms")]
            rows.append(f"- {label} / triton grpc: one stream {ratios[0]:.2f}x, concurrent "
                        f"{ratios[1]:.2f}x, TTFR p50 {ratios[2]:.2f}x (lower is better)")
    return "\n".join(rows)


def results_streams(results: dict[str, Any]) -> int:
    return int(results.get("_meta", {}).get("streams", 8))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small counts, a smoke run")
    parser.add_argument("--responses", type=int, default=10_000)
    parser.add_argument("--ttfr-requests", type=int, default=300)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--no-triton", action="store_true")
    parser.add_argument("--triton-grpc-port", type=int, default=18001)
    parser.add_argument("--triton-http-port", type=int, default=18000)
    parser.add_argument("--out", type=Path, default=None, help="write JSON + markdown here")
    args = parser.parse_args(argv)
    if args.quick:
        args.responses, args.ttfr_requests = 400, 30
    results: dict[str, Any] = {"_meta": {"streams": args.streams, "responses": args.responses,
                                         "ttfr_requests": args.ttfr_requests,
                                         "date": time.strftime("%Y-%m-%d %H:%M")}}
    with ExitStack() as stack:
        for label, kind, url, pid in targets(stack, args):
            results[label] = measure(kind, url, pid, args)
            print(f"  {label:<15} {json.dumps(results[label])}", flush=True)
    text = report(results)
    print(text)
    save_dated(args.out, "streaming", results, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
