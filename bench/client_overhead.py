"""Per-request cost of shmserve.client.Client.infer vs tritonclient.grpc, same server, same run.

Cases: the `simple` model (2 x INT32[1,16] in, 2 out) and `identity_fp32` with a 16 MiB FP32
tensor, each with tensors sent as gRPC bytes ("payload") and through system shared memory
("shm": inputs already in a registered region, outputs written into one). Both clients do the
same work per request: build the request, infer, and hand back NumPy outputs. Runs are
interleaved in rounds so that drift hits both clients alike.

Reports end-to-end latency p50/p99 (µs) and the client process's CPU time per request (all its
threads, gRPC's included), which is the client's own overhead; ratio = shmserve / tritonclient.
Both clients call with the same 60 s deadline (Client's default; tritonclient's is none).

    python bench/client_overhead.py                 # starts its own server
    python bench/client_overhead.py --url HOST:PORT # against a running one (example models)
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shmserve.client import Client

MIB16 = 16 * 1024 * 1024 // 4  # FP32 elements in 16 MiB
DEADLINE = 60.0


@dataclass
class Sample:
    latencies_ns: list[int]
    cpu_ns: int

    def add(self, other: Sample) -> None:
        self.latencies_ns.extend(other.latencies_ns)
        self.cpu_ns += other.cpu_ns

    def pct(self, q: float) -> float:
        ordered = sorted(self.latencies_ns)
        index = min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))
        return ordered[index] / 1000

    @property
    def cpu_us(self) -> float:
        return self.cpu_ns / len(self.latencies_ns) / 1000


def run(fn: Callable[[], object], count: int) -> Sample:
    latencies: list[int] = []
    cpu0 = time.process_time_ns()
    for _ in range(count):
        t0 = time.perf_counter_ns()
        fn()
        latencies.append(time.perf_counter_ns() - t0)
    return Sample(latencies, time.process_time_ns() - cpu0)


@contextlib.contextmanager
def server(url: str | None) -> Iterator[str]:
    if url:
        yield url
        return
    from shmserve.tests.serverproc import ServerProcess, build_repository
    with tempfile.TemporaryDirectory() as tmp:
        repo = build_repository(Path(tmp) / "repo", ["simple", "identity_fp32"])
        proc = ServerProcess(repo)
        try:
            proc.wait_ready()
            yield proc.url
        finally:
            proc.stop()


class TritonShm:
    """tritonclient's six-step shared-memory flow, set up once."""

    def __init__(self, client: object, name: str, byte_size: int) -> None:
        import tritonclient.utils.shared_memory as shm
        self.shm = shm
        self.client = client
        self.name = name
        self.key = f"/shmserve_bench_tc_{name}"
        self.handle = shm.create_shared_memory_region(name, self.key, byte_size)
        client.register_system_shared_memory(name, self.key, byte_size)  # type: ignore[attr-defined]

    def close(self) -> None:
        self.client.unregister_system_shared_memory(self.name)  # type: ignore[attr-defined]
        self.shm.destroy_shared_memory_region(self.handle)


