"""Python-backend parity with Triton on a real server (issue 16 item 4): auto-complete,
backend inference, custom metrics, Logger, request accessors, is_ready, output checks,
warm-up. Model folders are written per test so each feature is exercised in isolation."""

from __future__ import annotations

import json
import re
import shutil
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from shmserve.tests.conftest import StartServer
from shmserve.tests.serverproc import ServerProcess

PYBACKEND = Path(__file__).resolve().parent / "models_pybackend"

IDENTITY_CONFIG = """
max_batch_size: 0
input [ { name: "INPUT0", data_type: TYPE_FP32, dims: [ -1 ] } ]
output [ { name: "OUTPUT0", data_type: TYPE_FP32, dims: [ -1 ] } ]
"""

Write = Callable[..., Path]


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    repo.mkdir()
    return repo


def write_model(repo: Path, name: str, model_py: str | None, config: str | None,
                version_files: dict[str, str] | None = None) -> Path:
    folder = repo / name
    (folder / "1").mkdir(parents=True)
    if model_py is not None:
        (folder / "1" / "model.py").write_text(textwrap.dedent(model_py))
    if config is not None:
        (folder / "config.pbtxt").write_text(textwrap.dedent(config))
    for filename, text in (version_files or {}).items():
        (folder / "1" / filename).write_text(text)
    return folder


def explicit_server(start_server: StartServer, repo: Path, *extra: str) -> ServerProcess:
    return start_server(None, "--model-control-mode", "explicit", *extra, repository=repo)


def identity_infer(client: grpcclient.InferenceServerClient, model: str,
                   data: np.ndarray, input_name: str = "INPUT0",
                   output_name: str = "OUTPUT0") -> np.ndarray:
    tensor = grpcclient.InferInput(input_name, list(data.shape), "FP32")
    tensor.set_data_from_numpy(data)
    result = client.infer(model, [tensor])
    out = result.as_numpy(output_name)
    assert out is not None
    return out


def load_error(client: grpcclient.InferenceServerClient, model: str) -> str:
    with pytest.raises(InferenceServerException) as info:
        client.load_model(model)
    return str(info.value.message())


# -- auto-complete and backend inference ------------------------------------------------------

def test_config_less_model_is_served_by_auto_complete(start_server: StartServer,
                                                     repository: Path) -> None:
    (repository / "auto_only").mkdir()
    shutil.copytree(PYBACKEND / "auto_complete" / "1", repository / "auto_only" / "1")
    server = explicit_server(start_server, repository)
    client = grpcclient.InferenceServerClient(server.url)
    client.load_model("auto_only")
    config = client.get_model_config("auto_only", as_json=True)["config"]
    assert config["backend"] == "python"
    assert config["max_batch_size"] == 8
    assert "dynamic_batching" in config
    assert [(t["name"], t["data_type"], t["dims"]) for t in config["input"]] == \
        [("IN", "TYPE_FP32", ["4"])]
    data = np.arange(8, dtype=np.float32).reshape(2, 4)
    np.testing.assert_array_equal(identity_infer(client, "auto_only", data, "IN", "OUT"),
                                  data * 3)


@pytest.mark.parametrize("flag", ["--disable-auto-complete-config",
                                  "--strict-model-config=true"])  # tritonserver's old name
def test_disable_auto_complete_config_skips_the_hook(start_server: StartServer,
                                                     repository: Path, flag: str) -> None:
    (repository / "auto_only").mkdir()
    shutil.copytree(PYBACKEND / "auto_complete" / "1", repository / "auto_only" / "1")
    server = explicit_server(start_server, repository, flag)
    client = grpcclient.InferenceServerClient(server.url)
    message = load_error(client, "auto_only")
    assert "model must have at least one 'output'" in message


def test_failing_auto_complete_fails_the_load(start_server: StartServer,
                                              repository: Path) -> None:
    write_model(repository, "bad_hook", """
        class TritonPythonModel:
            @staticmethod
            def auto_complete_config(auto_complete_model_config):
                auto_complete_model_config.add_input({"name": "IN", "data_type": "TYPE_FP32"})
                return auto_complete_model_config

            def execute(self, requests):
                return []
        """, None)
    server = explicit_server(start_server, repository)
    client = grpcclient.InferenceServerClient(server.url)
    message = load_error(client, "bad_hook")
    assert "load failed for model 'bad_hook'" in message
    assert "auto_complete_config of model 'bad_hook' failed" in message
    assert "is missing 'dims' property" in message
    assert server.process.poll() is None


