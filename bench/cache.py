"""Response cache latency: a hit against a miss, for 4 B and 16 MiB outputs, on shmserve and on
Triton 2.51 in the same run (the same python-backend model, bench/models_cache/, unmodified on
both, each server with ``--cache-config local,size=...``), and a 16 MiB hit whose output goes
into a client system shared-memory region against one memcpy of 16 MiB.

    python -m bench.cache [--quick] [--repeats N] [--no-triton] [--json PATH]

Every request is one tritonclient.grpc ``infer`` (the same client library for both servers),
except one shmserve row: the same 16 MiB hit into a system shm region sent by
``shmserve.client`` through the local channel (``local://``), shmserve's door for co-located
callers, which Triton does not have. A miss sends a SEED not seen before; a hit repeats one
already answered. Rows give p50/p90 in ms; the ratios compare hit with miss, shmserve with
Triton, and the shm hits with the memcpy.
Target (issue 20): a 16 MiB cache hit into system shm within 1.5x of one memcpy.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from bench import ceilings
from bench.shm import SystemRegion

MODEL = "cache_bytes"
MODELS = Path(__file__).resolve().parent / "models_cache"
SIZES = {"4B": 4, "16MiB": 16 << 20}
CACHE_BYTES = 128 << 20
TRITON_GRPC_PORT = 18301
TRITON_HTTP_PORT = 18300
_seeds = itertools.count(1)


def _inputs(seed: int, size: int) -> list[Any]:
    import tritonclient.grpc as grpcclient
    tensors = []
    for name, value in (("SEED", seed), ("SIZE", size)):
        tensor = grpcclient.InferInput(name, [1], "INT32")
        tensor.set_data_from_numpy(np.array([value], dtype=np.int32))
        tensors.append(tensor)
    return tensors


def _timed(call: Callable[[], Any], repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        started = time.perf_counter_ns()
        call()
        times.append((time.perf_counter_ns() - started) / 1e6)
    return times


def _row(server: str, case: str, size: str, times: list[float]) -> dict[str, Any]:
    ordered = sorted(times)
    return {"server": server, "case": case, "size": size, "n": len(times),
            "p50_ms": statistics.median(ordered),
            "p90_ms": ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]}


def measure(server: str, url: str, repeats: int) -> list[dict[str, Any]]:
    """Miss, hit (and for 16 MiB a hit into a system shm region) against one server."""
    import tritonclient.grpc as grpcclient
    rows = []
    with grpcclient.InferenceServerClient(url) as client:
        for label, size in SIZES.items():
            seed = next(_seeds)
            miss_answer = client.infer(MODEL, _inputs(seed, size)).as_numpy("OUT")
            hit_answer = client.infer(MODEL, _inputs(seed, size)).as_numpy("OUT")
            if not np.array_equal(miss_answer, hit_answer) or miss_answer[0] != seed & 0xFF:
                raise AssertionError(f"{server}: a hit answered differently from its miss")
            rows.append(_row(server, "miss", label, _timed(
                lambda size=size: client.infer(MODEL, _inputs(next(_seeds), size)), repeats)))
            rows.append(_row(server, "hit", label, _timed(
                lambda seed=seed, size=size: client.infer(MODEL, _inputs(seed, size)),
                repeats)))
            if size >= 1 << 20:
                times, server_ms = _hit_into_region(client, server, seed, size, repeats)
                rows.append(_row(server, "hit into system shm", label, times))
                # The server's own time per hit (its cache_hit statistics: lookup and the copy
                # into the region), without the gRPC round trip: mean only.
                rows.append({"server": server, "case": "  server side (mean)", "size": label,
                             "n": len(times), "p50_ms": server_ms, "p90_ms": float("nan")})
    return rows


def measure_local(local_url: str, repeats: int) -> list[dict[str, Any]]:
    """The 16 MiB hit into a system shm region through shmserve's local channel."""
    from shmserve.client import Client
    size = SIZES["16MiB"]
    seed = next(_seeds)
    inputs = {"SEED": np.array([seed], dtype=np.int32), "SIZE": np.array([size], dtype=np.int32)}
    with Client(local_url) as client, client.shared_memory(size) as region:
        target = region.ndarray((size,), np.uint8)
        target[:] = 0  # pages in place: the copy is measured, not the page faults
        client.infer(MODEL, inputs, outputs={"OUT": target})  # the miss that fills the cache
        client.infer(MODEL, inputs, outputs={"OUT": target})
        if target[0] != (seed & 0xFF) or target[-1] != (seed & 0xFF):
            raise AssertionError("shmserve local://: the hit was not written into the region")

        def hit_ns() -> tuple[int, int]:
            hit = client.model_statistics(MODEL)[0].inference_stats.cache_hit
            return hit.count, hit.ns

        before = hit_ns()
        times = _timed(lambda: client.infer(MODEL, inputs, outputs={"OUT": target}), repeats)
        after = hit_ns()
    server_ms = (after[1] - before[1]) / max(1, after[0] - before[0]) / 1e6
    return [_row("shmserve", "hit into shm, local://", "16MiB", times),
            {"server": "shmserve", "case": "  server side (mean)*", "size": "16MiB",
             "n": len(times), "p50_ms": server_ms, "p90_ms": float("nan")}]


