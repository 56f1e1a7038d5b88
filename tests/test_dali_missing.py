"""A ``backend: "dali"`` model where NVIDIA DALI is not installed: the load fails naming the
extra to install, and the other models serve. Runs everywhere: where DALI is installed the server
runs in an environment without it (tests/environments.py)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from shmserve.tests.conftest import assert_no_arenas
from shmserve.tests.environments import python_without
from shmserve.tests.serverproc import ServerProcess, build_repository


def test_dali_model_without_dali_fails_naming_the_extra(tmp_path: Path) -> None:
    python = python_without("nvidia.dali", tmp_path / "env")
    probe = subprocess.run([python, "-c", "import shmserve.daemon, shmserve.workers.backends.dali;"
                            " import nvidia.dali"], capture_output=True, text=True)
    assert "No module named 'nvidia" in probe.stderr, probe.stderr   # shmserve is there, DALI not
    repo = build_repository(tmp_path / "repo", ["dali_no_package", "simple"])
    (repo / "dali_no_package" / "1").mkdir(exist_ok=True)
    # Never read: the backend needs DALI before it opens the model file.
    (repo / "dali_no_package" / "1" / "model.dali").write_bytes(b"\x00")
    server = ServerProcess(repo, "--model-control-mode", "explicit", "--load-model", "simple",
                           python=python)
    try:
        server.wait_ready()
        client = grpcclient.InferenceServerClient(server.url)
        with pytest.raises(InferenceServerException) as caught:
            client.load_model("dali_no_package")
        message = caught.value.message()
        assert "pip install 'shmserve[dali]'" in message, message
        assert "the dali backend needs NVIDIA DALI in the worker" in message, message
        assert not client.is_model_ready("dali_no_package")
        inputs = []
        for name in ("INPUT0", "INPUT1"):
            tensor = grpcclient.InferInput(name, [1, 16], "INT32")
            tensor.set_data_from_numpy(np.arange(16, dtype=np.int32).reshape(1, 16))
            inputs.append(tensor)
        result = client.infer("simple", inputs)
        assert result.as_numpy("OUTPUT0").tolist() == [list(range(0, 32, 2))]
        client.close()
    finally:
        assert server.stop() == 0, server.log()
    assert_no_arenas(server.pid)