def test_backend_is_inferred_from_the_model_file(start_server: StartServer,
                                                 repository: Path) -> None:
    model_py = (PYBACKEND / "identity" / "1" / "model.py").read_text()
    write_model(repository, "no_backend", model_py, 'name: "no_backend"\n' + IDENTITY_CONFIG)
    write_model(repository, "nothing", None, IDENTITY_CONFIG, {"README": "no model here"})
    server = explicit_server(start_server, repository)
    client = grpcclient.InferenceServerClient(server.url)
    client.load_model("no_backend")
    assert client.get_model_config("no_backend", as_json=True)["config"]["backend"] == "python"
    data = np.array([1.5, 2.5], dtype=np.float32)
    np.testing.assert_array_equal(identity_infer(client, "no_backend", data), data)
    message = load_error(client, "nothing")
    assert "must specify 'backend' or 'platform'" in message
    assert str(repository / "nothing" / "1") in message
    assert "'model.py'" in message


def test_config_override_without_backend_is_inferred(start_server: StartServer,
                                                     repository: Path) -> None:
    model_py = (PYBACKEND / "identity" / "1" / "model.py").read_text()
    write_model(repository, "overridden", model_py, "backend: \"python\"\n" + IDENTITY_CONFIG)
    server = explicit_server(start_server, repository)
    client = grpcclient.InferenceServerClient(server.url)
    override = {"input": [{"name": "INPUT0", "data_type": "TYPE_FP32", "dims": [-1]}],
                "output": [{"name": "OUTPUT0", "data_type": "TYPE_FP32", "dims": [-1]}]}
    client.load_model("overridden", config=json.dumps(override))
    assert client.get_model_config("overridden", as_json=True)["config"]["backend"] == "python"


# -- custom metrics, Logger, request accessors, is_ready -------------------------------------

def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


METRICS_MODEL = """
    import json
    import numpy as np
    import triton_python_backend_utils as pb_utils

    class TritonPythonModel:
        def initialize(self, args):
            self.requests = pb_utils.MetricFamily(
                name="custom_requests_total", description="Requests seen by the model",
                kind=pb_utils.MetricFamily.COUNTER).Metric(labels={"stage": "pre"})
            self.depth = pb_utils.MetricFamily(
                name="custom_depth", description="Last input size",
                kind=pb_utils.MetricFamily.GAUGE).Metric(labels={"stage": "pre"})
            self.sizes = pb_utils.MetricFamily(
                name="custom_sizes", description="Input sizes",
                kind=pb_utils.MetricFamily.HISTOGRAM).Metric(labels={}, buckets=[1, 4])
            pb_utils.Logger.log_info("metrics model initialized")

        def execute(self, requests):
            responses = []
            for request in requests:
                data = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
                self.requests.increment(1)
                self.depth.set(data.size)
                self.sizes.observe(data.size)
                pb_utils.Logger.log_info("info line from execute")
                pb_utils.Logger.log_warn("warn line from execute")
                pb_utils.Logger.log_error("error line from execute")
                pb_utils.Logger.log_verbose("verbose line from execute")
                report = json.dumps({"parameters": json.loads(request.parameters()),
                                     "flags": request.flags(),
                                     "correlation_id": request.correlation_id(),
                                     "timeout": request.timeout()})
                responses.append(pb_utils.InferenceResponse(output_tensors=[
                    pb_utils.Tensor("OUTPUT0", data),
                    pb_utils.Tensor("REPORT", np.array([report.encode()], dtype=np.object_))]))
            return responses
"""

METRICS_CONFIG = """
    backend: "python"
    max_batch_size: 0
    input [ { name: "INPUT0", data_type: TYPE_FP32, dims: [ -1 ] } ]
    output [ { name: "OUTPUT0", data_type: TYPE_FP32, dims: [ -1 ] },
             { name: "REPORT", data_type: TYPE_STRING, dims: [ 1 ] } ]
"""


def test_custom_metrics_logger_and_request_accessors(start_server: StartServer,
                                                      repository: Path) -> None:
    write_model(repository, "metrics_model", METRICS_MODEL, METRICS_CONFIG)
    server = start_server(None, repository=repository)
    client = grpcclient.InferenceServerClient(server.url)
    for size in (3, 6):
        tensor = grpcclient.InferInput("INPUT0", [size], "FP32")
        tensor.set_data_from_numpy(np.ones(size, dtype=np.float32))
        result = client.infer("metrics_model", [tensor], sequence_id=42, sequence_end=True,
                              timeout=5000, parameters={"color": "red"})
    report = json.loads(result.as_numpy("REPORT")[0])
    assert report == {"parameters": {"color": "red"}, "flags": 2, "correlation_id": 42,
                      "timeout": 5000}

    def metrics_arrived() -> bool:
        return 'custom_requests_total{stage="pre"} 2' in server.metrics_page()
    wait_for(metrics_arrived)
    page = server.metrics_page()
    assert "# TYPE custom_requests_total counter" in page
    assert "# HELP custom_depth Last input size" in page
    assert 'custom_depth{stage="pre"} 6' in page
    assert "# TYPE custom_sizes histogram" in page
    assert 'custom_sizes_bucket{le="1"} 0' in page
    assert 'custom_sizes_bucket{le="4"} 1' in page
    assert 'custom_sizes_bucket{le="+Inf"} 2' in page
    assert "custom_sizes_sum 9" in page and "custom_sizes_count 2" in page

    log = server.log()
    assert re.search(r"INFO \[model metrics_model version 1, instance [^\]]+\] model\.py:\d+: "
                     r"metrics model initialized", log), log
    assert "INFO [model metrics_model" in log and "info line from execute" in log
    assert "WARNING [model metrics_model" in log and "warn line from execute" in log
    assert "ERROR [model metrics_model" in log and "error line from execute" in log
    assert "verbose line from execute" not in log, "log_verbose shows only with --log-verbose"


