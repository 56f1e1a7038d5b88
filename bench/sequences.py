"""Sequence throughput: 16 concurrent sequences of 100 steps on one python-backend accumulator
(bench/models_sequence: sequence_batching ``direct`` and ``oldest``, START/END/READY/CORRID
controls, the model keeping its sums by CORRID), served by shmserve and by Triton 2.51 in the
same run, driven by the same client (tritonclient.grpc.aio, one coroutine per sequence, each
step awaiting the previous one's answer). shmserve is also driven through its own client over
the local channel (``Client.sequence``). Every answer is checked (the running sums).

Reports steps/s (all sequences together), per-step latency p50/p99 (ms), and the ratio
shmserve / Triton of steps/s for the same client. Rounds alternate the servers so drift hits
both alike; the median round is reported.

    python -m bench.sequences            # 3 rounds of 16 x 100 steps
    python -m bench.sequences --quick    # 1 round of 16 x 20 steps (a smoke run)
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tritonclient.grpc.aio as grpc_aio
from tritonclient.grpc import InferInput

from bench import triton_peer
from shmserve.client import AsyncClient

MODELS = Path(__file__).resolve().parent / "models_sequence"
STRATEGIES = ("seq_direct", "seq_oldest")
TRITON_GRPC_PORT = 18201
TRITON_HTTP_PORT = 18200
SEQUENCES = 16

# One step of one sequence: (model, sequence id, value, start, end) -> the running sum.
Step = Callable[[str, int, int, bool, bool], Awaitable[int]]


@dataclass
class Round:
    steps_per_s: float
    latencies_ms: list[float]

    def pct(self, q: float) -> float:
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


async def run_round(step: Step, model: str, steps: int, first_id: int) -> Round:
    latencies: list[float] = []

    async def sequence(sequence_id: int) -> None:
        total = 0
        for index in range(steps):
            value = sequence_id % 1000 + index
            total += value
            began = time.perf_counter()
            got = await step(model, sequence_id, value, index == 0, index == steps - 1)
            latencies.append((time.perf_counter() - began) * 1000)
            if got != total:
                raise AssertionError(f"sequence {sequence_id} step {index}: sum {got}, "
                                     f"expected {total}")

    began = time.perf_counter()
    await asyncio.gather(*(sequence(first_id + i) for i in range(SEQUENCES)))
    return Round(SEQUENCES * steps / (time.perf_counter() - began), latencies)


def tritonclient_step(client: grpc_aio.InferenceServerClient) -> Step:
    async def step(model: str, sequence_id: int, value: int, start: bool, end: bool) -> int:
        tensor = InferInput("INPUT", [1, 1], "INT32")
        tensor.set_data_from_numpy(np.array([[value]], np.int32))
        result = await client.infer(model, [tensor], sequence_id=sequence_id,
                                    sequence_start=start, sequence_end=end)
        return int(result.as_numpy("OUTPUT")[0, 0])
    return step


def shmserve_step(client: AsyncClient) -> Step:
    async def step(model: str, sequence_id: int, value: int, start: bool, end: bool) -> int:
        parameters: dict[str, int | bool] = {"sequence_id": sequence_id}
        if start:
            parameters["sequence_start"] = True
        if end:
            parameters["sequence_end"] = True
        outputs = await client.infer(model, {"INPUT": np.array([[value]], np.int32)},
                                     parameters=parameters)
        return int(outputs["OUTPUT"][0, 0])
    return step


async def measure(shmserve_url: str, local_url: str, triton_url: str | None, rounds: int,
                  steps: int) -> dict[str, dict[str, list[Round]]]:
    results: dict[str, dict[str, list[Round]]] = {model: {} for model in STRATEGIES}
    ours = grpc_aio.InferenceServerClient(shmserve_url)
    theirs = grpc_aio.InferenceServerClient(triton_url) if triton_url else None
    local = AsyncClient(local_url)
    targets: list[tuple[str, Step]] = [("shmserve tritonclient", tritonclient_step(ours)),
                                       ("shmserve local channel", shmserve_step(local))]
    if theirs is not None:
        targets.insert(0, ("triton tritonclient", tritonclient_step(theirs)))
    next_id = 1
    try:
        for model in STRATEGIES:
            for _, step in targets:  # warm-up: worker start, client channels
                await run_round(step, model, 3, next_id)
                next_id += SEQUENCES
            for _ in range(rounds):
                for target, step in targets:
                    results[model].setdefault(target, []).append(
                        await run_round(step, model, steps, next_id))
                    next_id += SEQUENCES
    finally:
        await ours.close()
        if theirs is not None:
            await theirs.close()
        await local.close()
    return results


def report(results: dict[str, dict[str, list[Round]]], steps: int) -> None:
    print(f"{SEQUENCES} concurrent sequences x {steps} steps, python-backend accumulator")
    print(f"{'model':<11} {'server / client':<24} {'steps/s':>9} {'p50 ms':>8} {'p99 ms':>8}"
          f" {'vs triton':>9}")
    for model, targets in results.items():
        reference = None
        if "triton tritonclient" in targets:
            reference = statistics.median(r.steps_per_s for r in targets["triton tritonclient"])
        for target, rounds in targets.items():
            chosen = sorted(rounds, key=lambda r: r.steps_per_s)[len(rounds) // 2]
            ratio = f"{chosen.steps_per_s / reference:.2f}x" if reference else "-"
            print(f"{model:<11} {target:<24} {chosen.steps_per_s:>9.0f} {chosen.pct(50):>8.2f} "
                  f"{chosen.pct(99):>8.2f} {ratio:>9}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 round of 20 steps")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--no-triton", action="store_true", help="shmserve only")
    args = parser.parse_args(argv)
    rounds, steps = (1, 20) if args.quick else (args.rounds, args.steps)

    from shmserve.tests.serverproc import ServerProcess

    with tempfile.TemporaryDirectory(prefix="seqbench", dir="/tmp") as work:
        socket_path = Path(work) / "s.sock"
        server = ServerProcess(MODELS, "--local-socket", str(socket_path),
                               log_path=Path(work) / "server.log")
        try:
            server.wait_ready()
            if args.no_triton or not triton_peer.available():
                if not args.no_triton:
                    print("Triton peer not installed: shmserve only", file=sys.stderr)
                results = asyncio.run(measure(server.url, f"local://{socket_path}", None,
                                              rounds, steps))
            else:
                with triton_peer.TritonPeer(MODELS, grpc_port=TRITON_GRPC_PORT,
                                            http_port=TRITON_HTTP_PORT) as triton:
                    results = asyncio.run(measure(server.url, f"local://{socket_path}",
                                                  triton.grpc_url, rounds, steps))
        finally:
            server.stop()
    report(results, steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
