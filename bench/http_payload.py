"""Large payloads over HTTP or gRPC: shmserve against Triton 2.51, same model, same run.

``python -m bench.http_payload [--quick] [--protocol grpc]`` serves bench/models'
``identity_fp32`` (python backend) on shmserve and on Triton (bench/triton_peer.py) and times
tritonclient.http infer calls with the binary tensor data extension for the input and the
output (or tritonclient.grpc calls with the tensors in the message: ``--protocol grpc``;
16 MiB and 64 MiB by default), interleaving the two servers round by round so drift on the
host hits both alike. Reports p50/p99 per size and server, the ratio shmserve/Triton, and one
memcpy of the same size for scale.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np

from bench import triton_peer
from bench.ceilings import memcpy
from bench.report import save_dated

REPOSITORY = Path(__file__).resolve().parent / "models"
MODEL = "identity_fp32"


def _call(client: Any, data: np.ndarray) -> None:
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    if isinstance(client, grpcclient.InferenceServerClient):
        tensor = grpcclient.InferInput("INPUT0", [data.size], "FP32")
        tensor.set_data_from_numpy(data)
        answer = client.infer(MODEL, [tensor], client_timeout=600.0).as_numpy("OUTPUT0")
    else:
        tensor = httpclient.InferInput("INPUT0", [data.size], "FP32")
        tensor.set_data_from_numpy(data, binary_data=True)
        output = httpclient.InferRequestedOutput("OUTPUT0", binary_data=True)
        answer = client.infer(MODEL, [tensor], outputs=[output]).as_numpy("OUTPUT0")
    if answer is None or answer.nbytes != data.nbytes:
        raise RuntimeError("wrong answer size")


def _client(url: str, protocol: str) -> Any:
    if protocol == "grpc":
        import tritonclient.grpc as grpcclient
        return grpcclient.InferenceServerClient(url)
    import tritonclient.http as httpclient
    return httpclient.InferenceServerClient(url, network_timeout=600.0,
                                            connection_timeout=600.0)


def measure(urls: dict[str, str], sizes: list[int], rounds: int, per_round: int,
            protocol: str = "http") -> dict[str, Any]:
    clients = {label: _client(url, protocol) for label, url in urls.items()}
    results: dict[str, Any] = {}
    for nbytes in sizes:
        data = np.random.default_rng(nbytes).random(nbytes // 4, dtype=np.float32)
        times: dict[str, list[float]] = {label: [] for label in urls}
        for client in clients.values():
            _call(client, data)  # warm-up
        for _ in range(rounds):
            for label, client in clients.items():
                for _ in range(per_round):
                    started = time.perf_counter()
                    _call(client, data)
                    times[label].append(time.perf_counter() - started)
        row: dict[str, Any] = {"memcpy_ms": memcpy(nbytes)["p50_ms"]}
        for label, values in times.items():
            values.sort()
            row[label] = {"p50_ms": statistics.median(values) * 1e3,
                          "p99_ms": values[min(len(values) - 1, int(len(values) * 0.99))] * 1e3,
                          "count": len(values)}
        results[f"{nbytes >> 20} MiB"] = row
        print(f"  {nbytes >> 20} MiB: {json.dumps(row)}", flush=True)
    for client in clients.values():
        client.close()
    return results


def report(results: dict[str, Any], labels: list[str]) -> str:
    rows = ["| size | " + " | ".join(f"{label} p50 ms (p99)" for label in labels)
            + (" | shmserve / triton p50" if "triton" in labels else "") + " | memcpy ms |",
            "|---" * (len(labels) + 2 + ("triton" in labels)) + "|"]
    for size, row in results.items():
        cells = [f"{row[label]['p50_ms']:.1f} ({row[label]['p99_ms']:.1f})" for label in labels]
        if "triton" in labels:
            cells.append(f"{row['shmserve']['p50_ms'] / row['triton']['p50_ms']:.2f}")
        rows.append(f"| {size} | " + " | ".join(cells) + f" | {row['memcpy_ms']:.2f} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--protocol", choices=("http", "grpc"), default="http")
    parser.add_argument("--sizes-mib", default="16,64")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--per-round", type=int, default=4)
    parser.add_argument("--no-triton", action="store_true")
    parser.add_argument("--triton-grpc-port", type=int, default=18001)
    parser.add_argument("--triton-http-port", type=int, default=18000)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.per_round = 2, 2
    sizes = [int(value) << 20 for value in args.sizes_mib.split(",")]
    from shmserve.tests.serverproc import ServerProcess

    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-http-")))
        server = ServerProcess(REPOSITORY, log_path=work / "server.log")
        stack.callback(server.stop)
        server.wait_ready()
        grpc = args.protocol == "grpc"
        urls = {"shmserve": server.url if grpc else server.http_url}
        if not args.no_triton and triton_peer.available():
            triton = stack.enter_context(triton_peer.TritonPeer(
                REPOSITORY, grpc_port=args.triton_grpc_port, http_port=args.triton_http_port))
            urls["triton"] = triton.grpc_url if grpc else triton.http_url
        results = measure(urls, sizes, args.rounds, args.per_round, args.protocol)
    text = report(results, list(urls))
    print(text)
    save_dated(args.out, f"{args.protocol}-payload", results, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