READINESS_MODEL = """
    import os
    import triton_python_backend_utils as pb_utils

    class TritonPythonModel:
        def initialize(self, args):
            self.flag = os.path.join(args["model_repository"], "not_ready")

        def is_ready(self):
            return not os.path.exists(self.flag)

        def execute(self, requests):
            return [pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(
                "OUTPUT0", pb_utils.get_input_tensor_by_name(r, "INPUT0").as_numpy())])
                for r in requests]
"""


def test_is_ready_is_reflected_in_model_ready(start_server: StartServer,
                                             repository: Path) -> None:
    folder = write_model(repository, "moody", READINESS_MODEL,
                         'backend: "python"\n' + IDENTITY_CONFIG)
    server = start_server(None, repository=repository)
    client = grpcclient.InferenceServerClient(server.url)
    assert client.is_model_ready("moody")
    (folder / "not_ready").write_text("")
    wait_for(lambda: not client.is_model_ready("moody"))
    (folder / "not_ready").unlink()
    wait_for(lambda: client.is_model_ready("moody"))


# -- responses checked against the config -----------------------------------------------------

BAD_OUTPUT_MODEL = """
    import numpy as np
    import triton_python_backend_utils as pb_utils

    class TritonPythonModel:
        def execute(self, requests):
            responses = []
            for request in requests:
                data = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
                mode = int(data[0])
                if mode == 0:
                    out = pb_utils.Tensor("OUTPUT0", data)
                elif mode == 1:
                    out = pb_utils.Tensor("OUTPUTO", data)          # misspelled
                elif mode == 2:
                    out = pb_utils.Tensor("OUTPUT0", data.astype(np.float64))
                else:
                    out = pb_utils.Tensor("OUTPUT0", data.reshape(1, -1))  # extra dimension
                responses.append(pb_utils.InferenceResponse(output_tensors=[out]))
            return responses
"""


def test_outputs_are_checked_against_the_config(start_server: StartServer,
                                               repository: Path) -> None:
    write_model(repository, "sloppy", BAD_OUTPUT_MODEL, 'backend: "python"\n' + IDENTITY_CONFIG)
    server = start_server(None, repository=repository)
    client = grpcclient.InferenceServerClient(server.url)
    good = identity_infer(client, "sloppy", np.array([0, 1], dtype=np.float32))
    assert good.dtype == np.float32

    def error_for(mode: float) -> InferenceServerException:
        with pytest.raises(InferenceServerException) as info:
            identity_infer(client, "sloppy", np.array([mode, 1], dtype=np.float32))
        return info.value

    model_file = str(repository / "sloppy" / "1" / "model.py")
    misspelled = error_for(1)
    assert misspelled.status() == "StatusCode.INTERNAL"
    assert "returned output 'OUTPUTO', which is not declared in its configuration" in \
        str(misspelled.message())
    assert "error in the model, not in the request" in str(misspelled.message())
    wrong_type = error_for(2)
    assert ("configuration expects datatype TYPE_FP32 for output 'OUTPUT0', model provides "
            "TYPE_FP64") in str(wrong_type.message())
    wrong_shape = error_for(3)
    assert "with shape [1,2], which does not match the configured dims [-1]" in \
        str(wrong_shape.message())
    wait_for(lambda: server.log().count(model_file) >= 3)
    assert "ERROR" in server.log()
    # The model keeps serving good requests.
    np.testing.assert_array_equal(
        identity_infer(client, "sloppy", np.array([0, 5], dtype=np.float32)), [0, 5])


# -- model_warmup -----------------------------------------------------------------------------

WARMUP_MODEL = """
    import numpy as np
    import triton_python_backend_utils as pb_utils

    class TritonPythonModel:
        def initialize(self, args):
            self.seen = 0

        def execute(self, requests):
            responses = []
            for request in requests:
                data = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
                if request.request_id().startswith("warmup"):
                    self.seen += 1
                    pb_utils.Logger.log_info(
                        f"warm-up {self.seen}: {request.request_id()} shape {list(data.shape)} "
                        f"sum {float(data.sum())}")
                    if data.size and float(data.reshape(-1)[0]) == 7.0:
                        raise ValueError("warm-up data rejected")
                out = np.full(data.shape, float(self.seen), dtype=np.float32)
                responses.append(pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor("OUTPUT0", out)]))
            return responses
"""

