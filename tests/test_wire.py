"""The ModelInfer wire codec: same meaning as protobuf, zero-copy slices, hostile bytes."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from shmserve.daemon.frontend.infer_grpc import response_head, response_metadata
from shmserve.daemon.frontend.wire import (
    SMALL_REQUEST_BYTES,
    WireError,
    parse_infer_request,
    serialize_infer_response,
)
from shmserve.daemon.request import InferRequest, OutputTensor, RequestedOutput
from shmserve.daemon.shm_registry import Region
from shmserve.protos import shmserve_service_pb2 as pb
from shmserve.tests.conftest import StartServer
from shmserve.tests.serverproc import ServerProcess


def _request(elements: int = 16) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="simple", id="r1")
    request.parameters["priority"].int64_param = 300
    for name in ("INPUT0", "INPUT1"):
        request.inputs.add(name=name, datatype="INT32", shape=[1, elements])
        request.raw_input_contents.append(np.arange(elements, dtype=np.int32).tobytes())
    request.outputs.add(name="OUTPUT0")
    return request


def test_parse_matches_protobuf_and_slices_without_copy() -> None:
    request = _request(SMALL_REQUEST_BYTES // 4)
    data = request.SerializeToString()
    message, raw = parse_infer_request(data)
    assert [bytes(item) for item in raw] == list(request.raw_input_contents)
    assert all(isinstance(item, memoryview) and item.obj is data for item in raw)  # views
    message.raw_input_contents.extend(bytes(item) for item in raw)
    assert message == request


def test_a_small_request_is_parsed_by_protobuf_whole() -> None:
    request = _request()
    message, raw = parse_infer_request(request.SerializeToString())
    assert raw == list(request.raw_input_contents) and not message.raw_input_contents
    message.raw_input_contents.extend(raw)
    assert message == request


def test_response_splices_raw_outputs() -> None:
    response = pb.ModelInferResponse(model_name="m", model_version="1", id="x")
    response.outputs.add(name="A", datatype="FP32", shape=[2])
    response.outputs.add(name="B", datatype="FP32", shape=[0])
    data = serialize_infer_response(response, [b"\x01" * 8, memoryview(b"")])
    decoded = pb.ModelInferResponse.FromString(data)
    assert list(decoded.raw_output_contents) == [b"\x01" * 8, b""]
    assert [o.name for o in decoded.outputs] == ["A", "B"]


@pytest.mark.parametrize("data", [
    b"\x3a\x10abc",               # raw_input_contents claims 16 bytes, has 3
    b"\x3a",                      # length missing
    b"\x0a\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01",   # varint too long
    b"\x0b",                      # wire type 3 (groups) is not supported
])
def test_malformed_bytes_raise(data: bytes) -> None:
    with pytest.raises(WireError):
        parse_infer_request(data)


def test_server_rejects_malformed_requests_and_keeps_serving(start_server: StartServer) -> None:
    server: ServerProcess = start_server(["simple"])
    with grpc.insecure_channel(server.url) as channel:
        infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        for garbage in (b"\x3a\x10abc", b"\x0a\x05si", b"\xff" * 20):
            with pytest.raises(grpc.RpcError) as error:
                infer(garbage, timeout=10)
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert error.value.details().startswith("malformed ModelInferRequest")
        answer = pb.ModelInferResponse.FromString(infer(_request().SerializeToString(),
                                                        timeout=10))
        assert np.frombuffer(answer.raw_output_contents[0], np.int32).tolist() == \
            list(range(0, 32, 2))


@pytest.mark.parametrize("request_id", ["", "req-7", "é" * 200])
def test_a_cached_response_head_is_protobufs_serialization(request_id: str) -> None:
    """The answer's metadata from the per-model cache is byte for byte what protobuf
    serializes, for any request id (and after the cache met the same outputs before)."""
    outputs = [OutputTensor("OUT0", "INT32", [1, 16], b"x" * 64),
               OutputTensor("OUT1", "BYTES", [2], b"\x01\x00\x00\x00a\x00\x00\x00\x00")]
    for version in (1, 1, 3):
        request = InferRequest("model_a", version, request_id, [], [], 1, None)  # type: ignore[arg-type]
        assert response_head(request, outputs) == \
            response_metadata(request, outputs).SerializeToString()
    other = InferRequest("model_b", 1, request_id, [], [], 1, None)  # type: ignore[arg-type]
    assert response_head(other, outputs[:1]) == \
        response_metadata(other, outputs[:1]).SerializeToString()


def test_a_response_head_with_a_region_output_names_the_region() -> None:
    region = Region("out_region", "system", "/key", 0, 64, "")
    request = InferRequest("model_a", 1, "r", [], [RequestedOutput("OUT0", region)], 1,
                           None)  # type: ignore[arg-type]
    outputs = [OutputTensor("OUT0", "INT32", [1, 16], None)]
    head = response_head(request, outputs)
    assert head == response_metadata(request, outputs).SerializeToString()
    parsed = pb.ModelInferResponse.FromString(head)
    assert parsed.outputs[0].parameters["shared_memory_region"].string_param == "out_region"
