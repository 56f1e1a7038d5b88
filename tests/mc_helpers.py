"""Helpers shared by the model-control and repository-agent end-to-end tests.

The test model is tests/models/mc_tunable (OUTPUT0 = INPUT0 + offset); :func:`write_model`
copies it into a repository under any name with a generated config.pbtxt.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from shmserve.tests.serverproc import TEST_MODELS

TUNABLE = TEST_MODELS / "mc_tunable"
T = TypeVar("T")


def pbtxt_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def config_text(name: str, params: Mapping[str, str] | None = None,
                agents: Sequence[tuple[str, Mapping[str, str]]] = (),
                instances: int = 1) -> str:
    """A config.pbtxt for the mc_tunable model.py under ``name``."""
    lines = [
        f"name: {pbtxt_string(name)}",
        'backend: "python"',
        "max_batch_size: 0",
        'input [ { name: "INPUT0", data_type: TYPE_INT32, dims: [ -1 ] } ]',
        'output [ { name: "OUTPUT0", data_type: TYPE_INT32, dims: [ -1 ] } ]',
        f"instance_group [ {{ count: {instances}, kind: KIND_CPU }} ]",
    ]
    for key, value in (params or {}).items():
        lines.append(f"parameters {{ key: {pbtxt_string(key)} "
                     f"value: {{ string_value: {pbtxt_string(value)} }} }}")
    if agents:
        entries = []
        for agent, agent_params in agents:
            pairs = ", ".join(f"{{ key: {pbtxt_string(k)}, value: {pbtxt_string(v)} }}"
                              for k, v in agent_params.items())
            entries.append(f"{{ name: {pbtxt_string(agent)}, parameters [ {pairs} ] }}")
        lines.append("model_repository_agents { agents [ " + ", ".join(entries) + " ] }")
    return "\n".join(lines) + "\n"


def config_json(name: str, params: Mapping[str, str] | None = None, instances: int = 1) -> str:
    """The same model as a RepositoryModelLoad "config" override (Triton's JSON form)."""
    import json
    config: dict[str, Any] = {
        "name": name, "backend": "python", "max_batch_size": 0,
        "input": [{"name": "INPUT0", "data_type": "TYPE_INT32", "dims": [-1]}],
        "output": [{"name": "OUTPUT0", "data_type": "TYPE_INT32", "dims": [-1]}],
        "instance_group": [{"count": instances, "kind": "KIND_CPU"}],
        "parameters": {k: {"string_value": v} for k, v in (params or {}).items()},
    }
    return json.dumps(config)


def write_model(repo: Path, name: str, params: Mapping[str, str] | None = None,
                agents: Sequence[tuple[str, Mapping[str, str]]] = (), instances: int = 1,
                atomic: bool = False) -> Path:
    """Put the mc_tunable model into ``repo/name`` (atomically: built aside, then renamed)."""
    target = repo / name
    build = repo.parent / f".build-{name}-{time.monotonic_ns()}" if atomic else target
    (build / "1").mkdir(parents=True)
    shutil.copy(TUNABLE / "1" / "model.py", build / "1" / "model.py")
    (build / "config.pbtxt").write_text(config_text(name, params, agents, instances))
    if atomic:
        os.rename(build, target)
    return target


def model_py() -> bytes:
    return (TUNABLE / "1" / "model.py").read_bytes()


def infer(client: grpcclient.InferenceServerClient, model: str, values: Sequence[int],
          version: str = "", timeout: float = 30.0) -> np.ndarray:
    data = np.asarray(values, dtype=np.int32)
    tensor = grpcclient.InferInput("INPUT0", list(data.shape), "INT32")
    tensor.set_data_from_numpy(data)
    result = client.infer(model, [tensor], model_version=version, client_timeout=timeout)
    out = result.as_numpy("OUTPUT0")
    assert out is not None
    return np.asarray(out)


def infer_simple(client: grpcclient.InferenceServerClient, base: int = 0) -> None:
    """One request to the example `simple` model, checked."""
    in0 = np.arange(base, base + 16, dtype=np.int32).reshape(1, 16)
    in1 = np.ones((1, 16), dtype=np.int32)
    inputs = [grpcclient.InferInput("INPUT0", [1, 16], "INT32"),
              grpcclient.InferInput("INPUT1", [1, 16], "INT32")]
    inputs[0].set_data_from_numpy(in0)
    inputs[1].set_data_from_numpy(in1)
    result = client.infer("simple", inputs, client_timeout=30.0)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), in0 + in1)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), in0 - in1)


def infer_identity(client: grpcclient.InferenceServerClient, size: int = 8) -> None:
    data = np.arange(size, dtype=np.float32)
    tensor = grpcclient.InferInput("INPUT0", [size], "FP32")
    tensor.set_data_from_numpy(data)
    result = client.infer("identity_fp32", [tensor], client_timeout=30.0)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), data)


def index(client: grpcclient.InferenceServerClient) -> dict[str, list[dict[str, str]]]:
    """RepositoryIndex as {name: [{"version", "state", "reason"}, ...]}."""
    answer = client.get_model_repository_index(as_json=True)
    entries: dict[str, list[dict[str, str]]] = {}
    for model in answer.get("models", []):
        entries.setdefault(model["name"], []).append(
            {key: model.get(key, "") for key in ("version", "state", "reason")})
    return entries


def states(client: grpcclient.InferenceServerClient, name: str) -> list[str]:
    return [entry["state"] for entry in index(client).get(name, [])]


def rpc_error(call: Callable[[], object]) -> InferenceServerException:
    """Run ``call``, which must fail; return the error."""
    try:
        call()
    except InferenceServerException as exc:
        return exc
    raise AssertionError("the call succeeded")


def wait_until(predicate: Callable[[], T], timeout: float, what: str,
               interval: float = 0.05) -> T:
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except (InferenceServerException, AssertionError, OSError) as exc:
            last_error = exc
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what} "
                       f"(last error: {last_error!r})")


def read_lines(path: Path) -> list[str]:
    try:
        return path.read_text().splitlines()
    except FileNotFoundError:
        return []