def _cache_hit_ns(client: Any) -> tuple[int, int]:
    stats = client.get_inference_statistics(MODEL).model_stats[0].inference_stats.cache_hit
    return stats.count, stats.ns


def _hit_into_region(client: Any, server: str, seed: int, size: int,
                     repeats: int) -> tuple[list[float], float]:
    """Client-side times of hits into a region, and the server's mean time per hit (ms)."""
    import tritonclient.grpc as grpcclient
    name = f"bench_cache_{server}_{os.getpid()}"
    with SystemRegion(f"cache_{server}", size) as region:
        client.register_system_shared_memory(name, region.key, size)
        try:
            target = region.array(np.uint8, size)
            target[:] = 0  # pages in place: the copy is measured, not the page faults
            requested = grpcclient.InferRequestedOutput("OUT")
            requested.set_shared_memory(name, size)
            client.infer(MODEL, _inputs(seed, size), outputs=[requested])
            if target[0] != (seed & 0xFF) or target[-1] != (seed & 0xFF):
                raise AssertionError(f"{server}: the hit was not written into the region")
            before = _cache_hit_ns(client)
            times = _timed(lambda: client.infer(MODEL, _inputs(seed, size),
                                                outputs=[requested]), repeats)
            after = _cache_hit_ns(client)
            server_ms = (after[1] - before[1]) / max(1, after[0] - before[0]) / 1e6
            del target
        finally:
            _unregister(client, name)
    return times, server_ms


def _unregister(client: Any, name: str) -> None:
    """Triton 2.51 refuses to unregister a region its cache still refers to ("it is currently
    in use") for a while after the last hit: retry, then leave it to the server's exit."""
    from tritonclient.utils import InferenceServerException
    for attempt in range(20):
        try:
            client.unregister_system_shared_memory(name)
            return
        except InferenceServerException as exc:
            if "currently in use" not in str(exc) or attempt == 19:
                print(f"  (left region {name} registered: {exc})")
                return
            time.sleep(0.1)


@contextmanager
def shmserve_server(work: Path) -> Iterator[tuple[str, str]]:
    """The gRPC url and the local channel's url."""
    from shmserve.tests.serverproc import ServerProcess
    repo = work / "repo"
    shutil.copytree(MODELS, repo, ignore=shutil.ignore_patterns("__pycache__"))
    socket_path = work / "local.sock"
    server = ServerProcess(repo, "--cache-config", f"local,size={CACHE_BYTES}",
                           "--local-socket", str(socket_path), log_path=work / "shmserve.log")
    try:
        server.wait_ready()
        yield server.url, f"local://{socket_path}"
    finally:
        server.stop()


