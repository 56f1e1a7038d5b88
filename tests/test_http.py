"""The HTTP/REST door end to end: a real server, tritonclient.http (sync and aio) and raw
HTTP where the client cannot say what is tested (malformed bodies, pipelining, headers)."""

from __future__ import annotations

import asyncio
import base64
import gzip
import http.client
import json
import os
import re
import socket
import time
import urllib.request
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import tritonclient.http.aio as aiohttpclient
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException

from shmserve.tests.conftest import GRPC_FRONTENDS, frontends_id
from shmserve.tests.serverproc import ServerProcess, build_repository

MODELS = ["simple", "identity_fp32", "string_upper", "echo_all"]
PREFIX = f"/tchttp{os.getpid()}_"
DATATYPES = {"BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32,
             "UINT64": np.uint64, "INT8": np.int8, "INT16": np.int16, "INT32": np.int32,
             "INT64": np.int64, "FP16": np.float16, "FP32": np.float32, "FP64": np.float64}


@pytest.fixture(scope="module", params=GRPC_FRONTENDS, ids=frontends_id)
def server(tmp_path_factory: pytest.TempPathFactory,
           request: pytest.FixtureRequest) -> Iterator[ServerProcess]:
    """Served by the supervisor, and by 2 frontend processes (--grpc-frontends: they serve
    the HTTP port too)."""
    repo = build_repository(tmp_path_factory.mktemp("http") / "repo", MODELS)
    with ServerProcess(repo, "--http-max-body-bytes", str(8 << 20),
                       "--http-max-header-bytes", "8192",
                       "--grpc-frontends", str(request.param)) as process:
        process.wait_ready()
        yield process


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[httpclient.InferenceServerClient]:
    with httpclient.InferenceServerClient(server.http_url) as http_client:
        yield http_client


@pytest.fixture(scope="module")
def grpc_client(server: ServerProcess) -> Iterator[grpcclient.InferenceServerClient]:
    with grpcclient.InferenceServerClient(server.url) as rpc_client:
        yield rpc_client


def _simple_inputs(binary: bool, module: Any = httpclient) -> tuple[list[Any], np.ndarray,
                                                                     np.ndarray]:
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    b = np.ones((1, 16), dtype=np.int32)
    inputs = [module.InferInput("INPUT0", [1, 16], "INT32"),
              module.InferInput("INPUT1", [1, 16], "INT32")]
    if module is httpclient:
        inputs[0].set_data_from_numpy(a, binary_data=binary)
        inputs[1].set_data_from_numpy(b, binary_data=binary)
    else:
        inputs[0].set_data_from_numpy(a)
        inputs[1].set_data_from_numpy(b)
    return inputs, a, b


def _raw(server: ServerProcess, method: str, path: str, body: bytes | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=30)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        answer = connection.getresponse()
        return answer.status, dict(answer.getheaders()), answer.read()
    finally:
        connection.close()


def _error(body: bytes) -> str:
    value = json.loads(body)
    assert set(value) == {"error"}
    return str(value["error"])


def _still_serving(client: httpclient.InferenceServerClient) -> None:
    inputs, a, b = _simple_inputs(True)
    result = client.infer("simple", inputs)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)


# --- health, metadata, config, statistics ----------------------------------------------------