WARMUP_CONFIG = """
    backend: "python"
    max_batch_size: 4
    input [ { name: "INPUT0", data_type: TYPE_FP32, dims: [ 3 ] } ]
    output [ { name: "OUTPUT0", data_type: TYPE_FP32, dims: [ 3 ] } ]
"""


def test_warmup_runs_before_ready_and_a_failing_one_fails_the_load(
        start_server: StartServer, repository: Path) -> None:
    write_model(repository, "warm", WARMUP_MODEL, WARMUP_CONFIG + """
        model_warmup [
          { name: "zeros" batch_size: 2 count: 2
            inputs { key: "INPUT0" value: { data_type: TYPE_FP32 dims: [ 3 ] zero_data: true } } },
          { name: "from_file" batch_size: 1
            inputs { key: "INPUT0" value: { data_type: TYPE_FP32 dims: [ 3 ]
                                            input_data_file: "ones" } } }
        ]
        """)
    (repository / "warm" / "warmup").mkdir()
    (repository / "warm" / "warmup" / "ones").write_bytes(np.ones(3, np.float32).tobytes())
    write_model(repository, "cold", WARMUP_MODEL, WARMUP_CONFIG + """
        model_warmup [ { name: "sevens" batch_size: 1
          inputs { key: "INPUT0" value: { data_type: TYPE_FP32 dims: [ 3 ]
                                          input_data_file: "sevens" } } } ]
        """)
    (repository / "cold" / "warmup").mkdir()
    (repository / "cold" / "warmup" / "sevens").write_bytes(np.full(3, 7, np.float32).tobytes())
    server = explicit_server(start_server, repository)
    client = grpcclient.InferenceServerClient(server.url)
    client.load_model("warm")
    log = server.log()
    assert "warm-up 1: warmup_zeros shape [2, 3] sum 0.0" in log
    assert "warm-up 2: warmup_zeros shape [2, 3] sum 0.0" in log
    assert "warm-up 3: warmup_from_file shape [1, 3] sum 3.0" in log
    # The instance that answers has run all three warm-up executions.
    answer = identity_infer(client, "warm", np.zeros((1, 3), np.float32))
    np.testing.assert_array_equal(answer, np.full((1, 3), 3.0, np.float32))

    message = load_error(client, "cold")
    assert "load failed for model 'cold'" in message
    assert "failed to run warmup sample 'sevens'" in message
    assert "warm-up data rejected" in message
    assert not client.is_model_ready("cold")


# -- pb_utils metric objects (pure logic) -----------------------------------------------------

def test_metric_objects_follow_tritons_rules() -> None:
    from shmserve.workers.backends.python import custom_metrics
    from shmserve.workers.backends.python import triton_python_backend_utils as pb_utils
    family = pb_utils.MetricFamily("unit_total", "Unit counter", pb_utils.MetricFamily.COUNTER)
    assert pb_utils.MetricFamily("unit_total", "Unit counter",
                                 pb_utils.MetricFamily.COUNTER) is family
    with pytest.raises(pb_utils.TritonModelException):
        pb_utils.MetricFamily("unit_total", "Other", pb_utils.MetricFamily.GAUGE)
    first = family.Metric(labels={"a": "1"})
    same = family.Metric(labels={"a": "1"})
    before = custom_metrics.generation
    first.increment(2)
    same.increment(3)
    assert first.value() == 5 and custom_metrics.generation > before
    with pytest.raises(pb_utils.TritonModelException):
        first.increment(-1)
    with pytest.raises(pb_utils.TritonModelException):
        first.set(1)
    with pytest.raises(pb_utils.TritonModelException):
        first.observe(1)
    histogram = pb_utils.MetricFamily("unit_hist", "Unit histogram",
                                      pb_utils.MetricFamily.HISTOGRAM)
    with pytest.raises(pb_utils.TritonModelException):
        histogram.Metric(labels={})
    observed = histogram.Metric(labels={}, buckets=[1.0, 2.0])
    for value in (0.5, 1.5, 9):
        observed.observe(value)
    with pytest.raises(pb_utils.TritonModelException):
        observed.value()
    snapshot = {name: (kind, metrics) for name, _, kind, metrics in custom_metrics.snapshot()}
    assert snapshot["unit_total"] == ("counter", [[[["a", "1"]], 5.0]])
    assert snapshot["unit_hist"] == ("histogram", [[[], [[1.0, 2.0], [1, 1, 1], 11.0, 3]]])
