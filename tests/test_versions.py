"""version_policy: latest (default 1, or N), all, specific; requests address versions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from shmserve.tests.conftest import StartServer

MODEL = '''
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.version = int(args["model_version"])

    def execute(self, requests):
        out = np.array([self.version], dtype=np.int32)
        return [pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("VERSION", out)])
                for _ in requests]
'''


def _repository(root: Path, policy: str) -> Path:
    model = root / "repo" / "versioned"
    for version in ("1", "2", "3", "07", "notes"):
        (model / version).mkdir(parents=True)
        (model / version / "model.py").write_text(MODEL)
    (model / "config.pbtxt").write_text(f'''
backend: "python"
max_batch_size: 0
input [ {{ name: "IN", data_type: TYPE_INT32, dims: [ 1 ] }} ]
output [ {{ name: "VERSION", data_type: TYPE_INT32, dims: [ 1 ] }} ]
{policy}
''')
    return root / "repo"


def _version(client: grpcclient.InferenceServerClient, version: str = "") -> int:
    tensor = grpcclient.InferInput("IN", [1], "INT32")
    tensor.set_data_from_numpy(np.zeros(1, np.int32))
    return int(client.infer("versioned", [tensor], model_version=version).as_numpy("VERSION")[0])


@pytest.mark.parametrize("policy,loaded", [
    ("", ["3"]),
    ("version_policy: { latest: { num_versions: 2 } }", ["2", "3"]),
    ("version_policy: { all: {} }", ["1", "2", "3"]),
    ("version_policy: { specific: { versions: [ 1, 3, 9 ] } }", ["1", "3"]),
])
def test_version_policy(start_server: StartServer, tmp_path: Path, policy: str,
                        loaded: list[str]) -> None:
    server = start_server(repository=_repository(tmp_path, policy))
    with grpcclient.InferenceServerClient(server.url) as client:
        index = sorted(m.version for m in client.get_model_repository_index().models)
        assert index == loaded
        assert list(client.get_model_metadata("versioned").versions) == loaded
        for version in ("1", "2", "3"):
            assert client.is_model_ready("versioned", version) == (version in loaded)
        assert _version(client) == int(loaded[-1])   # "" = the highest ready version
        for version in loaded:
            assert _version(client, version) == int(version)
        missing = next(v for v in ("1", "2", "3") if v not in loaded) if len(loaded) < 3 else "7"
        with pytest.raises(InferenceServerException) as error:
            _version(client, missing)
        assert error.value.status() == "StatusCode.NOT_FOUND"
        assert error.value.message() == (f"Request for unknown model: 'versioned' version "
                                         f"{missing} is not found")
