"""Request tracing in Triton's "triton" mode: --trace-config (and tritonserver's older trace
flags), the trace API over gRPC and HTTP with Triton's texts, and the trace file's JSON,
from a real server and tritonclient."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from shmserve.tests.serverproc import ServerProcess, build_repository
from shmserve.tests.simple_calls import infer_simple

ORDER = ["REQUEST_START", "QUEUE_START", "COMPUTE_START", "COMPUTE_INPUT_END",
         "COMPUTE_OUTPUT_START", "COMPUTE_END", "REQUEST_END"]


def _traces(objects: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Triton's trace file by trace id: the model object and its timestamps in order."""
    traces: dict[int, dict[str, Any]] = {}
    for entry in objects:
        trace = traces.setdefault(entry["id"], {"timestamps": []})
        if "model_name" in entry:
            trace.update(entry)
        else:
            trace["timestamps"] += entry["timestamps"]
    return traces


def _check(trace: dict[str, Any]) -> None:
    names = [stamp["name"] for stamp in trace["timestamps"]]
    assert names == ORDER, names
    times = [stamp["ns"] for stamp in trace["timestamps"]]
    assert times == sorted(times), trace


def test_every_request_traced_into_the_file(tmp_path: Path) -> None:
    trace_file = tmp_path / "trace.json"
    repo = build_repository(tmp_path / "repo", ["simple"])
    server = ServerProcess(repo, "--trace-config", "level=TIMESTAMPS", "--trace-config",
                           "rate=1", "--trace-config", f"triton,file={trace_file}")
    with server:
        server.wait_ready()
        with grpcclient.InferenceServerClient(server.url) as client:
            for index in range(3):
                infer_simple(client, grpcclient, f"grpc-{index}")
        with httpclient.InferenceServerClient(server.http_url) as client:
            infer_simple(client, httpclient, "http-0")
    traces = _traces(json.loads(trace_file.read_text()))   # written at stop
    assert sorted(trace["request_id"] for trace in traces.values()) == [
        "grpc-0", "grpc-1", "grpc-2", "http-0"]
    for trace in traces.values():
        assert (trace["model_name"], trace["model_version"]) == ("simple", 1)
        _check(trace)


def test_trace_api_and_count(tmp_path: Path) -> None:
    """Tracing turned on for one model through the API, two traces counted: they go to
    <file>.0 at once; the server's setting stays off; Triton's texts for bad updates."""
    trace_file = tmp_path / "trace.json"
    repo = build_repository(tmp_path / "repo", ["simple", "identity_fp32"])
    with ServerProcess(repo, f"--trace-file={trace_file}") as server:   # older flag
        server.wait_ready()
        with grpcclient.InferenceServerClient(server.url) as client:
            changed = client.update_trace_settings(
                "simple", {"trace_level": ["TIMESTAMPS"], "trace_rate": "1",
                           "trace_count": "2"}, as_json=True)["settings"]
            assert changed["trace_level"] == {"value": ["TIMESTAMPS"]}
            assert changed["trace_count"] == {"value": ["2"]}
            assert changed["trace_file"] == {"value": [str(trace_file)]}
            server_wide = client.get_trace_settings(as_json=True)["settings"]
            assert server_wide["trace_level"] == {"value": ["OFF"]}
            for _ in range(4):
                infer_simple(client)
            first = Path(f"{trace_file}.0")
            deadline = time.monotonic() + 10
            while not first.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            traces = _traces(json.loads(first.read_text()))
            assert len(traces) == 2
            for trace in traces.values():
                _check(trace)
            after = client.get_trace_settings("simple", as_json=True)["settings"]
            assert after["trace_count"] == {"value": ["0"]}
            # Cleared, the model's setting is the server's again.
            client.update_trace_settings("simple", {"trace_level": None}, as_json=True)
            assert client.get_trace_settings("simple", as_json=True)["settings"][
                "trace_level"] == {"value": ["OFF"]}
            for update, text in (
                    ({"trace_file": "/tmp/other"},
                     "trace file location can not be updated through network protocol"),
                    ({"trace_rate": "often"}, "Unable to parse 'trace_rate', got: often"),
                    ({"trace_count": "-2"},
                     "Unable to parse 'trace_count'. Expecting value >= -1, got:-2"),
                    ({"trace_level": ["OFF", "TIMESTAMPS"]},
                     "Expect only one trace level 'OFF' is specified")):
                with pytest.raises(InferenceServerException) as refused:
                    client.update_trace_settings(settings=update)
                assert refused.value.message() == text
            with pytest.raises(InferenceServerException) as unknown:
                client.get_trace_settings("nope")
            assert unknown.value.message() == "Request for unknown model : nope"
        with httpclient.InferenceServerClient(server.http_url) as client:
            answer = client.update_trace_settings("identity_fp32", {"trace_rate": "10"})
            assert answer["trace_rate"] == "10" and answer["trace_level"] == ["OFF"]



def test_ensemble_steps_are_child_traces(tmp_path: Path) -> None:
    """A traced ensemble request's steps are traced as its children (parent_id), whatever
    the rate."""
    trace_file = tmp_path / "trace.json"
    pipelines = Path(__file__).resolve().parent.parent / "bench" / "models_pipelines"
    repo = tmp_path / "repo"
    for name in ("identity", "ensemble_3"):
        shutil.copytree(pipelines / name, repo / name)
    with ServerProcess(repo, "--trace-config", "level=TIMESTAMPS", "--trace-config",
                       "rate=1", "--trace-config", f"triton,file={trace_file}") as server:
        server.wait_ready()
        with grpcclient.InferenceServerClient(server.url) as client:
            tensor = grpcclient.InferInput("INPUT0", [4], "FP32")
            tensor.set_data_from_numpy(np.arange(4, dtype=np.float32))
            client.infer("ensemble_3", [tensor], request_id="whole")
    traces = _traces(json.loads(trace_file.read_text()))
    parents = [trace for trace in traces.values() if trace["model_name"] == "ensemble_3"]
    assert len(parents) == 1 and "parent_id" not in parents[0]
    steps = [trace for trace in traces.values() if trace.get("parent_id") == parents[0]["id"]]
    assert [trace["model_name"] for trace in steps] == ["identity"] * 3
    for step in steps:
        _check(step)
    names = [stamp["name"] for stamp in parents[0]["timestamps"]]
    assert names[0] == "REQUEST_START" and names[-1] == "REQUEST_END"
