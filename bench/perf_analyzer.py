"""Drive NVIDIA perf_analyzer (when env PERF_ANALYZER names one) for one measurement point.

perf_analyzer is a C++ client: on a small host it leaves more CPU to the server than any
Python generator can. Its own CPU time is read from RUSAGE_CHILDREN around the run.
"""

from __future__ import annotations

import csv
import math
import os
import resource
import shlex
import subprocess
import tempfile
import time
from pathlib import Path

from bench.loadgen import LoadResult


def executable() -> str | None:
    path = os.environ.get("PERF_ANALYZER", "").strip()
    return path or None


def run_point(url: str, model: str, concurrency: int, *, shape: str | None = None,
              batch: int | None = None, shm: str = "none", output_shm_bytes: int = 0,
              duration_s: float, quick: bool, min_requests: int = 0,
              timeout_s: float = 600.0) -> LoadResult:
    """One perf_analyzer measurement. With ``min_requests`` (large tensors), count windows of
    that many requests replace time windows, which a few slow requests cannot fill."""
    binary = executable()
    if binary is None:
        raise RuntimeError("PERF_ANALYZER is not set")
    with tempfile.TemporaryDirectory(prefix="bench-pa-") as tmp:
        report = Path(tmp) / "pa.csv"
        command = [*shlex.split(binary), "-m", model, "-u", url, "-i", "grpc",
                   "--concurrency-range", f"{concurrency}:{concurrency}",
                   "--input-data", "zero", "-f", str(report),
                   "--max-trials", "3" if quick else "10",
                   "--stability-percentage", "999" if quick else "20"]
        if min_requests:
            command += ["--measurement-mode", "count_windows",
                        "--measurement-request-count", str(min_requests)]
        else:
            command += ["--measurement-interval", str(max(100, int(duration_s * 1000)))]
        if shape:
            command += ["--shape", shape]
        if batch:
            command += ["-b", str(batch)]
        if shm != "none":
            command += ["--shared-memory", shm]
            if output_shm_bytes:
                command += ["--output-shared-memory-size", str(output_shm_bytes)]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.monotonic()
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s,
                              check=False)
        wall = time.monotonic() - started
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        if done.returncode != 0 or not report.exists():
            tail = (done.stdout + done.stderr).strip().splitlines()[-5:]
            raise RuntimeError(f"perf_analyzer exited {done.returncode}: {' | '.join(tail)}")
        with report.open() as handle:
            row = next(csv.DictReader(handle))

    def ms(column: str) -> float:
        value = row.get(column, "")
        return float(value) / 1000.0 if value else math.nan

    rate = float(row["Inferences/Second"])
    return LoadResult(
        concurrency=concurrency, count=0, errors=0, first_error="", mismatches=0,
        window_s=duration_s, infer_per_s=rate, p50_ms=ms("p50 latency"),
        p90_ms=ms("p90 latency"), p99_ms=ms("p99 latency"), mean_ms=ms("Avg latency"),
        min_ms=math.nan, client_cpu_cores=cpu / wall if wall else 0.0,
        client_cpu_us_per_infer=math.nan, processes=1)
