"""The bundled example repository (examples/models), served whole as the README's first command
serves it: every model loads, and the ones named after Triton's examples (simple, simple_string,
simple_identity, repeat_int32) answer as Triton's client examples expect."""

from __future__ import annotations

import queue
import shutil
from collections.abc import Iterator
from functools import partial
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from shmserve.tests.conftest import assert_no_arenas
from shmserve.tests.serverproc import EXAMPLES, ServerProcess


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    repo = tmp_path_factory.mktemp("examples") / "models"
    shutil.copytree(EXAMPLES, repo)
    served = ServerProcess(repo)
    served.wait_ready()
    yield served
    assert served.stop() == 0, served.log()
    assert_no_arenas(served.pid)


@pytest.fixture
def client(server: ServerProcess) -> Iterator[grpcclient.InferenceServerClient]:
    triton = grpcclient.InferenceServerClient(server.url)
    yield triton
    triton.close()


def test_every_example_model_is_ready(client: grpcclient.InferenceServerClient) -> None:
    names = sorted(path.name for path in EXAMPLES.iterdir() if path.is_dir())
    index = client.get_model_repository_index().models
    assert sorted((model.name, model.state) for model in index) == [
        (name, "READY") for name in names]


def _strings(values: Any) -> np.ndarray:
    return np.array([str(value).encode() for value in np.ravel(values)],
                    dtype=np.object_).reshape(np.shape(values))


def test_simple_string_adds_and_subtracts_integers_written_as_strings(
        server: ServerProcess) -> None:
    client = httpclient.InferenceServerClient(server.http_url)
    in0 = np.arange(16, dtype=np.int32).reshape(1, 16)
    in1 = np.full((1, 16), 3, dtype=np.int32)
    inputs = [httpclient.InferInput("INPUT0", [1, 16], "BYTES"),
              httpclient.InferInput("INPUT1", [1, 16], "BYTES")]
    inputs[0].set_data_from_numpy(_strings(in0))
    inputs[1].set_data_from_numpy(_strings(in1))
    result = client.infer("simple_string", inputs)
    assert result.as_numpy("OUTPUT0").tolist() == _strings(in0 + in1).tolist()
    assert result.as_numpy("OUTPUT1").tolist() == _strings(in0 - in1).tolist()
    inputs[0].set_data_from_numpy(_strings(np.full((1, 16), "x")))
    with pytest.raises(InferenceServerException) as caught:
        client.infer("simple_string", inputs)
    assert "inputs must be integers as strings" in caught.value.message()


def test_simple_identity_returns_any_bytes(client: grpcclient.InferenceServerClient) -> None:
    data = np.array([[b"he\x00llo", b"", "ünï".encode()]], dtype=np.object_)
    tensor = grpcclient.InferInput("INPUT0", [1, 3], "BYTES")
    tensor.set_data_from_numpy(data)
    assert client.infer("simple_identity", [tensor]).as_numpy("OUTPUT0").tolist() == \
        data.tolist()


def _repeat(server: ServerProcess, values: list[int], delays: list[int]) -> list[Any]:
    """One repeat_int32 request on a gRPC stream; its responses (or error) in order."""
    answers: queue.Queue[Any] = queue.Queue()

    def callback(result: Any, error: Any) -> None:
        answers.put(error if error is not None else result)

    inputs = [grpcclient.InferInput("IN", [len(values)], "INT32"),
              grpcclient.InferInput("DELAY", [len(delays)], "UINT32"),
              grpcclient.InferInput("WAIT", [1], "UINT32")]
    inputs[0].set_data_from_numpy(np.array(values, np.int32))
    inputs[1].set_data_from_numpy(np.array(delays, np.uint32))
    inputs[2].set_data_from_numpy(np.array([5], np.uint32))
    with grpcclient.InferenceServerClient(server.url) as client:
        client.start_stream(callback=partial(callback))
        client.async_stream_infer("repeat_int32", inputs, enable_empty_final_response=True)
        got: list[Any] = []
        while True:
            item = answers.get(timeout=20)
            if isinstance(item, InferenceServerException):
                return [*got, item]
            if item.get_response().parameters["triton_final_response"].bool_param:
                return got
            got.append(item)


def test_repeat_int32_streams_one_response_per_value(server: ServerProcess) -> None:
    responses = _repeat(server, [100, 101, 102, 103], [1, 1, 1, 1])
    assert [(int(r.as_numpy("OUT")[0]), int(r.as_numpy("IDX")[0])) for r in responses] == [
        (100, 0), (101, 1), (102, 2), (103, 3)]
    [error] = _repeat(server, [1, 2], [1])
    assert "expected DELAY to have 2 elements, got 1" in error.message()