@contextmanager
def triton_server() -> Iterator[str]:
    from bench.triton_peer import TritonPeer
    with TritonPeer(MODELS, grpc_port=TRITON_GRPC_PORT, http_port=TRITON_HTTP_PORT,
                    extra_args=(f"--cache-config=local,size={CACHE_BYTES}",)) as peer:
        yield peer.grpc_url


def ratios(rows: list[dict[str, Any]], memcpy_ms: float) -> list[tuple[str, float]]:
    by = {(r["server"], r["case"], r["size"]): r["p50_ms"] for r in rows}
    out = []
    for server in sorted({r["server"] for r in rows}):
        for size in SIZES:
            if (server, "hit", size) in by:
                out.append((f"{server} {size}: hit / miss",
                            by[(server, "hit", size)] / by[(server, "miss", size)]))
        for case, label in (("hit into system shm", "hit into system shm"),
                            ("  server side (mean)", "server side of that hit"),
                            ("hit into shm, local://", "hit into system shm via local://"),
                            ("  server side (mean)*", "server side of the local:// hit")):
            value = by.get((server, case, "16MiB"))
            if value is not None:
                out.append((f"{server} 16MiB: {label} / one memcpy", value / memcpy_ms))
    for case, size in {(r["case"], r["size"]) for r in rows}:
        ours, theirs = by.get(("shmserve", case, size)), by.get(("triton", case, size))
        if ours is not None and theirs is not None:
            out.append((f"{case} {size}: shmserve / triton", ours / theirs))
    return sorted(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cache", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few requests per row")
    parser.add_argument("--repeats", type=int, default=0,
                        help="requests per row (default 50, quick 5)")
    parser.add_argument("--no-triton", action="store_true", help="shmserve rows only")
    parser.add_argument("--json", type=Path, help="also write the rows and ratios here")
    args = parser.parse_args(argv)
    repeats = args.repeats or (5 if args.quick else 50)
    work = Path(tempfile.mkdtemp(prefix="bench-cache-"))
    rows: list[dict[str, Any]] = []
    budget = 0.05 if args.quick else 0.5
    # Memory bandwidth on a shared host drifts within minutes: the copy is timed before and
    # after the servers, and the ratios use the mean of the two.
    memcpy_before = ceilings.memcpy(SIZES["16MiB"], budget)
    with shmserve_server(work) as (url, local_url):
        rows += measure("shmserve", url, repeats)
        rows += measure_local(local_url, repeats)
    if not args.no_triton:
        with triton_server() as url:
            rows += measure("triton", url, repeats)
    memcpy_after = ceilings.memcpy(SIZES["16MiB"], budget)
    memcpy = {"p50_ms": (memcpy_before["p50_ms"] + memcpy_after["p50_ms"]) / 2,
              "before": memcpy_before, "after": memcpy_after}
    print(f"{'server':<10} {'case':<22} {'size':>6} {'p50 ms':>9} {'p90 ms':>9} {'n':>4}")
    for row in rows:
        print(f"{row['server']:<10} {row['case']:<22} {row['size']:>6} {row['p50_ms']:>9.3f} "
              f"{row['p90_ms']:>9.3f} {row['n']:>4}")
    print(f"{'memcpy':<10} {'one copy':<22} {'16MiB':>6} {memcpy['p50_ms']:>9.3f}"
          f"   (before {memcpy_before['p50_ms']:.3f}, after {memcpy_after['p50_ms']:.3f})")
    print("  (*: the server's cache_hit time per hit of the local:// row)")
    found = ratios(rows, memcpy["p50_ms"])
    for label, value in found:
        print(f"  {label}: {value:.2f}x")
    if args.json is not None:
        args.json.write_text(json.dumps({"rows": rows, "memcpy": memcpy, "ratios": found,
                                         "quick": args.quick}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
