"""The core RPCs against a real server, with tritonclient as an independent client."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from shmserve.protos import shmserve_health_pb2 as health_pb
from shmserve.tests.conftest import GRPC_FRONTENDS, frontends_id, serve_models
from shmserve.tests.serverproc import ServerProcess

MODELS = ["simple", "identity_fp32", "string_upper", "echo_all"]


@pytest.fixture(scope="module", params=GRPC_FRONTENDS, ids=frontends_id)
def server(tmp_path_factory: pytest.TempPathFactory,
           request: pytest.FixtureRequest) -> Iterator[ServerProcess]:
    yield from serve_models(tmp_path_factory, MODELS, request.param)


@pytest.fixture
def client(server: ServerProcess) -> Iterator[grpcclient.InferenceServerClient]:
    with grpcclient.InferenceServerClient(server.url) as triton:
        yield triton


def _simple_inputs(batch: int = 1) -> tuple[list[grpcclient.InferInput], np.ndarray, np.ndarray]:
    a = np.arange(16 * batch, dtype=np.int32).reshape(batch, 16)
    b = np.full((batch, 16), 3, dtype=np.int32)
    inputs = [grpcclient.InferInput("INPUT0", [batch, 16], "INT32"),
              grpcclient.InferInput("INPUT1", [batch, 16], "INT32")]
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(b)
    return inputs, a, b


def test_health(client: grpcclient.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("simple")
    assert client.is_model_ready("simple", "1")
    assert not client.is_model_ready("simple", "2")
    assert not client.is_model_ready("no_such_model")


def test_grpc_health_service(server: ServerProcess) -> None:
    with grpc.insecure_channel(server.url) as channel:
        check = channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=health_pb.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb.HealthCheckResponse.FromString)
        answer = check(health_pb.HealthCheckRequest(service=""), timeout=5)
    assert answer.status == health_pb.HealthCheckResponse.SERVING


def test_server_metadata(client: grpcclient.InferenceServerClient) -> None:
    metadata = client.get_server_metadata()
    assert metadata.name == "shmserve"
    assert "system_shared_memory" in metadata.extensions
    assert "statistics" in metadata.extensions


def test_model_metadata(client: grpcclient.InferenceServerClient) -> None:
    metadata = client.get_model_metadata("simple")
    assert metadata.name == "simple"
    assert list(metadata.versions) == ["1"]
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [
        ("INPUT0", "INT32", [-1, 16]), ("INPUT1", "INT32", [-1, 16])]
    assert [t.name for t in metadata.outputs] == ["OUTPUT0", "OUTPUT1"]
    identity = client.get_model_metadata("identity_fp32")
    assert list(identity.inputs[0].shape) == [-1]


def test_model_config(client: grpcclient.InferenceServerClient) -> None:
    config = client.get_model_config("simple").config
    assert config.name == "simple"
    assert config.backend == "python"
    assert config.max_batch_size == 8
    assert [i.name for i in config.input] == ["INPUT0", "INPUT1"]
    assert config.instance_group[0].count == 1
    assert config.instance_group[0].name == "simple_0"


def test_infer_simple(client: grpcclient.InferenceServerClient) -> None:
    inputs, a, b = _simple_inputs(batch=3)
    result = client.infer("simple", inputs, request_id="req-7")
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)
    response = result.get_response()
    assert response.id == "req-7"
    assert response.model_version == "1"


def test_requested_output_subset(client: grpcclient.InferenceServerClient) -> None:
    inputs, a, b = _simple_inputs()
    result = client.infer("simple", inputs,
                          outputs=[grpcclient.InferRequestedOutput("OUTPUT1")])
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)
    assert result.as_numpy("OUTPUT0") is None
    assert [o.name for o in result.get_response().outputs] == ["OUTPUT1"]


@pytest.mark.parametrize("datatype,array", [
    ("BOOL", np.array([True, False, True])),
    ("UINT8", np.array([0, 255, 7], dtype=np.uint8)),
    ("UINT16", np.array([0, 65535], dtype=np.uint16)),
    ("UINT32", np.array([0, 2**32 - 1], dtype=np.uint32)),
    ("UINT64", np.array([0, 2**64 - 1], dtype=np.uint64)),
    ("INT8", np.array([-128, 127], dtype=np.int8)),
    ("INT16", np.array([-32768, 32767], dtype=np.int16)),
    ("INT32", np.array([-(2**31), 2**31 - 1], dtype=np.int32)),
    ("INT64", np.array([-(2**63), 2**63 - 1], dtype=np.int64)),
    ("FP16", np.array([0.5, -2.25, 65504], dtype=np.float16)),
    ("FP32", np.array([1.5, -0.0, np.inf], dtype=np.float32)),
    ("FP64", np.array([1e300, -1e-300], dtype=np.float64)),
    ("BYTES", np.array([b"", b"abc", b"\x00\xff", "é".encode()], dtype=object)),
])
def test_every_datatype_raw(client: grpcclient.InferenceServerClient, datatype: str,
                            array: np.ndarray) -> None:
    name = "STRING" if datatype == "BYTES" else datatype
    tensor = grpcclient.InferInput(f"IN_{name}", list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    result = client.infer("echo_all", [tensor])
    out = result.as_numpy(f"OUT_{name}")
    assert out.dtype == array.dtype or datatype == "BYTES"
    np.testing.assert_array_equal(out, array)


def test_typed_contents(server: ServerProcess) -> None:
    """Inputs in InferTensorContents (not raw) are accepted for every type that allows it."""
    from shmserve.protos import shmserve_service_pb2 as pb
    request = pb.ModelInferRequest(model_name="echo_all")
    cases = {"INT32": ("int_contents", [1, -2, 3]), "FP64": ("fp64_contents", [0.25]),
             "BOOL": ("bool_contents", [True, False]), "UINT64": ("uint64_contents", [2**63]),
             "STRING": ("bytes_contents", [b"x", b"yz"])}
    for name, (field, values) in cases.items():
        tensor = request.inputs.add(name=f"IN_{name}",
                                    datatype="BYTES" if name == "STRING" else name,
                                    shape=[len(values)])
        getattr(tensor.contents, field).extend(values)
    with grpc.insecure_channel(server.url) as channel:
        infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                                    request_serializer=pb.ModelInferRequest.SerializeToString,
                                    response_deserializer=pb.ModelInferResponse.FromString)
        response = infer(request, timeout=10)
    outputs = {o.name: i for i, o in enumerate(response.outputs)}
    raw = response.raw_output_contents
    assert np.frombuffer(raw[outputs["OUT_INT32"]], np.int32).tolist() == [1, -2, 3]
    assert np.frombuffer(raw[outputs["OUT_FP64"]], np.float64).tolist() == [0.25]
    assert np.frombuffer(raw[outputs["OUT_BOOL"]], np.bool_).tolist() == [True, False]
    assert np.frombuffer(raw[outputs["OUT_UINT64"]], np.uint64).tolist() == [2**63]
    assert raw[outputs["OUT_STRING"]] == b"\x01\x00\x00\x00x\x02\x00\x00\x00yz"


def test_large_payload_round_trip(client: grpcclient.InferenceServerClient) -> None:
    data = np.random.default_rng(1).random(4 * 1024 * 1024, dtype=np.float32)  # 16 MiB
    tensor = grpcclient.InferInput("INPUT0", list(data.shape), "FP32")
    tensor.set_data_from_numpy(data)
    result = client.infer("identity_fp32", [tensor])
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), data)


def test_bytes_model(client: grpcclient.InferenceServerClient) -> None:
    text = np.array([[b"hello", b"world"]], dtype=object)
    tensor = grpcclient.InferInput("TEXT", [1, 2], "BYTES")
    tensor.set_data_from_numpy(text)
    result = client.infer("string_upper", [tensor])
    assert result.as_numpy("UPPER").tolist() == [[b"HELLO", b"WORLD"]]


def test_stream_infer(server: ServerProcess) -> None:
    results: list[object] = []
    with grpcclient.InferenceServerClient(server.url) as triton:
        triton.start_stream(callback=lambda result, error: results.append(error or result))
        for index in range(5):
            inputs, _, _ = _simple_inputs()
            triton.async_stream_infer("simple", inputs, request_id=str(index))
        bad = grpcclient.InferInput("INPUT0", [1, 16], "FP32")
        bad.set_data_from_numpy(np.zeros((1, 16), np.float32))
        triton.async_stream_infer("simple", [bad, _simple_inputs()[0][1]], request_id="bad")
        for index in range(5, 8):
            inputs, _, _ = _simple_inputs()
            triton.async_stream_infer("simple", inputs, request_id=str(index))
        triton.stop_stream()
    errors = [r for r in results if isinstance(r, InferenceServerException)]
    oks = [r for r in results if not isinstance(r, InferenceServerException)]
    assert len(oks) == 8 and len(errors) == 1
    assert "data-type is 'FP32'" in errors[0].message()
    assert sorted(r.get_response().id for r in oks) == [str(i) for i in range(8)]


def test_statistics(client: grpcclient.InferenceServerClient) -> None:
    before = client.get_inference_statistics("simple").model_stats[0]
    inputs, _, _ = _simple_inputs(batch=2)
    client.infer("simple", inputs)
    stats = client.get_inference_statistics("simple").model_stats[0]
    assert stats.name == "simple" and stats.version == "1"
    assert stats.inference_count == before.inference_count + 2
    assert stats.execution_count == before.execution_count + 1
    assert stats.inference_stats.success.count == before.inference_stats.success.count + 1
    assert stats.inference_stats.queue.ns > 0
    assert stats.inference_stats.compute_infer.ns > before.inference_stats.compute_infer.ns
    assert stats.last_inference > 0
    assert any(b.batch_size == 2 for b in stats.batch_stats)
    everything = client.get_inference_statistics()
    assert {s.name for s in everything.model_stats} >= set(MODELS)


def test_repository_index(client: grpcclient.InferenceServerClient) -> None:
    index = client.get_model_repository_index()
    states = {(m.name, m.version): m.state for m in index.models}
    for name in MODELS:
        assert states[(name, "1")] == "READY"


def test_trace_settings_default_to_off(client: grpcclient.InferenceServerClient) -> None:
    settings = client.get_trace_settings(as_json=True)["settings"]
    assert settings["trace_level"] == {"value": ["OFF"]}
    assert settings["trace_rate"] == {"value": ["1000"]}
    assert settings["trace_mode"] == {"value": ["triton"]}


def test_log_settings(client: grpcclient.InferenceServerClient) -> None:
    settings = client.get_log_settings(as_json=True)
    assert "log_verbose_level" in settings["settings"]


def test_package_imports_from_outside_checkout(tmp_path: Path) -> None:
    code = ("import shmserve.daemon, shmserve.workers, shmserve.client, shmserve.protos, "
            "shmserve.repoagents; print(shmserve.daemon.__file__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                         text=True, check=True)
    assert "daemon" in out.stdout


def test_supervisor_never_imports_torch_or_cuda(tmp_path: Path) -> None:
    code = ("import sys; import shmserve.daemon.supervisor, shmserve.daemon.cli; "
            "bad = [m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'cuda', 'onnxruntime', 'onnx')]; "
            "print(bad); sys.exit(1 if bad else 0)")
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True)


def test_tritonclient_and_our_protos_in_one_process(server: ServerProcess) -> None:
    code = ("import tritonclient.grpc as g; from shmserve.protos import shmserve_service_pb2; "
            f"c = g.InferenceServerClient('{server.url}'); assert c.is_server_live()")
    subprocess.run([sys.executable, "-W", "error", "-c", code], check=True, timeout=60)


def test_supervisor_keeps_sigterm_after_starting_workers(tmp_path: Path) -> None:
    code = ("import signal; import shmserve.daemon.supervisor, shmserve.workers.main; "
            "assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL")
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True)


def test_prometheus_metrics(server: ServerProcess,
                            client: grpcclient.InferenceServerClient) -> None:
    import re
    inputs, _, _ = _simple_inputs()
    client.infer("simple", inputs)
    text = server.metrics_page()
    success = re.search(r'nv_inference_request_success\{model="simple",version="1"\} (\d+)',
                        text)
    assert success and int(success.group(1)) >= 1
    assert "# TYPE nv_inference_queue_duration_us counter" in text
    assert re.search(r'shmserve_instance_up\{model="simple",version="1",'
                     r'instance="simple_0_0",kind="KIND_CPU",device="cpu",pid="\d+"\} 1', text)
