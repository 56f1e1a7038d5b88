"""``sequence_batching { iterative_sequence: true }`` and the python backend's
``request.set_release_flags(TRITONSERVER_REQUEST_RELEASE_RESCHEDULE)``, on a real server.

A request without a sequence id becomes a sequence of its own; the model runs it over several
executions, rescheduling it until it is done, and other requests join the batches in between
(continuous batching). A model that reschedules without the option gets Triton's error.
"""

from __future__ import annotations

import concurrent.futures
import queue
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from shmserve.tests.serverproc import ServerProcess

# Runs each request STEPS times (counted by its correlation id) and answers how many runs it
# took, the sum of DATA seen on the last run, and the largest batch it was part of.
ITERATIVE_PY = """
    import os
    import numpy as np
    import triton_python_backend_utils as pb_utils

    class TritonPythonModel:
        def initialize(self, args):
            self.runs = {}
            self.widest = {}

        def execute(self, requests):
            responses = []
            for request in requests:
                key = request.correlation_id()
                runs = self.runs.get(key, 0) + 1
                widest = max(self.widest.get(key, 0), len(requests))
                steps = pb_utils.get_input_tensor_by_name(request, "STEPS").as_numpy()
                data = pb_utils.get_input_tensor_by_name(request, "DATA").as_numpy()
                if int(steps.reshape(-1)[0]) < 0 and runs == 2:
                    os._exit(3)   # the worker dies on the request's second run
                if runs < abs(int(steps.reshape(-1)[0])):
                    self.runs[key], self.widest[key] = runs, widest
                    request.set_release_flags(pb_utils.TRITONSERVER_REQUEST_RELEASE_RESCHEDULE)
                    responses.append(None)
                    continue
                self.runs.pop(key, None)
                self.widest.pop(key, None)
                responses.append(pb_utils.InferenceResponse(output_tensors=[
                    pb_utils.Tensor("RUNS", np.array([[runs]], np.int32)),
                    pb_utils.Tensor("SUM", np.array([[data.sum(dtype=np.float64)]], np.float64)),
                    pb_utils.Tensor("WIDEST", np.array([[widest]], np.int32))]))
            return responses
"""

# Decoupled: one response per run with the runs still to go, rescheduled until none are left.
COUNTDOWN_PY = """
    import numpy as np
    import triton_python_backend_utils as pb_utils

    class TritonPythonModel:
        def initialize(self, args):
            self.left = {}

        def execute(self, requests):
            for request in requests:
                key = request.correlation_id()
                if key not in self.left:
                    steps = pb_utils.get_input_tensor_by_name(request, "STEPS").as_numpy()
                    self.left[key] = int(steps.reshape(-1)[0])
                self.left[key] -= 1
                sender = request.get_response_sender()
                sender.send(pb_utils.InferenceResponse(output_tensors=[
                    pb_utils.Tensor("LEFT", np.array([[self.left[key]]], np.int32))]))
                if self.left[key] > 0:
                    request.set_release_flags(pb_utils.TRITONSERVER_REQUEST_RELEASE_RESCHEDULE)
                else:
                    del self.left[key]
                    sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            return None
"""

ITERATIVE_CONFIG = """
    name: "{name}"
    backend: "python"
    max_batch_size: 4
    input [
      {{ name: "STEPS", data_type: TYPE_INT32, dims: [ 1 ] }},
      {{ name: "DATA", data_type: TYPE_FP32, dims: [ -1 ] }}
    ]
    output [
      {{ name: "RUNS", data_type: TYPE_INT32, dims: [ 1 ] }},
      {{ name: "SUM", data_type: TYPE_FP64, dims: [ 1 ] }},
      {{ name: "WIDEST", data_type: TYPE_INT32, dims: [ 1 ] }}
    ]
    {scheduling}
    instance_group [ {{ count: 1, kind: KIND_CPU }} ]
"""

COUNTDOWN_CONFIG = """
    name: "countdown"
    backend: "python"
    max_batch_size: 4
    model_transaction_policy { decoupled: true }
    input [ { name: "STEPS", data_type: TYPE_INT32, dims: [ 1 ] } ]
    output [ { name: "LEFT", data_type: TYPE_INT32, dims: [ 1 ] } ]
    sequence_batching { iterative_sequence: true oldest { max_candidate_sequences: 4 } }
    instance_group [ { count: 1, kind: KIND_CPU } ]
"""

ITERATIVE = "sequence_batching { iterative_sequence: true oldest { max_candidate_sequences: 4 } }"
MODELS = {
    "iterative": (ITERATIVE_PY, ITERATIVE_CONFIG.format(name="iterative", scheduling=ITERATIVE)),
    "iterative_direct": (ITERATIVE_PY, ITERATIVE_CONFIG.format(
        name="iterative_direct", scheduling="sequence_batching { iterative_sequence: true }")),
    "not_iterative": (ITERATIVE_PY, ITERATIVE_CONFIG.format(
        name="not_iterative", scheduling="dynamic_batching { }")),
    "countdown": (COUNTDOWN_PY, COUNTDOWN_CONFIG),
}
RESCHEDULE_REFUSED = ("Request is released with TRITONSERVER_REQUEST_RELEASE_RESCHEDULE, while "
                      "the model is not configured to handle such a flag.")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    repo = tmp_path_factory.mktemp("iterative") / "models"
    for name, (model_py, config) in MODELS.items():
        folder = repo / name
        (folder / "1").mkdir(parents=True)
        (folder / "config.pbtxt").write_text(textwrap.dedent(config))
        (folder / "1" / "model.py").write_text(textwrap.dedent(model_py))
    with ServerProcess(Path(repo)) as proc:
        proc.wait_ready()
        yield proc


