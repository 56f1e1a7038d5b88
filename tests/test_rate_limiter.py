"""--rate-limit=execution_count: two models whose instances each need the one resource "R"
never execute at the same time; with two of it, or with the limiter off, they do. Each model
reports when its execution started and ended (the monotonic clock is the host's, shared by the
worker processes), so the test reads overlap, not durations."""

from __future__ import annotations

import concurrent.futures
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from shmserve.tests.serverproc import ServerProcess

SPAN_PY = """
    import os
    import time
    import numpy as np
    import triton_python_backend_utils as pb_utils

    class TritonPythonModel:
        def initialize(self, args):
            import json
            parameters = json.loads(args["model_config"]).get("parameters", {})
            self.sleep = float(parameters.get("SLEEP", {}).get("string_value", "0.4"))

        def execute(self, requests):
            for request in requests:
                if pb_utils.get_input_tensor_by_name(request, "X").as_numpy()[0, 0] < 0:
                    os._exit(3)   # dies holding the resource
            started = time.monotonic()
            time.sleep(self.sleep)
            span = np.array([[started, time.monotonic()]], np.float64)
            return [pb_utils.InferenceResponse([pb_utils.Tensor("SPAN", span)])
                    for _ in requests]
"""


def _model(repo: Path, name: str, priority: int = 0, sleep: float = 0.4) -> None:
    folder = repo / name
    (folder / "1").mkdir(parents=True)
    (folder / "config.pbtxt").write_text(textwrap.dedent(f"""
        name: "{name}"
        backend: "python"
        max_batch_size: 1
        input [ {{ name: "X", data_type: TYPE_FP32, dims: [ 1 ] }} ]
        output [ {{ name: "SPAN", data_type: TYPE_FP64, dims: [ 2 ] }} ]
        instance_group [ {{ count: 1, kind: KIND_CPU,
                            rate_limiter {{ resources [ {{ name: "R", count: 1 }} ]
                                            priority: {priority} }} }} ]
        parameters {{ key: "SLEEP" value: {{ string_value: "{sleep}" }} }}
    """))
    (folder / "1" / "model.py").write_text(textwrap.dedent(SPAN_PY))


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    repo = tmp_path_factory.mktemp("rate_limit") / "models"
    for name in ("a", "b"):
        _model(repo, name)
    _model(repo, "first", priority=1, sleep=0.05)
    _model(repo, "second", priority=2, sleep=0.05)
    yield repo


def _spans(server: ServerProcess) -> list[tuple[float, float]]:
    """Two requests at once, one per model: each execution's (start, end)."""
    def run(model: str) -> tuple[float, float]:
        with grpcclient.InferenceServerClient(server.url) as client:
            value = grpcclient.InferInput("X", [1, 1], "FP32")
            value.set_data_from_numpy(np.ones((1, 1), np.float32))
            span = client.infer(model, [value], client_timeout=30).as_numpy("SPAN")[0]
            return float(span[0]), float(span[1])

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        return list(pool.map(run, ["a", "b"]))


def _overlap(spans: list[tuple[float, float]]) -> bool:
    (start_a, end_a), (start_b, end_b) = spans
    return start_a < end_b and start_b < end_a


@pytest.mark.parametrize(("flags", "overlap"), [
    (["--rate-limit=execution_count"], False),
    (["--rate-limit=execution_count", "--rate-limit-resource=R:2"], True),
    (["--rate-limit=execution_count", "--rate-limit-resource=r:2:0"], True),  # any case
    (["--rate-limit=off"], True),
])
def test_executions_hold_their_resources(repository: Path, flags: list[str],
                                         overlap: bool) -> None:
    with ServerProcess(repository, *flags) as server:
        server.wait_ready()
        _spans(server)  # warm both workers
        for _ in range(2):
            assert _overlap(_spans(server)) == overlap


def test_a_bad_resource_is_a_clear_error(repository: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "shmserve.daemon", "serve",
                           "--model-repository", str(repository),
                           "--rate-limit-resource=R:many"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "expected <resource_name>:<count>:<device> (device optional), got 'R:many'" \
        in done.stderr


def test_a_worker_that_dies_gives_its_resources_back(repository: Path) -> None:
    """Model a's worker dies while its batch holds R: its request fails, and model b (which
    needs R too) still runs."""
    with ServerProcess(repository, "--rate-limit=execution_count") as server:
        server.wait_ready()
        with grpcclient.InferenceServerClient(server.url) as client:
            value = grpcclient.InferInput("X", [1, 1], "FP32")
            value.set_data_from_numpy(np.full((1, 1), -1, np.float32))
            with pytest.raises(InferenceServerException) as died:
                client.infer("a", [value], client_timeout=30)
            assert died.value.status() == "StatusCode.UNAVAILABLE"
            value.set_data_from_numpy(np.ones((1, 1), np.float32))
            span = client.infer("b", [value], client_timeout=30).as_numpy("SPAN")[0]
            assert span[1] > span[0]


def test_instances_take_turns_by_priority(repository: Path) -> None:
    """Eight requests for each of two models queued at once, one resource: the one with
    priority 1 runs about twice as often as the one with priority 2 while both wait, and
    neither runs all its batches before the other starts."""
    with ServerProcess(repository, "--rate-limit=execution_count") as server:
        server.wait_ready()

        def run(model: str) -> tuple[float, str]:
            with grpcclient.InferenceServerClient(server.url) as client:
                value = grpcclient.InferInput("X", [1, 1], "FP32")
                value.set_data_from_numpy(np.ones((1, 1), np.float32))
                span = client.infer(model, [value], client_timeout=60).as_numpy("SPAN")[0]
                return float(span[0]), model

        with concurrent.futures.ThreadPoolExecutor(2) as pool:   # warm both workers
            list(pool.map(run, ["first", "second"]))
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            order = [model for _, model in sorted(pool.map(run, ["first", "second"] * 8))]
    early = order[:9]
    assert early.count("first") >= 5 and early.count("second") >= 2, order
