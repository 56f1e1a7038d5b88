"""The python backend's model loading API (``pb_utils.load_model``, ``unload_model``,
``is_model_ready``) from a model's execute, on a real server: the loads and unloads are the
server's own (tritonclient sees them), with the "config" and "file:" overrides, Triton's
errors, and the explicit-mode rule."""

from __future__ import annotations

import json
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from shmserve.client.errors import ShmserveError
from shmserve.client.local_channel import LocalChannel
from shmserve.protos.local_messages import ModelControl
from shmserve.tests.conftest import StartServer
from shmserve.tests.serverproc import ServerProcess, build_repository

READY, LOAD, UNLOAD, LOAD_FILES, LOAD_CONFIG = range(5)

# A model the loader creates from files it sends: OUT = IN * 3.
TRIPLE_PY = """
import triton_python_backend_utils as pb_utils

class TritonPythonModel:
    def execute(self, requests):
        return [pb_utils.InferenceResponse([pb_utils.Tensor(
            "OUT", pb_utils.get_input_tensor_by_name(r, "IN").as_numpy() * 3)])
            for r in requests]
"""
TRIPLE_CONFIG = {
    "backend": "python", "max_batch_size": 0,
    "input": [{"name": "IN", "data_type": "TYPE_INT32", "dims": [2]}],
    "output": [{"name": "OUT", "data_type": "TYPE_INT32", "dims": [2]}],
}

LOADER_PY = f"""
import json
import numpy as np
import triton_python_backend_utils as pb_utils

TRIPLE_PY = {TRIPLE_PY!r}
TRIPLE_CONFIG = {json.dumps(TRIPLE_CONFIG)!r}


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            action = int(pb_utils.get_input_tensor_by_name(request, "ACTION").as_numpy()[0])
            name = pb_utils.get_input_tensor_by_name(request, "NAME").as_numpy()[0].decode()
            error = ""
            try:
                if action == {LOAD}:
                    pb_utils.load_model(model_name=name)
                elif action == {UNLOAD}:
                    pb_utils.unload_model(model_name=name)
                elif action == {LOAD_FILES}:
                    pb_utils.load_model(name, config=TRIPLE_CONFIG,
                                        files={{"file:1/model.py": TRIPLE_PY.encode()}})
                elif action == {LOAD_CONFIG}:
                    config = json.dumps({{
                        "backend": "python", "max_batch_size": 2, "dynamic_batching": {{}},
                        "input": [{{"name": n, "data_type": "TYPE_INT32", "dims": [16]}}
                                  for n in ("INPUT0", "INPUT1")],
                        "output": [{{"name": n, "data_type": "TYPE_INT32", "dims": [16]}}
                                   for n in ("OUTPUT0", "OUTPUT1")]}})
                    pb_utils.load_model(name, config=config)
                ready = pb_utils.is_model_ready(model_name=name)
            except pb_utils.TritonModelException as exc:
                ready, error = False, exc.message()
            responses.append(pb_utils.InferenceResponse([
                pb_utils.Tensor("READY", np.array([ready], dtype=np.bool_)),
                pb_utils.Tensor("ERROR", np.array([error.encode()], dtype=np.object_))]))
        return responses
"""

LOADER_CONFIG = """
name: "loader"
backend: "python"
max_batch_size: 0
input [ { name: "ACTION", data_type: TYPE_INT32, dims: [ 1 ] },
        { name: "NAME", data_type: TYPE_STRING, dims: [ 1 ] } ]
output [ { name: "READY", data_type: TYPE_BOOL, dims: [ 1 ] },
         { name: "ERROR", data_type: TYPE_STRING, dims: [ 1 ] } ]
"""


def _repository(root: Path) -> Path:
    repo = build_repository(root, ["simple"])
    (repo / "loader" / "1").mkdir(parents=True)
    (repo / "loader" / "config.pbtxt").write_text(textwrap.dedent(LOADER_CONFIG))
    (repo / "loader" / "1" / "model.py").write_text(LOADER_PY)
    return repo


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    repo = _repository(tmp_path_factory.mktemp("loading") / "models")
    with ServerProcess(repo, "--model-control-mode", "explicit", "--load-model", "loader",
                       "--local-socket", str(repo.parent / "shmserve.sock")) as proc:
        proc.wait_ready()
        yield proc