def test_health_and_metadata(client: httpclient.InferenceServerClient,
                             grpc_client: grpcclient.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("simple")
    assert client.is_model_ready("simple", "1")
    assert not client.is_model_ready("simple", "7")
    assert not client.is_model_ready("nope")
    metadata = client.get_server_metadata()
    assert metadata["name"] == "shmserve"
    assert "binary_tensor_data" in metadata["extensions"]
    model = client.get_model_metadata("simple", "1")
    assert model == {"name": "simple", "versions": ["1"], "platform": "python",
                     "inputs": [{"name": f"INPUT{i}", "datatype": "INT32", "shape": [-1, 16]}
                                for i in range(2)],
                     "outputs": [{"name": f"OUTPUT{i}", "datatype": "INT32",
                                  "shape": [-1, 16]} for i in range(2)]}
    config = client.get_model_config("simple")
    expected = grpc_client.get_model_config("simple", as_json=True)["config"]
    assert config["name"] == "simple" and config["max_batch_size"] == 8
    assert config["input"][0]["dims"] == [16]
    assert config["input"][0]["data_type"] == expected["input"][0]["data_type"]
    assert [t["name"] for t in config["output"]] == ["OUTPUT0", "OUTPUT1"]
    batching = client.get_model_config("string_upper")["dynamic_batching"]
    assert batching["max_queue_delay_microseconds"] == 100  # uint64 as a JSON number


def test_readiness_probe_is_plain_http(server: ServerProcess) -> None:
    status, _, body = _raw(server, "GET", "/v2/health/ready")
    assert (status, body) == (200, b"")
    status, _, body = _raw(server, "GET", "/v2/nothing/here")
    assert status == 404 and _error(body) == "Not Found: GET /v2/nothing/here"
    assert _raw(server, "GET", "/v2/models/simple/ready")[0] == 200
    assert _raw(server, "GET", "/v2/models/nope/ready")[0] == 400


def test_statistics_count_both_doors(client: httpclient.InferenceServerClient,
                                     grpc_client: grpcclient.InferenceServerClient) -> None:
    def successes() -> int:
        stats = client.get_inference_statistics("identity_fp32")["model_stats"][0]
        assert isinstance(stats["inference_stats"]["success"]["count"], int)
        return int(stats["inference_stats"]["success"]["count"])

    before = successes()
    data = np.arange(4, dtype=np.float32)
    http_input = httpclient.InferInput("INPUT0", [4], "FP32")
    http_input.set_data_from_numpy(data)
    client.infer("identity_fp32", [http_input])
    rpc_input = grpcclient.InferInput("INPUT0", [4], "FP32")
    rpc_input.set_data_from_numpy(data)
    grpc_client.infer("identity_fp32", [rpc_input])
    assert successes() == before + 2
    everything = client.get_inference_statistics()
    assert {s["name"] for s in everything["model_stats"]} >= set(MODELS)
    versioned = client.get_inference_statistics("identity_fp32", "1")
    assert versioned["model_stats"][0]["version"] == "1"


# --- inference -------------------------------------------------------------------------------

@pytest.mark.parametrize("binary", [False, True])
def test_simple_json_and_binary(client: httpclient.InferenceServerClient, binary: bool) -> None:
    inputs, a, b = _simple_inputs(binary)
    outputs = [httpclient.InferRequestedOutput("OUTPUT0", binary_data=binary),
               httpclient.InferRequestedOutput("OUTPUT1", binary_data=not binary)]
    result = client.infer("simple", inputs, outputs=outputs, request_id="req-7")
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)
    response = result.get_response()
    assert response["id"] == "req-7" and response["model_version"] == "1"
    by_name = {o["name"]: o for o in response["outputs"]}
    binary_output = "OUTPUT0" if binary else "OUTPUT1"
    json_output = "OUTPUT1" if binary else "OUTPUT0"
    assert by_name[binary_output]["parameters"]["binary_data_size"] == 64
    assert "data" not in by_name[binary_output]
    assert len(by_name[json_output]["data"]) == 16


def test_no_outputs_named_answers_all_binary(client: httpclient.InferenceServerClient) -> None:
    inputs, a, b = _simple_inputs(False)
    result = client.infer("simple", inputs)  # tritonclient asks binary_data_output
    assert all("binary_data_size" in o["parameters"] for o in result.get_response()["outputs"])
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)


@pytest.mark.parametrize("binary", [False, True])
def test_every_datatype(client: httpclient.InferenceServerClient, binary: bool) -> None:
    inputs, outputs, expected = [], [], {}
    for datatype, dtype in DATATYPES.items():
        if dtype is np.bool_:
            data = np.array([True, False, True])
        elif np.issubdtype(dtype, np.integer):
            info = np.iinfo(dtype)
            data = np.array([info.min, 0, info.max], dtype=dtype)
        else:
            data = np.array([-1.5, 0.25, 3.0], dtype=dtype)
        tensor = httpclient.InferInput(f"IN_{datatype}", [3], datatype)
        # FP16 travels only as binary data (JSON cannot carry it).
        tensor.set_data_from_numpy(data, binary_data=binary or datatype == "FP16")
        inputs.append(tensor)
        outputs.append(httpclient.InferRequestedOutput(f"OUT_{datatype}", binary_data=binary))
        expected[datatype] = data
    strings = np.array([b"hello", "wörld".encode(), b""], dtype=np.object_)
    text = httpclient.InferInput("IN_STRING", [3], "BYTES")
    text.set_data_from_numpy(strings, binary_data=binary)
    inputs.append(text)
    outputs.append(httpclient.InferRequestedOutput("OUT_STRING", binary_data=binary))
    result = client.infer("echo_all", inputs, outputs=outputs)
    for datatype, data in expected.items():
        got = result.as_numpy(f"OUT_{datatype}")
        assert got.dtype == data.dtype, datatype
        np.testing.assert_array_equal(got, data)
    # JSON answers BYTES as strings, which tritonclient hands back as str.
    got_strings = [v if isinstance(v, bytes) else v.encode() for v in
                   result.as_numpy("OUT_STRING")]
    assert got_strings == list(strings)
    response = {o["name"]: o for o in result.get_response()["outputs"]}
    assert ("data" in response["OUT_INT64"]) is not binary
    assert "binary_data_size" in response["OUT_FP16"]["parameters"]  # never JSON


@pytest.mark.parametrize("response_algorithm", [None, "gzip"])
def test_large_binary_payload(client: httpclient.InferenceServerClient,
                              response_algorithm: str | None) -> None:
    data = np.random.default_rng(7).random(1 << 20, dtype=np.float32)  # 4 MiB each way
    tensor = httpclient.InferInput("INPUT0", [data.size], "FP32")
    tensor.set_data_from_numpy(data)
    result = client.infer("identity_fp32", [tensor],
                          response_compression_algorithm=response_algorithm)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), data)


