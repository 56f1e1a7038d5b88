"""``python -m bench``: measure shmserve (or any KServe-v2 gRPC server) against the ceilings.

Starts shmserve on a copy of bench/models (unless ``--url`` names a running server), a bare
grpc.aio echo server (the Python gRPC ceiling) and a pool of load-generator processes; runs every
scenario; stops all it started; writes ``<out>/<date>-<host>[-label].json`` and ``.md`` and the
plots; prints the table. Every scenario first checks that the server's answer is right.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: bench/run.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import grpc
import numpy as np

from bench import ceilings, kserve, perf_analyzer, report
from bench.loadgen import Job, LoadGenerator, default_processes
from bench.procstat import CpuMeter
from bench.shm import CudaBuffer, SystemRegion, cuda_runtime, has_gpu, leftover_segments

BENCH_DIR = Path(__file__).resolve().parent
MODELS_DIR = BENCH_DIR / "models"
GPU_MODELS_DIR = BENCH_DIR / "models_gpu"  # served only on hosts with a GPU
RESULTS_DIR = BENCH_DIR / "results"

SIZES: dict[str, int] = {"4B": 4, "1MiB": 1 << 20, "16MiB": 16 << 20, "64MiB": 64 << 20}
CONCURRENCY = [1, 4, 8, 32]
BATCHING_CONCURRENCY = [8, 32]
SCALING_INSTANCES = [1, 2, 4]
SCALING_CONCURRENCY = 8
BURN_MS = 2.0  # CPU per request of the cpu_burn_* models (their config.pbtxt "burn_ms")
TRANSPORTS = ["payload", "system_shm", "cuda_shm", "cuda_shm_gpu"]
# transport -> model: cuda_shm crosses to a CPU instance; cuda_shm_gpu stays on GPU 0.
CUDA_MODELS = {"cuda_shm": "identity_fp32", "cuda_shm_gpu": "identity_fp32_gpu"}


def scenario_ids() -> list[str]:
    """Every scenario a run reports (skipped ones included)."""
    ids = [f"simple/c{c}" for c in CONCURRENCY]
    ids += [f"identity/{t}/{label}" for t in TRANSPORTS for label in SIZES]
    ids += [f"batching/{mode}/c{c}" for c in BATCHING_CONCURRENCY for mode in ("off", "on")]
    ids += [f"scaling/instances{n}" for n in SCALING_INSTANCES]
    return ids


class Skip(Exception):
    """The scenario cannot run here (no GPU, model not served by the target, ...)."""


# --- processes we start ----------------------------------------------------------------------
class EchoServer:
    """bench/echo_server.py as a separate process (uvloop), on a free port."""

    def __init__(self, repository: Path, log_path: Path) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = os.pathsep.join(
            [str(BENCH_DIR.parent), *filter(None, [env.get("PYTHONPATH")])])
        self._log = open(log_path, "wb")  # closed in stop()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bench.echo_server", "--port", "0",
             "--model-repository", str(repository)],
            stdout=subprocess.PIPE, stderr=self._log, env=env)
        self.url = ""

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        import selectors
        assert self.process.stdout is not None
        selector = selectors.DefaultSelector()
        selector.register(self.process.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout_s
        line = b""
        while time.monotonic() < deadline and not line.endswith(b"\n"):
            if not selector.select(max(0.0, deadline - time.monotonic())):
                break
            chunk = os.read(self.process.stdout.fileno(), 256)
            if not chunk:
                break
            line += chunk
        selector.close()
        match = re.search(rb"ECHO READY (\d+)", line)
        if not match:
            raise RuntimeError(f"echo server did not start (exit {self.process.poll()})")
        self.url = f"127.0.0.1:{int(match.group(1))}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        if self.process.stdout is not None:
            self.process.stdout.close()
        self._log.close()


def _raise_exit(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


# --- the run ---------------------------------------------------------------------------------
class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.quick: bool = args.quick
        self.workdir = workdir
        self.external = args.url is not None
        self.scenarios: list[dict[str, Any]] = []
        self.echo: dict[str, dict[str, Any]] = {}
        self.use_pa = perf_analyzer.executable() is not None
        self.warmup_s: float = args.warmup if args.warmup is not None else (
            0.1 if self.quick else 1.0)
        self.duration_s: float = args.duration if args.duration is not None else (
            0.25 if self.quick else 5.0)
        self.target_url = ""
        self.target: kserve.Rpc | None = None
        self.echo_rpc: kserve.Rpc | None = None
        self.generator: LoadGenerator | None = None
        self.target_meter = CpuMeter(args.server_pid)
        self.echo_meter = CpuMeter(None)
        self.ceilings: dict[str, Any] | None = None

    # measurement ----------------------------------------------------------------------------
    def min_requests(self, nbytes: int) -> int:
        if self.quick:
            return 1 if nbytes >= 16 << 20 else 2
        return 10 if nbytes >= 16 << 20 else 50

    def measure(self, url: str, meter: CpuMeter, request: bytes, expected: bytes,
                concurrency: int, nbytes: int = 0,
                pa_args: dict[str, Any] | None = None) -> dict[str, Any]:
        """``--repeats`` runs of a point; the one with the median infer/s is reported, with
        every run's infer/s and p50 kept (``repeats``) to show the spread. Errors and
        mismatches of every run count."""
        runs = [self.measure_once(url, meter, request, expected, concurrency, nbytes, pa_args)
                for _ in range(max(1, self.args.repeats))]
        if len(runs) == 1:
            return runs[0]
        ordered = sorted(runs, key=lambda r: r["infer_per_s"])
        chosen = dict(ordered[len(ordered) // 2])
        chosen["errors"] = sum(r["errors"] for r in runs)
        chosen["mismatches"] = sum(r["mismatches"] for r in runs)
        chosen["first_error"] = next((r["first_error"] for r in runs if r["first_error"]), "")
        chosen["repeats"] = [{"infer_per_s": r["infer_per_s"], "p50_ms": r["p50_ms"],
                              "p99_ms": r["p99_ms"]} for r in runs]
        return chosen

    def measure_once(self, url: str, meter: CpuMeter, request: bytes, expected: bytes,
                     concurrency: int, nbytes: int = 0,
                     pa_args: dict[str, Any] | None = None) -> dict[str, Any]:
        """One closed-loop point: our generator, or perf_analyzer when PERF_ANALYZER is set.

        On the target, the model's ModelStatistics are read around the point, so the report
        can say where the server spent the time (queue, compute input/infer/output).
        """
        assert self.generator is not None
        stats_model = (pa_args or {}).get("model") if url == self.target_url else None
        stats_before = self.target.statistics(stats_model) if (
            stats_model and self.target is not None) else None
        before = meter.sample()
        started = time.monotonic()
        if self.use_pa and pa_args is not None:
            big = nbytes >= 16 << 20
            result = perf_analyzer.run_point(url, concurrency=concurrency,
                                             duration_s=self.duration_s, quick=self.quick,
                                             min_requests=self.min_requests(nbytes) if big else 0,
                                             **pa_args)
            result.count = -1
        else:
            job = Job(url, kserve.INFER, request, expected, concurrency, self.warmup_s,
                      self.duration_s, self.min_requests(nbytes),
                      timeout_s=120.0 if nbytes >= 16 << 20 else 30.0)
            result = self.generator.run(job, self.args.client_procs)
        wall = time.monotonic() - started
        values = result.as_dict()
        values.update(CpuMeter.cores(before, meter.sample(), wall))
        values["client"] = "perf_analyzer" if self.use_pa and pa_args is not None else "bench"
        if stats_before is not None and stats_model and self.target is not None:
            values["server_stats"] = kserve.statistics_delta(
                stats_before, self.target.statistics(stats_model))
        return values

    @staticmethod
    def load_ok(result: dict[str, Any]) -> tuple[bool, str]:
        if result["errors"]:
            return False, f"{result['errors']} request(s) failed: {result['first_error']}"
        if result["mismatches"]:
            return False, f"{result['mismatches']} response(s) differed from the verified one"
        if result["count"] == 0:
            return False, "no request completed inside the measurement window"
        return True, ""

    def record(self, scenario_id: str, fields: dict[str, Any],
               body: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        entry: dict[str, Any] = {"id": scenario_id, **fields, "status": "ok", "correct": None,
                                 "reason": ""}
        try:
            entry.update(body())
            ok, reason = self.load_ok(entry["result"])
            entry["correct"] = ok and entry.get("correct") is not False
            if not ok:
                entry["status"], entry["reason"] = "failed", reason
        except Skip as exc:
            entry["status"], entry["reason"] = "skipped", str(exc)
        except kserve.CheckFailed as exc:
            entry["status"], entry["correct"], entry["reason"] = "failed", False, str(exc)
        except grpc.RpcError as exc:
            entry["status"], entry["correct"] = "failed", False
            entry["reason"] = f"{exc.code()}: {exc.details()}"  # type: ignore[attr-defined]
        except Exception as exc:
            entry["status"], entry["correct"] = "failed", False
            entry["reason"] = f"{type(exc).__name__}: {exc}"
        self.scenarios.append(entry)
        self._progress(entry)
        return entry

    def _progress(self, entry: dict[str, Any]) -> None:
        result = entry.get("result") or {}
        if entry["status"] == "ok":
            text = (f"{result['infer_per_s']:9.1f} infer/s  p50 {result['p50_ms']:8.3f} ms  "
                    f"p99 {result['p99_ms']:8.3f} ms")
        else:
            text = f"{entry['status'].upper()}: {entry['reason']}"
        print(f"  {entry['id']:<28} {text}", flush=True)

    def echo_point(self, key: str, request: bytes, concurrency: int, nbytes: int = 0,
                   pa_args: dict[str, Any] | None = None) -> None:
        """The same request against the bare gRPC echo server (once per key)."""
        if key in self.echo or self.echo_rpc is None:
            return
        try:
            expected = self.echo_rpc.infer_bytes(request)
            result = self.measure(self.echo_rpc.url, self.echo_meter, request, expected,
                                  concurrency, nbytes, pa_args)
            ok, reason = self.load_ok(result)
            self.echo[key] = {"result": result, "status": "ok" if ok else "failed",
                              "reason": reason}
        except Exception as exc:
            self.echo[key] = {"result": None, "status": "failed", "reason": str(exc)}
        point = self.echo[key]
        if point["status"] == "ok":
            r = point["result"]
            print(f"  {'echo/' + key:<28} {r['infer_per_s']:9.1f} infer/s  "
                  f"p50 {r['p50_ms']:8.3f} ms  p99 {r['p99_ms']:8.3f} ms", flush=True)
        else:
            print(f"  {'echo/' + key:<28} FAILED: {point['reason']}", flush=True)

    def need_model(self, name: str) -> None:
        assert self.target is not None
        if not self.target.model_ready(name):
            if self.external:
                raise Skip(f"model '{name}' is not served (ready) by {self.target_url}")
            raise kserve.CheckFailed(f"model '{name}' is not ready on the bench's own server")

    # scenarios ------------------------------------------------------------------------------
    def run_simple(self) -> None:
        print("simple (2x16 INT32 add/sub) over the gRPC payload", flush=True)
        for concurrency in CONCURRENCY:
            probe = kserve.simple_probe()

            def body(probe: kserve.Probe = probe, concurrency: int = concurrency
                     ) -> dict[str, Any]:
                assert self.target is not None
                self.need_model("simple")
                expected = kserve.verify(self.target, probe)
                result = self.measure(self.target_url, self.target_meter, probe.request,
                                      expected, concurrency,
                                      pa_args={"model": "simple", "batch": 1})
                return {"correct": True, "result": result}

            self.record(f"simple/c{concurrency}", {"group": "simple", "model": "simple",
                                                   "transport": "payload",
                                                   "concurrency": concurrency}, body)
            self.echo_point(f"simple/c{concurrency}", probe.request, concurrency,
                            pa_args={"model": "simple", "batch": 1})

    def run_identity_payload(self) -> None:
        print("identity FP32 through the gRPC payload", flush=True)
        for label, nbytes in SIZES.items():
            probe = kserve.identity_payload_probe(nbytes)
            pa_args = {"model": "identity_fp32", "shape": f"INPUT0:{max(1, nbytes // 4)}"}

            def body(probe: kserve.Probe = probe, nbytes: int = nbytes, label: str = label,
                     pa_args: dict[str, Any] = pa_args) -> dict[str, Any]:
                assert self.target is not None
                self.need_model("identity_fp32")
                self.refresh_memcpy(label, nbytes)
                expected = kserve.verify(self.target, probe)
                result = self.measure(self.target_url, self.target_meter, probe.request,
                                      expected, 1, nbytes, pa_args)
                return {"correct": True, "result": result}

            self.record(f"identity/payload/{label}",
                        {"group": "identity", "model": "identity_fp32", "transport": "payload",
                         "bytes": nbytes, "size": label, "concurrency": 1}, body)
            self.echo_point(f"identity/payload/{label}", probe.request, 1, nbytes, pa_args)

    def run_identity_system_shm(self) -> None:
        print("identity FP32 with input and output in system shared memory", flush=True)
        for label, nbytes in SIZES.items():
            self.record(f"identity/system_shm/{label}",
                        {"group": "identity", "model": "identity_fp32",
                         "transport": "system_shm", "bytes": nbytes, "size": label,
                         "concurrency": 1},
                        lambda label=label, nbytes=nbytes: self._system_shm(label, nbytes))
        request = kserve.identity_shm_request(4, "echo_in", "echo_out")
        self.echo_point("identity/shm", request, 1, 4,
                        {"model": "identity_fp32", "shape": "INPUT0:1", "shm": "system",
                         "output_shm_bytes": 4})

    def refresh_memcpy(self, label: str, nbytes: int) -> None:
        """Measure the memcpy ceiling again next to the point; keep the best median.

        A ceiling is what the host can do at best; re-measuring beside each identity point
        keeps a burst of background load at start-up from flattering the ratios.
        """
        if self.ceilings is None:
            return
        again = ceilings.memcpy(nbytes, 0.05 if self.quick else 0.25)
        best = self.ceilings["memcpy"].get(label)
        if best is None or again["p50_ms"] < best["p50_ms"]:
            again["samples"] = (best or {}).get("samples", 1) + 1
            self.ceilings["memcpy"][label] = again
        else:
            best["samples"] = best.get("samples", 1) + 1

    def _system_shm(self, label: str, nbytes: int) -> dict[str, Any]:
        assert self.target is not None
        self.refresh_memcpy(label, nbytes)
        self.need_model("identity_fp32")
        count = max(1, nbytes // 4)
        names = (f"bench_in_{label}", f"bench_out_{label}")
        rpc = self.target
        with SystemRegion(f"in_{label}", nbytes) as region_in, \
                SystemRegion(f"out_{label}", nbytes) as region_out:
            registered: list[str] = []
            try:
                for name, region in zip(names, (region_in, region_out), strict=True):
                    rpc.register_system(name, region.key, nbytes)
                    registered.append(name)
                source = region_in.array(np.float32, count)
                target = region_out.array(np.float32, count)
                source[:] = np.random.default_rng(3).standard_normal(count, dtype=np.float32)
                request = kserve.identity_shm_request(nbytes, *names)
                for attempt in range(2 if self.quick else 1):
                    target[:] = 0
                    if attempt:
                        source *= -1
                    expected = rpc.infer_bytes(request)
                    kserve.check_shm_metadata(kserve.pb.ModelInferResponse.FromString(expected),
                                              count)
                    if not np.array_equal(source, target):
                        raise kserve.CheckFailed("the output region does not hold the input")
                target[:] = 0
                result = self.measure(self.target_url, self.target_meter, request, expected,
                                      1, nbytes,
                                      {"model": "identity_fp32", "shape": f"INPUT0:{count}",
                                       "shm": "system", "output_shm_bytes": nbytes})
                # perf_analyzer uses regions of its own: only our generator's run is checked.
                if result["client"] == "bench" and not np.array_equal(source, target):
                    raise kserve.CheckFailed("after the run the output region does not hold "
                                             "the input")
                del source, target
                return {"correct": True, "result": result}
            finally:
                for name in registered:
                    with contextlib.suppress(grpc.RpcError):
                        rpc.unregister_system(name)

    def run_identity_cuda_shm(self) -> None:
        for transport, model in CUDA_MODELS.items():
            print(f"identity FP32 ({model}) with input and output in CUDA shared memory",
                  flush=True)
            for label, nbytes in SIZES.items():
                self.record(f"identity/{transport}/{label}",
                            {"group": "identity", "model": model,
                             "transport": transport, "bytes": nbytes, "size": label,
                             "concurrency": 1},
                            lambda label=label, nbytes=nbytes, model=model:
                            self._cuda_shm(label, nbytes, model))

    def _cuda_shm(self, label: str, nbytes: int, model: str) -> dict[str, Any]:
        assert self.target is not None
        try:
            cuda_runtime()
        except RuntimeError as exc:
            raise Skip(str(exc)) from None
        if model == CUDA_MODELS["cuda_shm_gpu"] and not has_gpu() and not self.external:
            raise Skip("no GPU on this host for a KIND_GPU instance")
        self.need_model(model)
        count = max(1, nbytes // 4)
        names = (f"bench_cuda_in_{label}", f"bench_cuda_out_{label}")
        rpc = self.target
        buffers = [CudaBuffer(nbytes), CudaBuffer(nbytes)]
        registered: list[str] = []
        try:
            for name, buffer in zip(names, buffers, strict=True):
                rpc.register_cuda(name, buffer.raw_handle, buffer.device_id, nbytes)
                registered.append(name)
            data = np.random.default_rng(4).standard_normal(count, dtype=np.float32)
            buffers[0].upload(data)
            buffers[1].fill_zero()
            request = kserve.identity_shm_request(nbytes, *names, model=model)
            try:
                expected = rpc.infer_bytes(request)
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.UNIMPLEMENTED:  # type: ignore[attr-defined]
                    raise Skip(f"server: {exc.details()}") from None  # type: ignore[attr-defined]
                raise
            kserve.check_shm_metadata(kserve.pb.ModelInferResponse.FromString(expected), count)
            if not np.array_equal(buffers[1].download(np.float32, count), data):
                raise kserve.CheckFailed("the output CUDA region does not hold the input")
            result = self.measure(self.target_url, self.target_meter, request, expected, 1,
                                  nbytes, {"model": model, "shape": f"INPUT0:{count}",
                                           "shm": "cuda", "output_shm_bytes": nbytes})
            return {"correct": True, "result": result}
        finally:
            for name in registered:
                with contextlib.suppress(grpc.RpcError):
                    rpc.unregister_cuda(name)
            for buffer in buffers:
                buffer.close()

    def run_batching(self) -> None:
        print("dynamic batching off (simple) / on (simple_dyn)", flush=True)
        for concurrency in BATCHING_CONCURRENCY:
            for mode, model in (("off", "simple"), ("on", "simple_dyn")):
                probe = kserve.simple_probe(model)

                def body(probe: kserve.Probe = probe, model: str = model,
                         concurrency: int = concurrency) -> dict[str, Any]:
                    assert self.target is not None
                    self.need_model(model)
                    expected = kserve.verify(self.target, probe)
                    result = self.measure(self.target_url, self.target_meter, probe.request,
                                          expected, concurrency,
                                          pa_args={"model": model, "batch": 1})
                    return {"correct": True, "result": result}

                self.record(f"batching/{mode}/c{concurrency}",
                            {"group": "batching", "model": model, "transport": "payload",
                             "batching": mode, "concurrency": concurrency}, body)
            self.echo_point(f"simple/c{concurrency}", kserve.simple_probe().request, concurrency,
                            pa_args={"model": "simple", "batch": 1})

    def run_scaling(self) -> None:
        print(f"worker scaling: CPU-bound model (2 ms CPU per request), concurrency "
              f"{SCALING_CONCURRENCY}", flush=True)
        for instances in SCALING_INSTANCES:
            model = f"cpu_burn_{instances}"
            probe = kserve.burn_probe(model)

            def body(probe: kserve.Probe = probe, model: str = model) -> dict[str, Any]:
                assert self.target is not None
                self.need_model(model)
                expected = kserve.verify(self.target, probe)
                result = self.measure(self.target_url, self.target_meter, probe.request,
                                      expected, SCALING_CONCURRENCY,
                                      pa_args={"model": model, "shape": "INPUT0:1"})
                return {"correct": True, "result": result}

            self.record(f"scaling/instances{instances}",
                        {"group": "scaling", "model": model, "transport": "payload",
                         "instances": instances, "burn_ms": BURN_MS,
                         "concurrency": SCALING_CONCURRENCY}, body)

    def measure_ceilings(self) -> dict[str, Any]:
        print("ceilings: one NumPy memcpy and one GPU device-to-device copy per size",
              flush=True)
        budget = 0.1 if self.quick else 0.5
        memcpy = {label: ceilings.memcpy(nbytes, budget) for label, nbytes in SIZES.items()}
        gpu = {label: ceilings.gpu_copy(nbytes, budget) for label, nbytes in SIZES.items()}
        for label in SIZES:
            gpu_text = (f"{gpu[label]['p50_ms']:.4f} ms" if "p50_ms" in gpu[label]
                        else f"skipped ({gpu[label]['skipped']})")
            print(f"  {label:>6}: memcpy {memcpy[label]['p50_ms']:.4f} ms "
                  f"({memcpy[label]['gb_per_s']:.1f} GB/s), GPU copy {gpu_text}", flush=True)
        return {"memcpy": memcpy, "gpu_copy": gpu}


# --- entry point -----------------------------------------------------------------------------
def _meta(args: argparse.Namespace, target_url: str) -> dict[str, Any]:
    commit = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = subprocess.run(["git", "-C", str(BENCH_DIR.parent), "rev-parse", "--short",
                                 "HEAD"], capture_output=True, text=True, timeout=5,
                                check=False).stdout.strip()
    return {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": socket.gethostname(), "cpus": os.cpu_count(),
        "platform": platform.platform(), "python": platform.python_version(),
        "grpc": grpc.__version__, "numpy": np.__version__,
        "target": args.url or "shmserve (started by the bench)", "target_url": target_url,
        "label": args.label or ("" if args.url is None else "external"),
        "commit": commit, "quick": args.quick,
        "client": "perf_analyzer" if perf_analyzer.executable() else "bench multi-process",
        "client_processes": None if perf_analyzer.executable() else args.client_procs,
        "repeats": args.repeats,
        "loadavg_start": os.getloadavg(),
    }


def _stem(meta: dict[str, Any], quick: bool) -> str:
    host = re.sub(r"[^A-Za-z0-9_.-]", "_", meta["host"])[:40]
    stem = f"{meta['date'][:10]}-{host}"
    if meta["label"]:
        stem += "-" + re.sub(r"[^A-Za-z0-9_.-]", "_", meta["label"])
    return stem + ("-quick" if quick else "")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="short windows: checks every scenario runs and is correct (<1 min)")
    parser.add_argument("--url", metavar="HOST:PORT", default=None,
                        help="measure this running KServe-v2 gRPC server instead of starting "
                             "shmserve (it must serve the same model names)")
    parser.add_argument("--label", default=None,
                        help="name of the target in the report and file name (e.g. triton)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR,
                        help="results directory (default bench/results)")
    parser.add_argument("--duration", type=float, default=None,
                        help="seconds measured per point (default 5, quick 0.25)")
    parser.add_argument("--warmup", type=float, default=None,
                        help="seconds of warm-up per point (default 1, quick 0.1)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="measure every point N times and report the median run (default 1)")
    parser.add_argument("--client-procs", type=int, default=default_processes(),
                        help="load generator processes (default: min(4, cores))")
    parser.add_argument("--server-pid", type=int, default=None,
                        help="with --url: pid of the server, to report its CPU use")
    parser.add_argument("--compare", type=Path, action="append", default=[],
                        help="a previous results .json (e.g. a peer) to put side by side")
    parser.add_argument("--only", default=None,
                        help="comma-separated groups to run: simple,identity,batching,scaling")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    groups = set((args.only or "simple,identity,batching,scaling").split(","))
    unknown = groups - {"simple", "identity", "batching", "scaling"}
    if unknown:
        print(f"unknown group(s): {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, _raise_exit)}
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="shmserve-bench-") as tmp:
        workdir = Path(tmp)
        try:
            document = _run(args, workdir, groups)
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
    leftovers = leftover_segments()
    if leftovers:
        print(f"warning: shared memory segments left behind: {leftovers}", file=sys.stderr)
    document["meta"]["elapsed_s"] = round(time.monotonic() - started, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = _stem(document["meta"], args.quick)
    compared = [json.loads(path.read_text()) for path in args.compare]
    paths = report.write(document, args.out, stem, compared, plots=not args.no_plots)
    print()
    print(paths["markdown_text"])
    print(f"results: {paths['json']}")
    for key in ("markdown", "latency_plot", "throughput_plot"):
        if paths.get(key):
            print(f"         {paths[key]}")
    failed = [s for s in document["scenarios"] if s["status"] == "failed"]
    for entry in failed:
        print(f"FAILED {entry['id']}: {entry['reason']}", file=sys.stderr)
    return 1 if failed else 0


def _run(args: argparse.Namespace, workdir: Path, groups: set[str]) -> dict[str, Any]:
    repository = workdir / "models"
    shutil.copytree(MODELS_DIR, repository,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    if has_gpu():
        shutil.copytree(GPU_MODELS_DIR, repository, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    with contextlib.ExitStack() as stack:
        server = None
        if args.url is None:
            from shmserve.tests.serverproc import ServerProcess
            print("starting shmserve on bench/models ...", flush=True)
            server = ServerProcess(repository, log_path=workdir / "shmserve.log")
            stack.callback(_stop_server, server)
            server.wait_ready(timeout=180.0)
            target_url = server.url
            args.server_pid = server.pid
        else:
            target_url = args.url
        bench = Bench(args, workdir)
        bench.target_url = target_url
        meta = _meta(args, target_url)
        meta["duration_s"], meta["warmup_s"] = bench.duration_s, bench.warmup_s
        bench.target = kserve.Rpc(target_url)
        stack.callback(bench.target.close)
        bench.target.wait_live(30.0)
        ceiling_values = bench.measure_ceilings()
        bench.ceilings = ceiling_values

        echo = EchoServer(repository, workdir / "echo.log")
        stack.callback(echo.stop)
        echo.wait_ready()
        bench.echo_meter = CpuMeter(echo.pid)
        bench.echo_rpc = kserve.Rpc(echo.url)
        stack.callback(bench.echo_rpc.close)

        bench.generator = LoadGenerator(args.client_procs, lead_s=0.1 if args.quick else 0.3)
        stack.callback(bench.generator.close)
        procs = meta["client_processes"]
        print(f"target {target_url} ({meta['target']}), echo ceiling {echo.url}, client "
              f"{meta['client']}{f' x{procs}' if procs else ''}", flush=True)
        if "simple" in groups:
            bench.run_simple()
        if "identity" in groups:
            bench.run_identity_payload()
            bench.run_identity_system_shm()
            bench.run_identity_cuda_shm()
        if "batching" in groups:
            bench.run_batching()
        if "scaling" in groups:
            bench.run_scaling()
        meta["loadavg_end"] = os.getloadavg()
        if server is not None and any(s["status"] == "failed" for s in bench.scenarios):
            meta["server_log_tail"] = server.log()[-4000:]
    ceiling_values["echo"] = bench.echo
    document = {"meta": meta, "ceilings": ceiling_values, "scenarios": bench.scenarios}
    report.attach_ratios(document)
    return document


def _stop_server(server: Any) -> None:
    code = server.stop()
    if code not in (0, None):
        print(f"warning: shmserve exited with {code}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
