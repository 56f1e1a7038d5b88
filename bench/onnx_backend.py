"""Issue 17: the onnxruntime backend served by shmserve vs onnxruntime called directly.

One run, one server, every row measured back to back (closed loop, one request at a time):

- ``mlp`` (X [1,4] -> Y [1,3], tests/onnx_models.mlp): onnxruntime's ``session.run`` in this
  process (the reference), shmserve's onnxruntime backend over gRPC and over the local channel,
  and the python backend running the same MLP with NumPy (the small-request overhead of each
  backend, side by side);
- ``identity64`` (a 64 MiB FP32 tensor through ``Y = X + 0``): ``session.run`` in this process
  (the reference; it allocates the output each call), the same with IO binding into a
  preallocated output, and shmserve with input and output in system shared memory over gRPC,
  in a region of the local channel, and as gRPC payload. Over gRPC also the same model with
  ORT's pool threads left spinning after each run (``session.force_spinning_stop: "0"``, the
  behaviour before issue 17's fix), alternated with the default in the same run.

Issue 17's target, checked at the end: identity64 through system shm <= 1.5 x the direct call.
Run from the repository root:

    python -m bench.onnx_backend [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shmserve.tests.serverproc import ServerProcess

TARGET_RATIO = 1.5
ROWS, COLS = 16, 1 << 20                       # 64 MiB of FP32

MLP_CONFIG = """
backend: "onnxruntime"
max_batch_size: 8
input [ { name: "X" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "Y" data_type: TYPE_FP32 dims: [ 3 ] } ]
instance_group [ { count: 1 kind: KIND_CPU } ]
"""
PY_MLP_CONFIG = MLP_CONFIG.replace('backend: "onnxruntime"', 'backend: "python"')
IDENTITY_CONFIG = """
backend: "onnxruntime"
max_batch_size: 0
input [ { name: "X" data_type: TYPE_FP32 dims: [ -1, -1 ] } ]
output [ { name: "Y" data_type: TYPE_FP32 dims: [ -1, -1 ] } ]
instance_group [ { count: 1 kind: KIND_CPU } ]
"""
# The identity as before issue 17's fix: ORT's pool threads left spinning after each run
# (ORT's default), measured next to the default in the same run.
SPINNING_IDENTITY_CONFIG = IDENTITY_CONFIG + """
parameters { key: "session.force_spinning_stop" value: { string_value: "0" } }
"""
# The same MLP as tests/onnx_models.mlp, in NumPy, for the python backend.
PY_MLP = '''
import numpy as np
import triton_python_backend_utils as pb_utils

W1 = (np.arange(32, dtype=np.float32).reshape(4, 8) - 16) / 10
B1 = np.linspace(-1, 1, 8, dtype=np.float32)
W2 = (np.arange(24, dtype=np.float32).reshape(8, 3) - 12) / 10
B2 = np.array([0.5, -0.5, 1.0], dtype=np.float32)


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "X").as_numpy()
            y = (np.maximum(x @ W1 + B1, 0) @ W2 + B2).astype(np.float32)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("Y", y)]))
        return responses
'''


@dataclass(slots=True)
class Row:
    case: str
    target: str
    p50_us: float
    mean_us: float
    calls: int
    ratio: float = 0.0            # p50 / the case's reference p50


def timed(call: Callable[[], Any], warmup: int, calls: int) -> list[float]:
    for _ in range(warmup):
        call()
    seconds = []
    for _ in range(calls):
        started = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - started)
    return seconds


def timed_alternately(calls: dict[str, Callable[[], Any]], warmup: int, each: int,
                      rounds: int) -> dict[str, list[float]]:
    """``timed`` for several calls, ``each`` at a time in turn for ``rounds`` rounds, so that
    they see the same host; a pause between turns lets spinning threads settle."""
    seconds: dict[str, list[float]] = {label: [] for label in calls}
    for call in calls.values():
        timed(call, warmup, 0)
    for _ in range(rounds):
        for label, call in calls.items():
            time.sleep(0.05)
            seconds[label] += timed(call, 0, each)
    return seconds


def row(case: str, target: str, seconds: list[float]) -> Row:
    return Row(case, target, statistics.median(seconds) * 1e6,
               statistics.fmean(seconds) * 1e6, len(seconds))


def build_repository(root: Path) -> Path:
    from shmserve.tests import onnx_models
    repo = root / "repo"
    onnx_models.write_model(repo, "onnx_mlp", onnx_models.mlp(), MLP_CONFIG)
    onnx_models.write_model(repo, "onnx_identity", onnx_models.identity_like(),
                            IDENTITY_CONFIG)
    onnx_models.write_model(repo, "onnx_identity_spinning", onnx_models.identity_like(),
                            SPINNING_IDENTITY_CONFIG)
    py = repo / "py_mlp"
    (py / "1").mkdir(parents=True)
    (py / "1" / "model.py").write_text(PY_MLP)
    (py / "config.pbtxt").write_text(PY_MLP_CONFIG)
    return repo


def run(quick: bool) -> list[Row]:
    import onnxruntime as ort

    from shmserve.client import Client
    from shmserve.tests import onnx_models

    small_calls, large_calls = (200, 4) if quick else (3000, 30)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="shmserve-bench-onnx-") as tmp:
        root = Path(tmp)
        repo = build_repository(root)
        socket_path = str(root / "local.sock")
        server = ServerProcess(repo, "--local-socket", socket_path)
        try:
            server.wait_ready()
            grpc = Client(server.url)
            local = Client(server.url, transport="shm", local_socket=socket_path)
            assert local.transport != "grpc", "the local channel did not open"

            # -- the MLP: small requests -----------------------------------------------------
            session = ort.InferenceSession(
                onnx_models.mlp().SerializeToString(), providers=["CPUExecutionProvider"])
            x = np.random.default_rng(0).standard_normal((1, 4)).astype(np.float32)
            (expected,) = session.run(None, {"X": x})
            for model, client in (("onnx_mlp", grpc), ("onnx_mlp", local), ("py_mlp", grpc),
                                  ("py_mlp", local)):
                got = client.infer(model, {"X": x})["Y"]
                np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
            rows.append(row("mlp", "onnxruntime direct (session.run)",
                            timed(lambda: session.run(None, {"X": x}), 50, small_calls)))
            for model, label in (("onnx_mlp", "onnxruntime backend"),
                                 ("py_mlp", "python backend (numpy)")):
                for transport, client in (("gRPC", grpc), ("local channel", local)):
                    rows.append(row("mlp", f"{label}, {transport}", timed(
                        lambda c=client, m=model: c.infer(m, {"X": x}), 50, small_calls)))

            # -- 64 MiB through an identity-like graph ---------------------------------------
            identity = ort.InferenceSession(onnx_models.identity_like().SerializeToString(),
                                            providers=["CPUExecutionProvider"])
            big = np.random.default_rng(1).standard_normal((ROWS, COLS)).astype(np.float32)
            rows.append(row("identity64", "onnxruntime direct (session.run)",
                            timed(lambda: identity.run(None, {"X": big}), 1, large_calls)))
            preallocated = np.empty_like(big)
            binding = identity.io_binding()
            binding.bind_cpu_input("X", big)
            binding.bind_output("Y", "cpu", 0, np.float32, list(big.shape),
                                preallocated.ctypes.data)
            rows.append(row("identity64", "onnxruntime direct (IO binding)", timed(
                lambda: identity.run_with_iobinding(binding), 1, large_calls)))
            for transport, client in (("system shm, gRPC", grpc),
                                      ("region, local channel", local)):
                with client.shared_memory(2 * big.nbytes + 4096) as region:
                    x_in = region.ndarray(big.shape, np.float32)
                    y_out = region.ndarray(big.shape, np.float32)
                    x_in[:] = big
                    got = client.infer("onnx_identity", {"X": x_in}, outputs={"Y": y_out})
                    np.testing.assert_array_equal(got["Y"], big)
                    calls = {f"shmserve, {transport}": lambda c=client, a=x_in, b=y_out: c.infer(
                        "onnx_identity", {"X": a}, outputs={"Y": b})}
                    if client is grpc:
                        calls[f"shmserve, {transport}, pools spinning"] = (
                            lambda c=client, a=x_in, b=y_out: c.infer(
                                "onnx_identity_spinning", {"X": a}, outputs={"Y": b}))
                    for label, seconds in timed_alternately(
                            calls, 1, max(1, large_calls // 5), 5).items():
                        rows.append(row("identity64", label, seconds))
            np.testing.assert_array_equal(grpc.infer("onnx_identity", {"X": big})["Y"], big)
            rows.append(row("identity64", "shmserve, gRPC payload", timed(
                lambda: grpc.infer("onnx_identity", {"X": big}), 1, large_calls)))
            grpc.close()
            local.close()
        finally:
            code = server.stop()
        if code != 0:
            raise RuntimeError(f"server exited with {code}:\n{server.log()[-4000:]}")
    for case in {r.case for r in rows}:
        reference = next(r for r in rows if r.case == case).p50_us
        for item in rows:
            if item.case == case:
                item.ratio = item.p50_us / reference
    return rows


def report(rows: list[Row]) -> str:
    lines = [f"{'case':<11} {'target':<42} {'p50 us':>10} {'mean us':>10} {'x direct':>9}"]
    for item in rows:
        lines.append(f"{item.case:<11} {item.target:<42} {item.p50_us:>10.1f} "
                     f"{item.mean_us:>10.1f} {item.ratio:>9.2f}")
    shm_row = next(r for r in rows if r.target == "shmserve, system shm, gRPC")
    verdict = "met" if shm_row.ratio <= TARGET_RATIO else "MISSED"
    lines.append(f"target: identity64 through system shm <= {TARGET_RATIO} x direct: "
                 f"{shm_row.ratio:.2f} x ({verdict})")
    overhead = {r.target: r.p50_us for r in rows if r.case == "mlp"}
    direct_us = overhead["onnxruntime direct (session.run)"]
    for transport in ("gRPC", "local channel"):
        onnx_us = overhead[f"onnxruntime backend, {transport}"] - direct_us
        py_us = overhead[f"python backend (numpy), {transport}"] - direct_us
        lines.append(f"small-request overhead over the direct call, {transport}: onnxruntime "
                     f"backend {onnx_us:.0f} us, python backend {py_us:.0f} us")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few calls (a smoke run)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    rows = run(args.quick)
    print(report(rows))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