def test_nested_and_flat_json_data(server: ServerProcess) -> None:
    body = {"inputs": [
        {"name": "INPUT0", "datatype": "INT32", "shape": [2, 16],
         "data": [list(range(16)), list(range(16, 32))]},
        {"name": "INPUT1", "datatype": "INT32", "shape": [2, 16], "data": [1] * 32}],
        "outputs": [{"name": "OUTPUT0"}]}
    status, headers, answer = _raw(server, "POST", "/v2/models/simple/infer",
                                   json.dumps(body).encode())
    assert status == 200, answer
    assert headers["Content-Type"].startswith("application/json")
    output = json.loads(answer)["outputs"][0]
    assert output["shape"] == [2, 16] and output["data"] == list(range(1, 33))


def test_bytes_as_json_strings(client: httpclient.InferenceServerClient) -> None:
    text = httpclient.InferInput("TEXT", [1, 2], "BYTES")
    text.set_data_from_numpy(np.array([["abc", "shm"]], dtype=np.object_), binary_data=False)
    result = client.infer("string_upper", [text],
                          outputs=[httpclient.InferRequestedOutput("UPPER", binary_data=False)])
    assert result.get_response()["outputs"][0]["data"] == ["ABC", "SHM"]


def test_fp16_as_json_is_refused(server: ServerProcess) -> None:
    body = {"inputs": [{"name": "IN_FP16", "datatype": "FP16", "shape": [1], "data": [1.0]}]}
    status, _, answer = _raw(server, "POST", "/v2/models/echo_all/infer",
                             json.dumps(body).encode())
    assert status == 400
    assert "must be sent as binary data" in _error(answer)


def test_request_parameters(client: httpclient.InferenceServerClient) -> None:
    inputs, a, b = _simple_inputs(True)
    result = client.infer("simple", inputs, parameters={"custom": "value", "n": 3})
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
    with pytest.raises(InferenceServerException) as nested:
        client.infer("simple", inputs, parameters={"custom": {"a": 1}})
    assert nested.value.message() == "request parameter 'custom' must be a boolean, number " \
                                     "or string"


def test_versioned_paths(client: httpclient.InferenceServerClient,
                         grpc_client: grpcclient.InferenceServerClient) -> None:
    inputs, a, b = _simple_inputs(True)
    result = client.infer("simple", inputs, model_version="1")
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
    assert result.get_response()["model_version"] == "1"
    with pytest.raises(InferenceServerException) as over_http:
        client.infer("simple", inputs, model_version="3")
    rpc_inputs, _, _ = _simple_inputs(True, grpcclient)
    with pytest.raises(InferenceServerException) as over_grpc:
        grpc_client.infer("simple", rpc_inputs, model_version="3")
    assert over_http.value.message() == over_grpc.value.message()


@pytest.mark.parametrize("request_algorithm,response_algorithm",
                         [("gzip", None), ("deflate", None), (None, "gzip"),
                          (None, "deflate"), ("gzip", "deflate")])
def test_compression(client: httpclient.InferenceServerClient, request_algorithm: str | None,
                     response_algorithm: str | None) -> None:
    inputs, a, b = _simple_inputs(True)
    result = client.infer("simple", inputs, request_compression_algorithm=request_algorithm,
                          response_compression_algorithm=response_algorithm)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)


def test_compressed_response_is_compressed(server: ServerProcess) -> None:
    body = json.dumps({"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [4096],
                                   "data": [0.0] * 4096}],
                       "parameters": {"binary_data_output": True}}).encode()
    for encoding, decompress in (("gzip", gzip.decompress), ("deflate", zlib.decompress)):
        status, headers, answer = _raw(server, "POST", "/v2/models/identity_fp32/infer",
                                       gzip.compress(body),
                                       {"Content-Encoding": "gzip",
                                        "Accept-Encoding": encoding})
        assert status == 200, answer
        assert headers["Content-Encoding"] == encoding
        assert len(answer) < 4096 * 4
        plain = decompress(answer)
        header_length = int(headers["Inference-Header-Content-Length"])
        assert plain[header_length:] == bytes(4096 * 4)


def test_aio_client(server: ServerProcess) -> None:
    async def run() -> None:
        client = aiohttpclient.InferenceServerClient(server.http_url)
        try:
            assert await client.is_server_ready()
            assert (await client.get_model_metadata("simple"))["name"] == "simple"
            inputs, a, b = _simple_inputs(True, aiohttpclient)
            results = await asyncio.gather(*(client.infer("simple", inputs) for _ in range(8)))
            for result in results:
                np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
            inputs, a, b = _simple_inputs(False, aiohttpclient)
            result = await client.infer("simple", inputs, outputs=[
                aiohttpclient.InferRequestedOutput("OUTPUT1", binary_data=False)])
            np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)
        finally:
            await client.close()

    asyncio.run(run())


