"""The ModelInfer wire codec: same meaning as protobuf, zero-copy slices, hostile bytes."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from shmserve.daemon.frontend.wire import (
    SMALL_REQUEST_BYTES,
    WireError,
    parse_infer_request,
    serialize_infer_response,
)
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
