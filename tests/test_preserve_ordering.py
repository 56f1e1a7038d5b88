"""``dynamic_batching { preserve_ordering: true }`` on a real server: two instances, a slow
request then a fast one on one tritonclient stream (and through the local channel); the fast
one's answer waits for the slow one's. The same model without the option answers the fast one
first, which shows what the option changes."""

from __future__ import annotations

import queue
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from shmserve.client import Client
from shmserve.tests.serverproc import ServerProcess

SLOW_SECONDS = 1.0

MODEL_PY = """
    import time
    import triton_python_backend_utils as pb_utils

    class TritonPythonModel:
        def execute(self, requests):
            responses = []
            for request in requests:
                seconds = pb_utils.get_input_tensor_by_name(request, "SECONDS").as_numpy()
                time.sleep(float(seconds.reshape(-1)[0]))
                responses.append(pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor("SLEPT", seconds.copy())]))
            return responses
"""


def _config(name: str, ordered: bool) -> str:
    return f"""
        name: "{name}"
        backend: "python"
        max_batch_size: 4
        input [ {{ name: "SECONDS", data_type: TYPE_FP32, dims: [ 1 ] }} ]
        output [ {{ name: "SLEPT", data_type: TYPE_FP32, dims: [ 1 ] }} ]
        instance_group [ {{ count: 2, kind: KIND_CPU }} ]
        dynamic_batching {{ preserve_ordering: {"true" if ordered else "false"} }}
    """


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("ordering")
    repo = root / "models"
    for name, ordered in (("ordered", True), ("unordered", False)):
        folder = repo / name
        (folder / "1").mkdir(parents=True)
        (folder / "config.pbtxt").write_text(textwrap.dedent(_config(name, ordered)))
        (folder / "1" / "model.py").write_text(textwrap.dedent(MODEL_PY))
    with ServerProcess(repo, "--local-socket", str(root / "shmserve.sock")) as proc:
        proc.wait_ready()
        yield proc


def _seconds(value: float) -> list[grpcclient.InferInput]:
    tensor = grpcclient.InferInput("SECONDS", [1, 1], "FP32")
    tensor.set_data_from_numpy(np.array([[value]], dtype=np.float32))
    return [tensor]


def _stream_order(server: ServerProcess, model: str) -> list[str]:
    """The request ids of a slow then a fast request's answers, in the order they came."""
    answers: queue.Queue[Any] = queue.Queue()
    client = grpcclient.InferenceServerClient(server.url)
    client.start_stream(callback=lambda result, error: answers.put(error or result))
    try:
        client.async_stream_infer(model, _seconds(SLOW_SECONDS), request_id="slow")
        client.async_stream_infer(model, _seconds(0.0), request_id="fast")
        results = [answers.get(timeout=30) for _ in range(2)]
    finally:
        client.stop_stream()
        client.close()
    for result in results:
        assert not isinstance(result, Exception), result
    return [result.get_response().id for result in results]


def test_answers_leave_in_request_order(server: ServerProcess) -> None:
    assert _stream_order(server, "ordered") == ["slow", "fast"]


def test_without_the_option_the_fast_answer_comes_first(server: ServerProcess) -> None:
    assert _stream_order(server, "unordered") == ["fast", "slow"]


def test_local_channel_answers_wait_their_turn(server: ServerProcess) -> None:
    """Through the local channel a worker would answer its client directly: with the option,
    answers go through the core so that they can wait."""
    order: list[str] = []
    lock = threading.Lock()

    def call(client: Client, label: str, seconds: float) -> None:
        out = client.infer("ordered", {"SECONDS": np.array([[seconds]], dtype=np.float32)})
        assert out["SLEPT"][0, 0] == seconds
        with lock:
            order.append(label)

    def dispatched(client: Client) -> int:
        return int(client.model_statistics("ordered")[0].inference_stats.queue.count)

    socket_path = Path(server.repository).parent / "shmserve.sock"
    with Client(f"local://{socket_path}") as client:
        before = dispatched(client)
        slow = threading.Thread(target=call, args=(client, "slow", SLOW_SECONDS))
        slow.start()
        deadline = time.monotonic() + 20
        while dispatched(client) == before and time.monotonic() < deadline:
            time.sleep(0.01)  # the slow request is admitted (and sent) before the fast one
        fast = threading.Thread(target=call, args=(client, "fast", 0.0))
        fast.start()
        slow.join(30)
        fast.join(30)
    assert order == ["slow", "fast"]