def test_keep_alive_and_pipelining(server: ServerProcess) -> None:
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=30) as sock:
        request = (b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\n\r\n"
                   b"GET /v2/models/simple HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.sendall(request)
        received = b""
        deadline = time.monotonic() + 20
        while received.count(b"HTTP/1.1 200") < 2 and time.monotonic() < deadline:
            received += sock.recv(65536)
        assert received.count(b"HTTP/1.1 200") == 2
        assert b'"name":"simple"' in received


def test_generate(server: ServerProcess,
                  grpc_client: grpcclient.InferenceServerClient) -> None:
    status, _, answer = _raw(server, "POST", "/v2/models/string_upper/generate",
                             json.dumps({"TEXT": "hello", "id": "g1", "note": 3}).encode())
    assert status == 200, answer
    assert json.loads(answer) == {"model_name": "string_upper", "model_version": "1",
                                  "id": "g1", "UPPER": "HELLO"}
    body = {"INPUT0": list(range(16)), "INPUT1": [2] * 16}
    status, _, answer = _raw(server, "POST", "/v2/models/simple/versions/1/generate",
                             json.dumps(body).encode())
    assert status == 200, answer
    value = json.loads(answer)
    assert value["OUTPUT0"] == [i + 2 for i in range(16)]
    assert value["OUTPUT1"] == [i - 2 for i in range(16)]
    status, _, answer = _raw(server, "POST", "/v2/models/nope/generate", b"{}")
    assert status == 404
    assert _error(answer) == "Request for unknown model: 'nope' is not found"
    status, _, answer = _raw(server, "POST", "/v2/models/simple/generate",
                             json.dumps({"INPUT0": list(range(16))}).encode())
    rpc_inputs, _, _ = _simple_inputs(True, grpcclient)
    with pytest.raises(InferenceServerException) as over_grpc:
        grpc_client.infer("simple", rpc_inputs[:1])
    assert status == 400 and _error(answer) == over_grpc.value.message()
    status, headers, answer = _raw(server, "POST", "/v2/models/simple/generate_stream",
                                   json.dumps(body).encode())
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    assert answer.startswith(b"data: ") and answer.endswith(b"\n\n")
    assert json.loads(answer[len(b"data: "):])["OUTPUT0"] == [i + 2 for i in range(16)]


# --- repository, logging, trace ----------------------------------------------------------------

def test_repository_index(client: httpclient.InferenceServerClient) -> None:
    index = client.get_model_repository_index()
    assert {"name": "simple", "version": "1", "state": "READY"} in index


def test_load_in_mode_none_matches_grpc(client: httpclient.InferenceServerClient,
                                        grpc_client: grpcclient.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException) as over_http:
        client.load_model("simple")
    with pytest.raises(InferenceServerException) as over_grpc:
        grpc_client.load_model("simple")
    assert over_http.value.status() == "503"
    assert over_http.value.message() == over_grpc.value.message()


def test_explicit_load_with_config_and_files(tmp_path: Path) -> None:
    repo = build_repository(tmp_path / "repo", ["simple"])
    with ServerProcess(repo, "--model-control-mode", "explicit") as server:
        server.wait_ready()
        with httpclient.InferenceServerClient(server.http_url) as client:
            assert client.get_model_repository_index() == [{"name": "simple"}]
            client.load_model("simple")
            assert client.is_model_ready("simple")
            source = (repo / "simple" / "1" / "model.py").read_bytes()
            config = json.dumps({"name": "copy", "backend": "python", "max_batch_size": 8,
                                 "input": [{"name": f"INPUT{i}", "data_type": "TYPE_INT32",
                                            "dims": [16]} for i in range(2)],
                                 "output": [{"name": f"OUTPUT{i}", "data_type": "TYPE_INT32",
                                             "dims": [16]} for i in range(2)]})
            client.load_model("copy", config=config, files={"file:1/model.py": source})
            assert client.is_model_ready("copy")
            inputs, a, b = _simple_inputs(True)
            np.testing.assert_array_equal(client.infer("copy", inputs).as_numpy("OUTPUT0"),
                                          a + b)
            client.unload_model("copy")
            assert not client.is_model_ready("copy")
            status, _, answer = _raw(server, "POST", "/v2/repository/models/simple/load",
                                     json.dumps({"parameters": {"bogus": 1}}).encode())
            assert status == 400
            assert _error(answer) == "Unrecognized load parameter 'bogus' with type " \
                                     "'int64_param'"


def test_logging_and_trace(client: httpclient.InferenceServerClient,
                           grpc_client: grpcclient.InferenceServerClient,
                           server: ServerProcess) -> None:
    settings = client.get_log_settings()
    assert settings["log_verbose_level"] == 0 and settings["log_info"] is True
    assert client.update_log_settings({"log_verbose_level": 1})["log_verbose_level"] == 1
    assert grpc_client.get_log_settings(as_json=True)["settings"]["log_verbose_level"] == {
        "uint32_param": 1}
    client.update_log_settings({"log_verbose_level": 0})
    changed = client.update_log_settings({"log_format": "ISO8601", "log_warning": False})
    assert (changed["log_format"], changed["log_warning"]) == ("ISO8601", False)
    assert grpc_client.get_log_settings(as_json=True)["settings"]["log_format"] == {
        "string_param": "ISO8601"}
    client.update_log_settings({"log_format": "default", "log_warning": True})
    # Triton's texts for what cannot be changed, or not to that.
    for update, text in (({"log_file": "/tmp/x"},
                          "log file location can not be updated through network protocol"),
                         ({"log_format": "fancy"}, "invalid argument for log_format, got: fancy"),
                         ({"log_info": "yes"}, "expect boolean for 'log_info'"),
                         ({"log_color": True}, "unsupported log setting 'log_color'")):
        with pytest.raises(InferenceServerException) as refused:
            client.update_log_settings(update)
        assert refused.value.message() == text
    for path in ("/v2/trace/setting", "/v2/models/simple/trace/setting"):
        status, _, answer = _raw(server, "GET", path)
        assert status == 200
        assert json.loads(answer) == {"trace_level": ["OFF"], "trace_rate": "1000",
                                      "trace_count": "-1", "log_frequency": "0",
                                      "trace_file": "", "trace_mode": "triton"}


# --- shared memory ---------------------------------------------------------------------------

def test_shm_registered_over_http_used_over_grpc_and_back(
        client: httpclient.InferenceServerClient,
        grpc_client: grpcclient.InferenceServerClient) -> None:
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    b = np.full((1, 16), 3, dtype=np.int32)
    handle = shm.create_shared_memory_region("http_in", f"{PREFIX}in", 128)
    out_handle = shm.create_shared_memory_region("http_out", f"{PREFIX}out", 128)
    try:
        shm.set_shared_memory_region(handle, [a, b])
        client.register_system_shared_memory("http_in", f"{PREFIX}in", 128)
        grpc_client.register_system_shared_memory("grpc_out", f"{PREFIX}out", 128)
        assert client.get_system_shared_memory_status("http_in")[0]["byte_size"] == 128
        assert {r["name"] for r in client.get_system_shared_memory_status()} >= {
            "http_in", "grpc_out"}
        # Registered over HTTP, used over gRPC.
        inputs = [grpcclient.InferInput("INPUT0", [1, 16], "INT32"),
                  grpcclient.InferInput("INPUT1", [1, 16], "INT32")]
        inputs[0].set_shared_memory("http_in", 64)
        inputs[1].set_shared_memory("http_in", 64, offset=64)
        result = grpc_client.infer("simple", inputs)
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
        # Registered over gRPC, used over HTTP (inputs and outputs in regions).
        http_inputs = [httpclient.InferInput("INPUT0", [1, 16], "INT32"),
                       httpclient.InferInput("INPUT1", [1, 16], "INT32")]
        http_inputs[0].set_shared_memory("http_in", 64)
        http_inputs[1].set_shared_memory("http_in", 64, offset=64)
        output = httpclient.InferRequestedOutput("OUTPUT1")
        output.set_shared_memory("grpc_out", 64)
        result = client.infer("simple", http_inputs, outputs=[output])
        # As Triton describes an output written to a region: no "data", no "parameters" (the
        # C++ client, perf_analyzer's, reads "parameters" as binary data and needs its size).
        assert result.get_output("OUTPUT1") == {"name": "OUTPUT1", "datatype": "INT32",
                                                "shape": [1, 16]}
        got = shm.get_contents_as_numpy(out_handle, np.int32, [1, 16])
        np.testing.assert_array_equal(got, a - b)
        client.unregister_system_shared_memory("grpc_out")
        assert "grpc_out" not in grpc_client.get_system_shared_memory_status().regions
        grpc_client.unregister_system_shared_memory("http_in")
        assert client.get_system_shared_memory_status() == []
    finally:
        shm.destroy_shared_memory_region(handle)
        shm.destroy_shared_memory_region(out_handle)


def test_shm_errors_match_grpc(server: ServerProcess, client: httpclient.InferenceServerClient,
                               grpc_client: grpcclient.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException) as over_http:
        client.register_system_shared_memory("missing", f"{PREFIX}missing", 64)
    with pytest.raises(InferenceServerException) as over_grpc:
        grpc_client.register_system_shared_memory("missing", f"{PREFIX}missing", 64)
    assert over_http.value.message() == over_grpc.value.message()
    inputs, _, _ = _simple_inputs(True)
    inputs[0].set_shared_memory("nowhere", 64)
    with pytest.raises(InferenceServerException) as infer_http:
        client.infer("simple", inputs)
    rpc_inputs, _, _ = _simple_inputs(True, grpcclient)
    rpc_inputs[0].set_shared_memory("nowhere", 64)
    with pytest.raises(InferenceServerException) as infer_grpc:
        grpc_client.infer("simple", rpc_inputs)
    assert infer_http.value.message() == infer_grpc.value.message()
    assert infer_http.value.status() == "404"  # gRPC's NOT_FOUND
    body = {"inputs": [{"name": "INPUT0", "datatype": "INT32", "shape": [1, 16],
                        "data": [0] * 16, "parameters": {"shared_memory_region": "nowhere",
                                                         "shared_memory_byte_size": 64}},
                       {"name": "INPUT1", "datatype": "INT32", "shape": [1, 16],
                        "data": [0] * 16}]}
    status, _, answer = _raw(server, "POST", "/v2/models/simple/infer", json.dumps(body).encode())
    assert status == 400
    assert _error(answer) == ("unexpected 'content' provided when using shared memory for "
                              "input 'INPUT0' for model 'simple'")
    status = client.get_cuda_shared_memory_status()
    assert status == []
    with pytest.raises(InferenceServerException) as cuda_http:
        client.register_cuda_shared_memory("gpu", base64.b64encode(bytes(64)), 0, 64)
    with pytest.raises(InferenceServerException) as cuda_grpc:
        grpc_client.register_cuda_shared_memory("gpu", base64.b64encode(bytes(64)), 0, 64)
    assert cuda_http.value.message() == cuda_grpc.value.message()


def test_client_shm_off_applies_to_http(tmp_path: Path) -> None:
    repo = build_repository(tmp_path / "repo", ["simple"])
    handle = shm.create_shared_memory_region("off", f"{PREFIX}off", 64)
    try:
        with ServerProcess(repo, "--allow-client-shm=false") as server:
            server.wait_ready()
            with httpclient.InferenceServerClient(server.http_url) as client, \
                    grpcclient.InferenceServerClient(server.url) as rpc_client:
                with pytest.raises(InferenceServerException) as over_http:
                    client.register_system_shared_memory("off", f"{PREFIX}off", 64)
                with pytest.raises(InferenceServerException) as over_grpc:
                    rpc_client.register_system_shared_memory("off", f"{PREFIX}off", 64)
                assert over_http.value.message() == over_grpc.value.message()
                assert "--allow-client-shm" in over_http.value.message()
    finally:
        shm.destroy_shared_memory_region(handle)


# --- errors: the gRPC door's texts, Triton's statuses ------------------------------------------

def _both(client: httpclient.InferenceServerClient,
          grpc_client: grpcclient.InferenceServerClient, model: str,
          http_inputs: list[Any], grpc_inputs: list[Any]) -> tuple[InferenceServerException,
                                                                   InferenceServerException]:
    with pytest.raises(InferenceServerException) as over_http:
        client.infer(model, http_inputs)
    with pytest.raises(InferenceServerException) as over_grpc:
        grpc_client.infer(model, grpc_inputs)
    return over_http.value, over_grpc.value


def test_unknown_model_is_404_with_grpc_text(client: httpclient.InferenceServerClient,
                                             grpc_client: grpcclient.InferenceServerClient
                                             ) -> None:
    http_error, grpc_error = _both(client, grpc_client, "nope", _simple_inputs(True)[0],
                                   _simple_inputs(True, grpcclient)[0])
    assert http_error.status() == "404"
    assert http_error.message() == grpc_error.message() == \
        "Request for unknown model: 'nope' is not found"
    with pytest.raises(InferenceServerException) as metadata:
        client.get_model_metadata("nope")
    assert metadata.value.status() == "404"
    with pytest.raises(InferenceServerException) as config:
        client.get_model_config("simple", "9")
    with pytest.raises(InferenceServerException) as rpc_config:
        grpc_client.get_model_config("simple", "9")
    assert config.value.message() == rpc_config.value.message()


@pytest.mark.parametrize("case", ["datatype", "shape", "missing", "unknown_input", "bytesize",
                                  "batch", "unknown_output", "bytes_for_int32"])
def test_invalid_requests_match_grpc(client: httpclient.InferenceServerClient,
                                     grpc_client: grpcclient.InferenceServerClient,
                                     case: str) -> None:
    def build(module: Any) -> list[Any]:
        a = np.zeros((1, 16), dtype=np.int32)
        first = module.InferInput("INPUT0", [1, 16], "INT32")
        second = module.InferInput("INPUT1", [1, 16], "INT32")
        if case == "datatype":
            first = module.InferInput("INPUT0", [1, 16], "FP32")
            first.set_data_from_numpy(a.astype(np.float32))
        elif case == "shape":
            first = module.InferInput("INPUT0", [1, 8], "INT32")
            first.set_data_from_numpy(np.zeros((1, 8), dtype=np.int32))
        elif case == "batch":
            first = module.InferInput("INPUT0", [9, 16], "INT32")
            first.set_data_from_numpy(np.zeros((9, 16), dtype=np.int32))
        elif case == "bytes_for_int32":
            first = module.InferInput("INPUT0", [1, 16], "BYTES")
            first.set_data_from_numpy(np.array([[b"x"] * 16], dtype=np.object_))
        elif case == "unknown_input":
            first = module.InferInput("BOGUS", [1, 16], "INT32")
            first.set_data_from_numpy(a)
        elif case == "bytesize":
            first.set_data_from_numpy(a)
            if module is httpclient:  # 32 bytes where 64 are due
                first._raw_data = bytes(32)
                first._parameters["binary_data_size"] = 32
            else:
                first._raw_content = bytes(32)
        else:
            first.set_data_from_numpy(a)
        second.set_data_from_numpy(a)
        return [first] if case == "missing" else [first, second]

    def outputs(module: Any) -> list[Any] | None:
        return [module.InferRequestedOutput("BOGUS")] if case == "unknown_output" else None

    with pytest.raises(InferenceServerException) as over_http:
        client.infer("simple", build(httpclient), outputs=outputs(httpclient))
    with pytest.raises(InferenceServerException) as over_grpc:
        grpc_client.infer("simple", build(grpcclient), outputs=outputs(grpcclient))
    http_error, grpc_error = over_http.value, over_grpc.value
    assert http_error.status() == "400"
    assert http_error.message() == grpc_error.message()


# --- malformed requests: a clear 4xx, and the server keeps serving ---------------------------

def _infer_raw(server: ServerProcess, body: bytes, header_length: int | None = None,
               extra: dict[str, str] | None = None) -> tuple[int, str]:
    headers = dict(extra or {})
    if header_length is not None:
        headers["Inference-Header-Content-Length"] = str(header_length)
    status, _, answer = _raw(server, "POST", "/v2/models/simple/infer", body, headers)
    return status, _error(answer)


def _binary_request(declared: int) -> tuple[bytes, int]:
    header = json.dumps({"inputs": [
        {"name": "INPUT0", "datatype": "INT32", "shape": [1, 16],
         "parameters": {"binary_data_size": declared}},
        {"name": "INPUT1", "datatype": "INT32", "shape": [1, 16],
         "parameters": {"binary_data_size": 64}}]}).encode()
    return header, len(header)


def test_malformed_json(server: ServerProcess,
                        client: httpclient.InferenceServerClient) -> None:
    for body in (b"{bad", b"", b"[1, 2]", b'{"inputs": 3}', b'{"inputs": [{"name": 1}]}',
                 b"\xff\xfe"):
        status, message = _infer_raw(server, body)
        assert status == 400, body
        assert message.startswith("failed to parse the request JSON buffer"), message
    _still_serving(client)


def test_lying_header_length(server: ServerProcess,
                             client: httpclient.InferenceServerClient) -> None:
    header, size = _binary_request(64)
    body = header + bytes(128)
    for lie in (len(body) + 1, -1):
        status, message = _infer_raw(server, body, lie)
        assert status == 400
        assert "Inference-Header-Content-Length" in message
    status, message = _infer_raw(server, body, size - 3)  # cuts the JSON
    assert status == 400 and message.startswith("failed to parse the request JSON buffer")
    status, message = _infer_raw(server, body, extra={"Inference-Header-Content-Length": "x"})
    assert status == 400 and "must be an integer" in message
    _still_serving(client)


def test_truncated_and_surplus_binary_data(server: ServerProcess,
                                           client: httpclient.InferenceServerClient) -> None:
    header, size = _binary_request(64)
    status, message = _infer_raw(server, header + bytes(100), size)
    assert status == 400 and "unexpected end of the binary data for input 'INPUT1'" in message
    status, message = _infer_raw(server, header + bytes(200), size)
    assert status == 400 and "72 bytes of binary data past what its inputs declare" in message
    header, size = _binary_request(2**40)
    status, message = _infer_raw(server, header + bytes(128), size)
    assert status == 400 and "unexpected end of the binary data for input 'INPUT0'" in message
    _still_serving(client)


def test_oversized_body_and_huge_header(server: ServerProcess,
                                        client: httpclient.InferenceServerClient) -> None:
    status, message = _infer_raw(server, bytes(9 << 20))
    assert status == 413 and "--http-max-body-bytes" in message
    compressed = gzip.compress(bytes(9 << 20))  # small on the wire, too big once inflated
    status, message = _infer_raw(server, compressed, extra={"Content-Encoding": "gzip"})
    assert status == 413
    status, _, _ = _raw(server, "GET", "/v2/health/ready", headers={"X-Big": "a" * 20000})
    assert status == 400
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=30) as sock:
        sock.sendall(b"GET /v2/" + b"a" * 20000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(1024).split(b"\r\n")[0].split()[1] in (b"400", b"414", b"431")
    _still_serving(client)


def test_slow_headers_are_cut_off(tmp_path: Path) -> None:
    repo = build_repository(tmp_path / "repo", ["simple"])
    with ServerProcess(repo, "--http-idle-secs", "1") as server:
        server.wait_ready()
        with socket.create_connection(("127.0.0.1", server.http_port), timeout=10) as sock:
            started = time.monotonic()
            closed = False
            for piece in [b"GET /v2/health/ready HTTP/1.1\r\n"] + [b"X-Slow: y\r\n"] * 40:
                try:
                    sock.sendall(piece)
                    time.sleep(0.2)
                except OSError:
                    closed = True
                    break
            if not closed:
                sock.settimeout(5)
                closed = sock.recv(1024) == b""
            assert closed and time.monotonic() - started < 6
        with httpclient.InferenceServerClient(server.http_url) as client:
            _still_serving(client)


def test_server_exiting_is_503(tmp_path: Path) -> None:
    repo = build_repository(tmp_path / "repo", ["sleeper"])
    server = ServerProcess(repo)
    try:
        server.wait_ready()
        config = json.loads(_raw(server, "GET", "/v2/models/sleeper")[2])
        body = json.dumps({"inputs": [{"name": t["name"], "datatype": t["datatype"],
                                       "shape": [1 if d == -1 else d for d in t["shape"]],
                                       "data": [1] * int(np.prod(
                                           [1 if d == -1 else d for d in t["shape"]]))}
                                      for t in config["inputs"]]}).encode()
        connection = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=30)
        connection.request("POST", "/v2/models/sleeper/infer", body=body)
        time.sleep(0.3)
        server.process.send_signal(15)
        deadline = time.monotonic() + 10
        status = 0
        while time.monotonic() < deadline:
            status, _, answer = _raw(server, "GET", "/v2/health/ready")
            if status == 503:
                assert _error(answer) == "Server exiting"
                break
            time.sleep(0.05)
        assert status == 503
        assert connection.getresponse().status == 200  # in flight before SIGTERM: finished
        connection.close()
    finally:
        server.stop()


