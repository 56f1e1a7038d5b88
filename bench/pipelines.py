"""Pipelines: ensembles and BLS on shmserve against Triton 2.51, same python models, same run.

``python -m bench.pipelines [--quick]`` serves bench/models_pipelines (an FP32 python
``identity``; ``ensemble_1`` / ``ensemble_3``: one or three identity steps in a row; ``bls_1`` /
``bls_3``: a python model calling identity once or three times through BLS) on shmserve and on
Triton (bench/triton_peer.py) and measures, with tritonclient.grpc for both servers:

- p50/p99 latency of sequential small requests (16 floats) on each model, and from them the
  latency each extra ensemble step adds, ``(ensemble_3 - identity) / 2``, and each BLS call
  adds, ``bls_1 - identity`` (the BLS model's own execution included) and
  ``(bls_3 - bls_1) / 2`` (one more call);
- a 16 MiB tensor through ``ensemble_3`` against ``identity``, both with tensors in system
  shared memory (registered regions) and as gRPC payload.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np

from bench import triton_peer
from bench.report import save_dated

REPOSITORY = Path(__file__).resolve().parent / "models_pipelines"
SMALL_MODELS = ("identity", "ensemble_1", "ensemble_3", "bls_1", "bls_3")
LARGE_MODELS = ("identity", "ensemble_3")
LARGE_BYTES = 16 << 20


def _latencies(call: Any, count: int) -> list[float]:
    for _ in range(max(3, count // 10)):
        call()
    times = []
    for _ in range(count):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return sorted(times)


def _summary(times: list[float]) -> dict[str, float]:
    return {"p50_ms": statistics.median(times) * 1e3,
            "p99_ms": times[min(len(times) - 1, int(len(times) * 0.99))] * 1e3,
            "count": len(times)}


def small_requests(url: str, count: int) -> dict[str, dict[str, float]]:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    data = np.arange(16, dtype=np.float32)
    tensor = grpcclient.InferInput("INPUT0", [16], "FP32")
    tensor.set_data_from_numpy(data)
    results = {}
    for model in SMALL_MODELS:
        answer = client.infer(model, [tensor]).as_numpy("OUTPUT0")
        if not np.array_equal(answer, data):
            raise RuntimeError(f"{model}: wrong answer")
        results[model] = _summary(_latencies(lambda m=model: client.infer(m, [tensor]), count))
    client.close()
    return results


def large_requests(url: str, count: int) -> dict[str, dict[str, float]]:
    import tritonclient.grpc as grpcclient
    import tritonclient.utils.shared_memory as shm

    client = grpcclient.InferenceServerClient(url)
    elements = LARGE_BYTES // 4
    data = np.random.default_rng(1).random(elements, dtype=np.float32)
    results: dict[str, dict[str, float]] = {}
    tag = uuid.uuid4().hex[:8]
    regions = {}
    try:
        for role in ("in", "out"):
            key = f"/bench_pipe_{tag}_{role}"
            regions[role] = (f"bench_pipe_{tag}_{role}",
                             shm.create_shared_memory_region(f"r_{role}", key, LARGE_BYTES))
            client.register_system_shared_memory(regions[role][0], key, LARGE_BYTES)
        shm.set_shared_memory_region(regions["in"][1], [data])
        for model in LARGE_MODELS:
            tensor = grpcclient.InferInput("INPUT0", [elements], "FP32")
            tensor.set_shared_memory(regions["in"][0], LARGE_BYTES)
            output = grpcclient.InferRequestedOutput("OUTPUT0")
            output.set_shared_memory(regions["out"][0], LARGE_BYTES)

            def by_shm(m: str = model, t: Any = tensor, o: Any = output) -> None:
                client.infer(m, [t], outputs=[o])
            by_shm()
            got = shm.get_contents_as_numpy(regions["out"][1], np.float32, [elements])
            if not np.array_equal(got, data):
                raise RuntimeError(f"{model}: wrong answer through shm")
            results[f"{model} shm"] = _summary(_latencies(by_shm, count))

            payload = grpcclient.InferInput("INPUT0", [elements], "FP32")
            payload.set_data_from_numpy(data)

            def by_payload(m: str = model, t: Any = payload) -> None:
                client.infer(m, [t])
            results[f"{model} payload"] = _summary(_latencies(by_payload, count))
    finally:
        for name, handle in regions.values():
            try:
                client.unregister_system_shared_memory(name)
            finally:
                shm.destroy_shared_memory_region(handle)
        client.close()
    return results


def derived(point: dict[str, dict[str, float]]) -> dict[str, float]:
    p50 = {name: value["p50_ms"] for name, value in point.items()}
    return {
        "ensemble_step_added_ms": (p50["ensemble_3"] - p50["identity"]) / 2,
        "bls_first_call_added_ms": p50["bls_1"] - p50["identity"],
        "bls_extra_call_ms": (p50["bls_3"] - p50["bls_1"]) / 2,
        "large_ensemble3_over_identity_shm": p50["ensemble_3 shm"] / p50["identity shm"],
        "large_ensemble3_over_identity_payload":
            p50["ensemble_3 payload"] / p50["identity payload"],
    }


def targets(stack: ExitStack, args: argparse.Namespace) -> Iterator[tuple[str, str]]:
    from shmserve.tests.serverproc import ServerProcess

    work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-pipe-")))
    server = ServerProcess(REPOSITORY, log_path=work / "server.log")
    stack.callback(server.stop)
    server.wait_ready()
    yield "shmserve", server.url
    server.stop()
    if args.no_triton or not triton_peer.available():
        return
    triton = stack.enter_context(triton_peer.TritonPeer(
        REPOSITORY, grpc_port=args.triton_grpc_port, http_port=args.triton_http_port))
    yield "triton", triton.grpc_url


def report(results: dict[str, Any]) -> str:
    labels = [label for label in results if not label.startswith("_")]
    names = list(results[labels[0]]["points"])
    rows = ["| p50 ms (p99) | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
    for name in names:
        cells = [f"{results[label]['points'][name]['p50_ms']:.3f} "
                 f"({results[label]['points'][name]['p99_ms']:.3f})" for label in labels]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    for key in results[labels[0]]["derived"]:
        cells = [f"{results[label]['derived'][key]:.3f}" for label in labels]
        rows.append(f"| **{key}** | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--small-count", type=int, default=2000)
    parser.add_argument("--large-count", type=int, default=60)
    parser.add_argument("--no-triton", action="store_true")
    parser.add_argument("--triton-grpc-port", type=int, default=18001)
    parser.add_argument("--triton-http-port", type=int, default=18000)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.small_count, args.large_count = 100, 8
    results: dict[str, Any] = {"_meta": {"date": time.strftime("%Y-%m-%d %H:%M"),
                                         "small_count": args.small_count,
                                         "large_count": args.large_count}}
    with ExitStack() as stack:
        for label, url in targets(stack, args):
            points = small_requests(url, args.small_count)
            points.update(large_requests(url, args.large_count))
            results[label] = {"points": points, "derived": derived(points)}
            print(f"  {label}: {json.dumps(results[label]['derived'])}", flush=True)
    text = report(results)
    print(text)
    save_dated(args.out, "pipelines", results, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