def cases(url: str, stack: contextlib.ExitStack
          ) -> list[tuple[str, int, Callable[[], object], Callable[[], object]]]:
    import tritonclient.grpc as tc
    import tritonclient.utils.shared_memory as tshm

    ours = stack.enter_context(Client(url, timeout=DEADLINE))
    theirs = tc.InferenceServerClient(url)
    stack.callback(theirs.close)

    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    b = np.ones((1, 16), dtype=np.int32)
    big = np.random.default_rng(0).random(MIB16, dtype=np.float32)

    # --- payload -------------------------------------------------------------------------------
    def ours_simple() -> object:
        return ours.infer("simple", {"INPUT0": a, "INPUT1": b})

    def theirs_simple() -> object:
        i0 = tc.InferInput("INPUT0", [1, 16], "INT32")
        i0.set_data_from_numpy(a)
        i1 = tc.InferInput("INPUT1", [1, 16], "INT32")
        i1.set_data_from_numpy(b)
        result = theirs.infer("simple", [i0, i1], client_timeout=DEADLINE)
        return result.as_numpy("OUTPUT0"), result.as_numpy("OUTPUT1")

    def ours_big() -> object:
        return ours.infer("identity_fp32", {"INPUT0": big})

    def theirs_big() -> object:
        i0 = tc.InferInput("INPUT0", [MIB16], "FP32")
        i0.set_data_from_numpy(big)
        return theirs.infer("identity_fp32", [i0], client_timeout=DEADLINE).as_numpy("OUTPUT0")

    # --- shared memory: ours ------------------------------------------------------------------
    region = stack.enter_context(ours.shared_memory(4 * MIB16 * 2 + 4096))
    sa, sb = region.copy(a), region.copy(b)
    so0, so1 = region.ndarray((1, 16), np.int32), region.ndarray((1, 16), np.int32)
    sbig = region.copy(big)
    sbig_out = region.ndarray(MIB16, np.float32)

    def ours_simple_shm() -> object:
        return ours.infer("simple", {"INPUT0": sa, "INPUT1": sb},
                          outputs={"OUTPUT0": so0, "OUTPUT1": so1})

    def ours_big_shm() -> object:
        return ours.infer("identity_fp32", {"INPUT0": sbig}, outputs={"OUTPUT0": sbig_out})

    # --- shared memory: tritonclient ----------------------------------------------------------
    small_in = TritonShm(theirs, "small_in", 128)
    stack.callback(small_in.close)
    small_out = TritonShm(theirs, "small_out", 128)
    stack.callback(small_out.close)
    tshm.set_shared_memory_region(small_in.handle, [a, b])
    big_in = TritonShm(theirs, "big_in", big.nbytes)
    stack.callback(big_in.close)
    big_out = TritonShm(theirs, "big_out", big.nbytes)
    stack.callback(big_out.close)
    tshm.set_shared_memory_region(big_in.handle, [big])

    def theirs_simple_shm() -> object:
        i0 = tc.InferInput("INPUT0", [1, 16], "INT32")
        i0.set_shared_memory("small_in", 64)
        i1 = tc.InferInput("INPUT1", [1, 16], "INT32")
        i1.set_shared_memory("small_in", 64, offset=64)
        o0 = tc.InferRequestedOutput("OUTPUT0")
        o0.set_shared_memory("small_out", 64)
        o1 = tc.InferRequestedOutput("OUTPUT1")
        o1.set_shared_memory("small_out", 64, offset=64)
        theirs.infer("simple", [i0, i1], outputs=[o0, o1], client_timeout=DEADLINE)
        return (tshm.get_contents_as_numpy(small_out.handle, np.int32, [1, 16]),
                tshm.get_contents_as_numpy(small_out.handle, np.int32, [1, 16], offset=64))

    def theirs_big_shm() -> object:
        i0 = tc.InferInput("INPUT0", [MIB16], "FP32")
        i0.set_shared_memory("big_in", big.nbytes)
        o0 = tc.InferRequestedOutput("OUTPUT0")
        o0.set_shared_memory("big_out", big.nbytes)
        theirs.infer("identity_fp32", [i0], outputs=[o0], client_timeout=DEADLINE)
        return tshm.get_contents_as_numpy(big_out.handle, np.float32, [MIB16])

    # Same answers from both before timing anything.
    np.testing.assert_array_equal(ours_simple()["OUTPUT0"], theirs_simple()[0])  # type: ignore[index]
    np.testing.assert_array_equal(ours_simple_shm()["OUTPUT1"], theirs_simple_shm()[1])  # type: ignore[index]
    np.testing.assert_array_equal(ours_big()["OUTPUT0"], big)  # type: ignore[index]
    np.testing.assert_array_equal(theirs_big_shm(), big)
    np.testing.assert_array_equal(ours_big_shm()["OUTPUT0"], big)  # type: ignore[index]

    return [
        ("simple, payload", 2000, ours_simple, theirs_simple),
        ("simple, shm", 2000, ours_simple_shm, theirs_simple_shm),
        ("16 MiB FP32, payload", 60, ours_big, theirs_big),
        ("16 MiB FP32, shm", 1000, ours_big_shm, theirs_big_shm),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a running server with the example models")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply iteration counts")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per case")
    args = parser.parse_args(argv)
    rows: list[tuple[str, Sample, Sample]] = []
    with server(args.url) as url, contextlib.ExitStack() as stack:
        for name, count, ours_fn, theirs_fn in cases(url, stack):
            count = max(args.rounds, int(count * args.scale))
            per_round = max(1, count // args.rounds)
            run(ours_fn, max(5, per_round // 10))        # warm-up
            run(theirs_fn, max(5, per_round // 10))
            ours, theirs = Sample([], 0), Sample([], 0)
            for _ in range(args.rounds):
                ours.add(run(ours_fn, per_round))
                theirs.add(run(theirs_fn, per_round))
            rows.append((name, ours, theirs))
    header = (f"| {'case':<22} | {'client':<17} | {'p50 µs':>9} | {'p99 µs':>9} | "
              f"{'CPU µs/req':>10} | {'p50 ratio':>9} | {'CPU ratio':>9} |")
    print(header)
    print("|" + "|".join("-" * (len(cell)) for cell in header.split("|")[1:-1]) + "|")
    for name, ours, theirs in rows:
        p50_ratio = ours.pct(50) / theirs.pct(50)
        cpu_ratio = ours.cpu_us / theirs.cpu_us
        print(f"| {name:<22} | {'shmserve.client':<17} | {ours.pct(50):>9.0f} | "
              f"{ours.pct(99):>9.0f} | {ours.cpu_us:>10.0f} | {p50_ratio:>9.2f} | "
              f"{cpu_ratio:>9.2f} |")
        print(f"| {'':<22} | {'tritonclient.grpc':<17} | {theirs.pct(50):>9.0f} | "
              f"{theirs.pct(99):>9.0f} | {theirs.cpu_us:>10.0f} | {'':>9} | {'':>9} |")
    print(f"\n{len(rows[0][1].latencies_ns)} requests per client for simple; python "
          f"{sys.version.split()[0]}, numpy {np.__version__}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
