"""Bad input gets Triton's status code and text, and never takes anything down."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from shmserve.protos import shmserve_service_pb2 as pb
from shmserve.tests.conftest import GRPC_FRONTENDS, frontends_id, serve_models
from shmserve.tests.serverproc import ServerProcess

MODELS = ["simple", "string_upper", "raiser", "identity_fp32"]


@pytest.fixture(scope="module", params=GRPC_FRONTENDS, ids=frontends_id)
def server(tmp_path_factory: pytest.TempPathFactory,
           request: pytest.FixtureRequest) -> Iterator[ServerProcess]:
    yield from serve_models(tmp_path_factory, MODELS, request.param)


@pytest.fixture(scope="module")
def raw_infer(server: ServerProcess) -> Iterator[Callable[[pb.ModelInferRequest], object]]:
    channel = grpc.insecure_channel(server.url)
    call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                               request_serializer=pb.ModelInferRequest.SerializeToString,
                               response_deserializer=pb.ModelInferResponse.FromString)
    yield lambda request: call(request, timeout=10)
    channel.close()


def _expect(call: Callable[[], object], code: grpc.StatusCode, text: str) -> None:
    with pytest.raises(grpc.RpcError) as error:
        call()
    assert error.value.code() == code, error.value.details()
    assert error.value.details() == text


def _simple(batch: int = 1, dtype: str = "INT32", width: int = 16) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="simple")
    for name in ("INPUT0", "INPUT1"):
        request.inputs.add(name=name, datatype=dtype, shape=[batch, width])
        request.raw_input_contents.append(bytes(4 * batch * width))
    return request


def test_unknown_model(raw_infer: Callable[..., object]) -> None:
    request = _simple()
    request.model_name = "nope"
    _expect(lambda: raw_infer(request), grpc.StatusCode.NOT_FOUND,
            "Request for unknown model: 'nope' is not found")


def test_unknown_version(raw_infer: Callable[..., object]) -> None:
    request = _simple()
    request.model_version = "7"
    _expect(lambda: raw_infer(request), grpc.StatusCode.NOT_FOUND,
            "Request for unknown model: 'simple' version 7 is not found")


def test_missing_input(raw_infer: Callable[..., object]) -> None:
    request = _simple()
    del request.inputs[1]
    del request.raw_input_contents[1]
    _expect(lambda: raw_infer(request), grpc.StatusCode.INVALID_ARGUMENT,
            "expected 2 inputs but got 1 inputs for model 'simple'. Got input(s) ['INPUT0'], "
            "but missing required input(s) ['INPUT1']. Please provide all required input(s).")


def test_unexpected_input(raw_infer: Callable[..., object]) -> None:
    request = _simple()
    request.inputs.add(name="INPUT9", datatype="INT32", shape=[1, 16])
    request.raw_input_contents.append(bytes(64))
    _expect(lambda: raw_infer(request), grpc.StatusCode.INVALID_ARGUMENT,
            "unexpected inference input 'INPUT9' for model 'simple'")


def test_wrong_datatype(raw_infer: Callable[..., object]) -> None:
    _expect(lambda: raw_infer(_simple(dtype="FP32")), grpc.StatusCode.INVALID_ARGUMENT,
            "inference input 'INPUT0' data-type is 'FP32', but model 'simple' expects 'INT32'")


def test_wrong_shape(raw_infer: Callable[..., object]) -> None:
    _expect(lambda: raw_infer(_simple(width=8)), grpc.StatusCode.INVALID_ARGUMENT,
            "unexpected shape for input 'INPUT0' for model 'simple'. Expected [-1,16], "
            "got [1,8]")


def test_byte_size_mismatch(raw_infer: Callable[..., object]) -> None:
    request = _simple()
    request.raw_input_contents[0] = bytes(128)
    _expect(lambda: raw_infer(request), grpc.StatusCode.INVALID_ARGUMENT,
            "input byte size mismatch for input 'INPUT0' for model 'simple'. Expected 64, "
            "got 128")


def test_batch_too_large(raw_infer: Callable[..., object]) -> None:
    _expect(lambda: raw_infer(_simple(batch=9)), grpc.StatusCode.INVALID_ARGUMENT,
            "inference request batch-size must be <= 8 for 'simple'")


def test_unknown_requested_output(raw_infer: Callable[..., object]) -> None:
    request = _simple()
    request.outputs.add(name="OUTPUT7")
    _expect(lambda: raw_infer(request), grpc.StatusCode.INVALID_ARGUMENT,
            "unexpected inference output 'OUTPUT7' for model 'simple'")


@pytest.mark.parametrize("payload,detail", [
    (b"\x05\x00\x00\x00abc", "element length exceeds the buffer"),
    (b"\x01\x00", "truncated length prefix"),
    (b"\x01\x00\x00\x00a\x01\x00\x00\x00b\x01\x00\x00\x00c", "expected 2 elements, found more"),
])
def test_bad_bytes_encoding(raw_infer: Callable[..., object], payload: bytes,
                            detail: str) -> None:
    request = pb.ModelInferRequest(model_name="string_upper")
    request.inputs.add(name="TEXT", datatype="BYTES", shape=[1, 2])
    request.raw_input_contents.append(payload)
    _expect(lambda: raw_infer(request), grpc.StatusCode.INVALID_ARGUMENT,
            f"malformed BYTES data for inference input 'TEXT' for model 'string_upper': "
            f"{detail}")


def test_contents_with_raw(raw_infer: Callable[..., object]) -> None:
    request = _simple()
    request.inputs[0].contents.int_contents.extend([0] * 16)
    _expect(lambda: raw_infer(request), grpc.StatusCode.INVALID_ARGUMENT,
            "contents field must not be specified when using raw_input_contents for 'INPUT0' "
            "for model 'simple'")


def test_fp16_only_raw(raw_infer: Callable[..., object]) -> None:
    request = pb.ModelInferRequest(model_name="identity_fp32")
    request.inputs.add(name="INPUT0", datatype="FP32", shape=[2])
    request.inputs[0].contents.int_contents.extend([1, 2])
    _expect(lambda: raw_infer(request), grpc.StatusCode.INVALID_ARGUMENT,
            "unexpected number of elements 0 in contents for inference input 'INPUT0' for "
            "model 'identity_fp32', expecting 2")


def _raiser(values: list[int]) -> list[grpcclient.InferInput]:
    tensor = grpcclient.InferInput("INPUT0", [1, 1], "INT32")
    tensor.set_data_from_numpy(np.array([values], dtype=np.int32).reshape(1, 1))
    return [tensor]


def test_model_error_fails_only_that_request(server: ServerProcess) -> None:
    """Requests batched together: the TritonError one fails, the others succeed."""
    results: dict[str, object] = {}

    def record(key: str, result: object, error: object) -> None:
        results[key] = error or result

    with grpcclient.InferenceServerClient(server.url) as client:
        for value in (5, -1, 6):
            client.async_infer("raiser", _raiser([value]), request_id=str(value),
                               callback=functools.partial(record, str(value)))
        deadline = time.monotonic() + 10
        while len(results) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
    assert isinstance(results["-1"], InferenceServerException)
    assert results["-1"].message() == "negative input rejected"
    for value in ("5", "6"):
        assert not isinstance(results[value], InferenceServerException), results[value]
        assert results[value].as_numpy("OUTPUT0").tolist() == [[int(value)]]


def test_model_exception_reported_and_worker_survives(server: ServerProcess) -> None:
    with grpcclient.InferenceServerClient(server.url) as client:
        with pytest.raises(InferenceServerException) as error:
            client.infer("raiser", _raiser([0]))
        assert "model exploded on zero" in error.value.message()
        assert error.value.status() == "StatusCode.INTERNAL"
        ok = client.infer("raiser", _raiser([4]))
        assert ok.as_numpy("OUTPUT0").tolist() == [[4]]
        assert client.is_server_live()
