"""Seeded, bounded fuzzing of the shared-memory and infer RPCs against one real server, through
gRPC and the local channel: every answer is a status (never a crash or a hang), the server
keeps serving, and it leaves no arena behind."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shmserve.client import Client, ShmserveError, SystemRegion
from shmserve.client.local_channel import LocalChannel
from shmserve.protos import shmserve_service_pb2 as pb
from shmserve.tests.conftest import assert_no_arenas
from shmserve.tests.serverproc import ServerProcess, build_repository

FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])
A = np.arange(16, dtype=np.int32).reshape(1, 16)
REGISTER_CODES = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.INTERNAL,
                  grpc.StatusCode.ALREADY_EXISTS}
INFER_CODES = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
               grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNIMPLEMENTED,
               grpc.StatusCode.INTERNAL}


class Fuzzed:
    def __init__(self, server: ServerProcess, socket: Path) -> None:
        self.server = server
        self.socket = socket
        self.channel = grpc.insecure_channel(server.url)
        self.segment = SystemRegion(4096)

    def call(self, method: str, request: object, response_type: type) -> grpc.RpcError | None:
        stub = self.channel.unary_unary(
            f"/inference.GRPCInferenceService/{method}",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=response_type.FromString)  # type: ignore[attr-defined]
        try:
            stub(request, timeout=30)
        except grpc.RpcError as exc:
            return exc
        return None

    def close(self) -> None:
        self.channel.close()
        self.segment.close()


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzzed]:
    base = tmp_path_factory.mktemp("fuzz")
    socket = base / "s.sock"
    server = ServerProcess(build_repository(base / "repo", ["simple", "string_upper"]),
                           "--local-socket", str(socket))
    server.wait_ready()
    state = Fuzzed(server, socket)
    yield state
    state.close()
    assert server.process.poll() is None, server.log()  # still up after everything
    with Client(server.url) as client:
        np.testing.assert_array_equal(
            client.infer("simple", {"INPUT0": A, "INPUT1": A})["OUTPUT0"], A + A)
    assert server.stop() == 0, server.log()
    assert_no_arenas(server.pid)


KEYS = st.one_of(
    st.text(max_size=40),
    st.text(alphabet=st.sampled_from("/\x00.ab_-\n"), max_size=12),
    st.sampled_from(["/", "//x", "/..", "/x\x00y", "\x00", "/shmserve_arena_1_x_1", "a" * 300]),
)
NAMES = st.one_of(st.text(max_size=20), st.sampled_from(["", "@1:x", "\x00", "n" * 5000]))
SIZES = st.one_of(st.integers(0, 8192), st.sampled_from([2**63, 2**64 - 1]))


@FUZZ
@given(name=NAMES, key=KEYS, offset=SIZES, byte_size=SIZES, real_key=st.booleans())
def test_fuzz_system_shm_rpcs(fuzzed: Fuzzed, name: str, key: str, offset: int,
                              byte_size: int, real_key: bool) -> None:
    key = fuzzed.segment.key if real_key else key
    error = fuzzed.call("SystemSharedMemoryRegister",
                        pb.SystemSharedMemoryRegisterRequest(name=name, key=key, offset=offset,
                                                             byte_size=byte_size),
                        pb.SystemSharedMemoryRegisterResponse)
    assert error is None or error.code() in REGISTER_CODES, (error.code(), error.details())
    assert error is None or len(error.details()) < 2048
    fuzzed.call("SystemSharedMemoryStatus", pb.SystemSharedMemoryStatusRequest(name=name),
                pb.SystemSharedMemoryStatusResponse)
    unregistered = fuzzed.call("SystemSharedMemoryUnregister",
                               pb.SystemSharedMemoryUnregisterRequest(name=name),
                               pb.SystemSharedMemoryUnregisterResponse)
    assert unregistered is None


@FUZZ
@given(name=st.text(max_size=20), key=KEYS, offset=st.integers(-5, 8192),
       byte_size=st.integers(-5, 8192), real_key=st.booleans())
def test_fuzz_local_channel_registration(fuzzed: Fuzzed, name: str, key: str, offset: int,
                                         byte_size: int, real_key: bool) -> None:
    channel = LocalChannel(str(fuzzed.socket))
    try:
        message = {"op": "register", "id": 1, "name": name,
                   "key": fuzzed.segment.key if real_key else key,
                   "offset": offset, "byte_size": byte_size}
        try:
            channel.call(message, timeout=30)
        except ShmserveError as exc:
            assert exc.code in REGISTER_CODES | {grpc.StatusCode.UNAVAILABLE}, exc
            assert exc.code != grpc.StatusCode.UNAVAILABLE or not channel.closed
        channel.call({"op": "ping", "id": 2}, timeout=30)  # the channel survived
    finally:
        channel.close()


DATATYPES = st.sampled_from(["INT32", "FP32", "BYTES", "BOOL", "FP16", "BF16", "UINT64", "X",
                             ""])


@st.composite
def infer_requests(draw: st.DrawFn) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=draw(st.sampled_from(["simple", "string_upper",
                                                                    "nope", ""])),
                                   model_version=draw(st.sampled_from(["", "1", "-1", "x"])),
                                   id=draw(st.text(max_size=10)))
    for _ in range(draw(st.integers(0, 3))):
        tensor = request.inputs.add(name=draw(st.sampled_from(["INPUT0", "INPUT1", "X", ""])),
                                    datatype=draw(DATATYPES))
        tensor.shape.extend(draw(st.lists(st.integers(-2, 20), max_size=3)))
        if draw(st.booleans()):
            request.raw_input_contents.append(draw(st.binary(max_size=128)))
        if draw(st.booleans()):
            tensor.parameters["shared_memory_region"].string_param = draw(NAMES)
            tensor.parameters["shared_memory_byte_size"].int64_param = draw(
                st.integers(-1, 1 << 20))
            tensor.parameters["shared_memory_offset"].int64_param = draw(st.integers(-1, 64))
    for _ in range(draw(st.integers(0, 2))):
        output = request.outputs.add(name=draw(st.sampled_from(["OUTPUT0", "OUTPUT1", "Y"])))
        if draw(st.booleans()):
            output.parameters["binary_data"].bool_param = True
    return request


@FUZZ
@given(request=infer_requests())
def test_fuzz_model_infer(fuzzed: Fuzzed, request: pb.ModelInferRequest) -> None:
    error = fuzzed.call("ModelInfer", request, pb.ModelInferResponse)
    assert error is None or error.code() in INFER_CODES, (error.code(), error.details())