def _ask(url: str, action: int, name: str) -> tuple[bool, str]:
    """What the loader reports after ``action`` on ``name``: (ready, error text)."""
    action_tensor = grpcclient.InferInput("ACTION", [1], "INT32")
    action_tensor.set_data_from_numpy(np.array([action], dtype=np.int32))
    name_tensor = grpcclient.InferInput("NAME", [1], "BYTES")
    name_tensor.set_data_from_numpy(np.array([name.encode()], dtype=np.object_))
    with grpcclient.InferenceServerClient(url) as client:
        result = client.infer("loader", [action_tensor, name_tensor])
    return bool(result.as_numpy("READY")[0]), result.as_numpy("ERROR")[0].decode()


def test_load_and_unload_from_execute(server: ServerProcess) -> None:
    client = grpcclient.InferenceServerClient(server.url)
    assert _ask(server.url, READY, "simple") == (False, "")
    assert _ask(server.url, LOAD, "simple") == (True, "")
    assert client.is_model_ready("simple")
    inputs = [grpcclient.InferInput(name, [1, 16], "INT32") for name in ("INPUT0", "INPUT1")]
    for tensor in inputs:
        tensor.set_data_from_numpy(np.ones((1, 16), dtype=np.int32))
    assert client.infer("simple", inputs).as_numpy("OUTPUT0").tolist() == [[2] * 16]
    assert _ask(server.url, UNLOAD, "simple") == (False, "")
    assert not client.is_model_ready("simple")


def test_load_with_files_and_config_overrides(server: ServerProcess) -> None:
    client = grpcclient.InferenceServerClient(server.url)
    assert _ask(server.url, LOAD_FILES, "triple") == (True, "")
    tensor = grpcclient.InferInput("IN", [2], "INT32")
    tensor.set_data_from_numpy(np.array([2, 5], dtype=np.int32))
    assert client.infer("triple", [tensor]).as_numpy("OUT").tolist() == [6, 15]

    assert _ask(server.url, LOAD_CONFIG, "simple") == (True, "")
    config = client.get_model_config("simple").config
    assert config.max_batch_size == 2 and config.HasField("dynamic_batching")
    assert _ask(server.url, UNLOAD, "simple") == (False, "")
    assert _ask(server.url, UNLOAD, "triple") == (False, "")


def test_errors_reach_the_model_as_triton_model_exception(server: ServerProcess) -> None:
    ready, error = _ask(server.url, LOAD, "no_such_model")
    assert not ready and "no_such_model" in error, error
    ready, error = _ask(server.url, LOAD, "loader")
    assert not ready and "cannot load itself" in error, error
    # The loader still serves.
    assert _ask(server.url, READY, "simple") == (False, "")


def test_load_is_refused_unless_model_control_is_explicit(start_server: StartServer,
                                                           tmp_path: Path) -> None:
    repo = _repository(tmp_path / "none_mode")
    server = start_server(None, repository=repo)
    ready, error = _ask(server.url, UNLOAD, "simple")
    assert not ready and "explicit model load / unload is not allowed" in error, error
    with grpcclient.InferenceServerClient(server.url) as client:
        assert client.is_model_ready("simple")


def test_clients_local_channels_cannot_load_models(server: ServerProcess) -> None:
    """The "model" operation is for workers' channels; a client's local channel is refused
    (clients load models over gRPC or HTTP, where the restricted-API rules apply)."""
    channel = LocalChannel(str(Path(server.repository).parent / "shmserve.sock"))
    try:
        with pytest.raises(ShmserveError, match="unknown operation 'model'"):
            channel.call(ModelControl("load", "simple").message(), timeout=10)
    finally:
        channel.close()
    with grpcclient.InferenceServerClient(server.url) as client:
        assert not client.is_model_ready("simple")

