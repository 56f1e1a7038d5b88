"""Python-backend parity with Triton on a real server (issue 16 item 4): auto-complete,
backend inference, custom metrics, Logger, request accessors, is_ready, output checks,
warm-up. Model folders are written per test so each feature is exercised in isolation."""

from __future__ import annotations

import shutil
import textwrap
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
    import json
    model_py = (PYBACKEND / "identity" / "1" / "model.py").read_text()
    write_model(repository, "overridden", model_py, "backend: \"python\"\n" + IDENTITY_CONFIG)
    server = explicit_server(start_server, repository)
    client = grpcclient.InferenceServerClient(server.url)
    override = {"input": [{"name": "INPUT0", "data_type": "TYPE_FP32", "dims": [-1]}],
                "output": [{"name": "OUTPUT0", "data_type": "TYPE_FP32", "dims": [-1]}]}
    client.load_model("overridden", config=json.dumps(override))
    assert client.get_model_config("overridden", as_json=True)["config"]["backend"] == "python"