# --- the doors as flags ---------------------------------------------------------------------

def test_allow_flags(tmp_path: Path) -> None:
    repo = build_repository(tmp_path / "repo", ["simple"])
    with ServerProcess(repo, "--allow-http=false") as server:
        server.wait_ready()
        with pytest.raises(OSError), socket.create_connection(
                ("127.0.0.1", server.http_port), timeout=2):
            pass
        assert "Started HTTPService" not in server.log()
    with ServerProcess(repo, "--allow-grpc=false", "--local-socket", "none") as server:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(
                        f"http://{server.http_url}/v2/health/ready", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                time.sleep(0.1)
        with httpclient.InferenceServerClient(server.http_url) as client:
            _still_serving(client)
        assert "Started GRPCInferenceService" not in server.log()
        with pytest.raises(OSError), socket.create_connection(
                ("127.0.0.1", server.port), timeout=2):
            pass


def test_metrics_count_http_requests(server: ServerProcess,
                                     client: httpclient.InferenceServerClient) -> None:

    def success() -> int:
        text = server.metrics_page()
        found = re.search(r'nv_inference_request_success\{model="string_upper",version="1"\} '
                          r'(\d+)', text)
        return int(found.group(1)) if found else 0

    before = success()
    text = httpclient.InferInput("TEXT", [1, 1], "BYTES")
    text.set_data_from_numpy(np.array([["x"]], dtype=np.object_))
    client.infer("string_upper", [text])
    assert success() == before + 1



def test_restricted_api(tmp_path: Path) -> None:
    """--http-restricted-api: a restricted group answers 403 without its header; the other
    groups, and the gRPC door, are not affected."""
    repo = build_repository(tmp_path / "repo", ["simple"])
    with ServerProcess(repo, "--http-restricted-api=model-repository,health:admin-key=secret",
                       "--http-restricted-api=inference:Infer-Key=v") as server:
        server.wait_ready()
        refused = "This API is restricted, expecting header '{}'"
        for method, path, key in (("GET", "/v2/health/ready", "admin-key"),
                                  ("GET", "/v2/models/simple/ready", "admin-key"),
                                  ("POST", "/v2/repository/index", "admin-key"),
                                  ("POST", "/v2/models/simple/infer", "Infer-Key")):
            for headers in ({}, {key: "wrong"}, {"other": "secret"}):
                status, _, body = _raw(server, method, path, b"{}", headers)
                assert (status, _error(body)) == (403, refused.format(key))
        assert _raw(server, "GET", "/v2/health/ready", None, {"Admin-Key": "secret"})[0] == 200
        assert _raw(server, "GET", "/v2", None)[0] == 200  # metadata: not restricted
        with httpclient.InferenceServerClient(server.http_url) as client:
            inputs, a, b = _simple_inputs(True)
            result = client.infer("simple", inputs, headers={"infer-key": "v"})
            np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
            assert client.get_model_repository_index(headers={"admin-key": "secret"})
            with pytest.raises(InferenceServerException, match="This API is restricted"):
                client.infer("simple", inputs)
        with grpcclient.InferenceServerClient(server.url) as rpc_client:
            assert rpc_client.is_server_ready()  # the HTTP rule is not the gRPC one
            assert rpc_client.infer("simple", _simple_inputs(True, grpcclient)[0])