@pytest.fixture
def client(server: ServerProcess) -> Iterator[grpcclient.InferenceServerClient]:
    with grpcclient.InferenceServerClient(server.url) as made:
        yield made


def _inputs(steps: int, data: np.ndarray) -> list[grpcclient.InferInput]:
    tensors = [grpcclient.InferInput("STEPS", [1, 1], "INT32"),
               grpcclient.InferInput("DATA", [1, data.size], "FP32")]
    tensors[0].set_data_from_numpy(np.array([[steps]], np.int32))
    tensors[1].set_data_from_numpy(data.reshape(1, -1))
    return tensors


def _run(client: grpcclient.InferenceServerClient, model: str, steps: int,
         data: np.ndarray) -> tuple[int, float, int]:
    result = client.infer(model, _inputs(steps, data))
    return (int(result.as_numpy("RUNS")[0][0]), float(result.as_numpy("SUM")[0][0]),
            int(result.as_numpy("WIDEST")[0][0]))


@pytest.mark.parametrize("model", ["iterative", "iterative_direct"])
def test_a_request_runs_until_the_model_answers_it(client: grpcclient.InferenceServerClient,
                                                   model: str) -> None:
    data = np.arange(8, dtype=np.float32)
    before = client.get_inference_statistics(model).model_stats[0]
    runs, total, _ = _run(client, model, 5, data)
    assert (runs, total) == (5, float(data.sum()))
    after = client.get_inference_statistics(model).model_stats[0]
    assert after.inference_stats.success.count == before.inference_stats.success.count + 1
    assert after.execution_count >= before.execution_count + 5


def test_large_inputs_survive_every_run(client: grpcclient.InferenceServerClient) -> None:
    """Over 64 KiB: the input is staged into the instance's arena, and again for each run."""
    data = np.random.default_rng(7).standard_normal(1 << 16, dtype=np.float32)
    runs, total, _ = _run(client, "iterative", 4, data)
    assert runs == 4
    assert total == pytest.approx(float(data.sum(dtype=np.float64)), rel=1e-9)


def test_requests_share_batches_while_they_iterate(
        client: grpcclient.InferenceServerClient, server: ServerProcess) -> None:
    """Four requests of different lengths at once: each gets its own answer, and runs of
    different requests went through the model together."""
    steps = [3, 6, 9, 12]
    with concurrent.futures.ThreadPoolExecutor(len(steps)) as pool, \
            grpcclient.InferenceServerClient(server.url) as other:
        clients = [client, other, client, other]
        futures = [pool.submit(_run, c, "iterative", n, np.full(4, n, np.float32))
                   for c, n in zip(clients, steps, strict=True)]
        answers = [future.result(timeout=60) for future in futures]
    assert [(runs, total) for runs, total, _ in answers] == [(n, 4.0 * n) for n in steps]
    assert max(widest for _, _, widest in answers) > 1


def test_a_model_without_the_option_cannot_reschedule(
        client: grpcclient.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException) as raised:
        _run(client, "not_iterative", 2, np.ones(2, np.float32))
    assert RESCHEDULE_REFUSED in raised.value.message()
    # The instance goes on serving: a request that needs one run is answered.
    assert _run(client, "not_iterative", 1, np.full(3, 2, np.float32))[1] == 6.0


def test_a_decoupled_model_streams_across_its_runs(server: ServerProcess) -> None:
    """Eight requests on one stream, more than the model's four sequence slots: each slot
    frees when its request's final response went."""
    steps = [3, 2, 1, 1, 1, 1, 1, 1]
    answers: queue.Queue[Any] = queue.Queue()
    with grpcclient.InferenceServerClient(server.url) as client:
        client.start_stream(callback=lambda result, error: answers.put(error or result))
        for index, count in enumerate(steps):
            steps_input = grpcclient.InferInput("STEPS", [1, 1], "INT32")
            steps_input.set_data_from_numpy(np.array([[count]], np.int32))
            client.async_stream_infer("countdown", [steps_input], request_id=f"r{index}")
        got: dict[str, list[int]] = {f"r{index}": [] for index in range(len(steps))}
        for _ in range(sum(steps)):
            item = answers.get(timeout=30)
            assert not isinstance(item, InferenceServerException), item
            got[item.get_response().id].append(int(item.as_numpy("LEFT")[0][0]))
        client.stop_stream()
    assert got == {f"r{index}": list(range(count - 1, -1, -1))
                   for index, count in enumerate(steps)}


def test_a_worker_dying_mid_iteration_fails_the_request_only(
        client: grpcclient.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException) as died:
        _run(client, "iterative", -4, np.ones(2, np.float32))
    assert died.value.status() == "StatusCode.UNAVAILABLE"
    deadline = time.monotonic() + 30
    while not client.is_model_ready("iterative") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _run(client, "iterative", 3, np.ones(2, np.float32))[:2] == (3, 2.0)
