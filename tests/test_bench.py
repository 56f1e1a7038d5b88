"""`python -m bench --quick` runs every scenario end to end and every answer is correct.

This is a correctness check of the benchmark and of the serving paths it drives, never a timed
assertion: the figures it prints are not looked at.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
SIZES = ["4B", "1MiB", "16MiB", "64MiB"]
SCENARIOS = (
    [f"simple/c{c}" for c in (1, 4, 8, 32)]
    + [f"identity/{transport}/{size}"
       for transport in ("payload", "system_shm", "cuda_shm", "cuda_shm_gpu") for size in SIZES]
    + [f"batching/{mode}/c{c}" for c in (8, 32) for mode in ("off", "on")]
    + [f"scaling/instances{n}" for n in (1, 2, 4)]
)


def _can_use_cuda() -> bool:
    """A GPU and cuda-python: only then must the CUDA shared-memory scenarios run."""
    gpus = "/proc/driver/nvidia/gpus"
    if not (os.path.isdir(gpus) and os.listdir(gpus)):
        return False
    return importlib.util.find_spec("cuda") is not None


def _bench_segments() -> set[str]:
    return {name for name in os.listdir("/dev/shm") if name.startswith("shmserve_bench_")}


@pytest.mark.slow
@pytest.mark.timeout(420)
@pytest.mark.skipif(not (BENCH / "run.py").is_file(), reason="bench/ is not in this checkout")
def test_quick_bench_runs_every_scenario_correctly(tmp_path: Path) -> None:
    before = _bench_segments()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("PERF_ANALYZER", None)  # the test checks our own generator
    done = subprocess.run([sys.executable, "-m", "bench", "--quick", "--out", str(tmp_path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=400,
                          check=False)
    output = done.stdout[-6000:] + "\n--- stderr ---\n" + done.stderr[-6000:]
    assert done.returncode == 0, output

    results = list(tmp_path.glob("*.json"))
    assert len(results) == 1, (results, output)
    document = json.loads(results[0].read_text())
    by_id = {entry["id"]: entry for entry in document["scenarios"]}
    assert sorted(by_id) == sorted(SCENARIOS), output
    for scenario_id, entry in by_id.items():
        if entry["status"] == "skipped":
            # Only CUDA shared memory may be skipped, and only without a GPU or cuda-python.
            assert scenario_id.startswith(("identity/cuda_shm/", "identity/cuda_shm_gpu/")) \
                and not _can_use_cuda(), entry
            continue
        assert entry["status"] == "ok", entry
        assert entry["correct"] is True, entry
        assert entry["result"]["count"] > 0, entry
        assert entry["result"]["errors"] == 0 and entry["result"]["mismatches"] == 0, entry

    ceilings = document["ceilings"]
    assert set(ceilings["memcpy"]) == set(SIZES)
    assert all(point["p50_ms"] > 0 for point in ceilings["memcpy"].values())
    assert ceilings["echo"] and all(point["status"] == "ok"
                                    for point in ceilings["echo"].values()), ceilings["echo"]
    assert (tmp_path / results[0].with_suffix(".md").name).is_file()
    assert _bench_segments() <= before, "the bench left shared memory segments behind"


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.skipif(not (BENCH / "cache.py").is_file(), reason="bench/ is not in this checkout")
def test_quick_cache_bench_answers_every_row(tmp_path: Path) -> None:
    """bench.cache checks each hit against its miss and that hits into a region (over gRPC and
    through the local channel) landed there; a wrong answer raises and fails the run."""
    out = tmp_path / "cache.json"
    done = subprocess.run([sys.executable, "-m", "bench.cache", "--quick", "--no-triton",
                           "--json", str(out)], cwd=REPO, capture_output=True, text=True,
                          timeout=220, check=False)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    rows = json.loads(out.read_text())["rows"]
    cases = {(row["case"], row["size"]) for row in rows if row["server"] == "shmserve"}
    assert {("miss", "4B"), ("hit", "4B"), ("miss", "16MiB"), ("hit", "16MiB"),
            ("hit into system shm", "16MiB"), ("hit into shm, local://", "16MiB")} <= cases
    # Every timed hit into a region was a cache hit on the server (its statistics counted it).
    server_side = [row["p50_ms"] for row in rows if row["case"].strip().startswith("server side")]
    assert len(server_side) == 2 and all(ms > 0 for ms in server_side), rows
