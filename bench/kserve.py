"""The KServe-v2 requests the bench sends, how their answers are verified, and small RPC helpers.

Everything speaks raw gRPC with shmserve's own protobuf messages (wire-identical to Triton's),
so the same code measures shmserve, Triton or any other KServe-v2 gRPC server.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np

from shmserve.protos import shmserve_service_pb2 as pb

SERVICE = "/inference.GRPCInferenceService/"
INFER = SERVICE + "ModelInfer"
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", 2**31 - 1),
    ("grpc.max_receive_message_length", 2**31 - 1),
]


class CheckFailed(AssertionError):
    """A server answered, but not with the right result."""


class Rpc:
    """Blocking calls to one server, for setup and verification (not for load)."""

    def __init__(self, url: str, timeout_s: float = 60.0) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self.channel = grpc.insecure_channel(url, options=CHANNEL_OPTIONS)

    def call(self, method: str, request: Any, response_type: Any) -> Any:
        stub = self.channel.unary_unary(SERVICE + method,
                                        request_serializer=lambda m: m.SerializeToString(),
                                        response_deserializer=response_type.FromString)
        return stub(request, timeout=self.timeout_s)

    def infer_bytes(self, request: bytes) -> bytes:
        stub = self.channel.unary_unary(INFER)
        return bytes(stub(request, timeout=self.timeout_s))

    def model_ready(self, name: str) -> bool:
        try:
            return bool(self.call("ModelReady", pb.ModelReadyRequest(name=name),
                                  pb.ModelReadyResponse).ready)
        except grpc.RpcError:
            return False

    def wait_live(self, timeout_s: float) -> None:
        import time
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if self.call("ServerLive", pb.ServerLiveRequest(), pb.ServerLiveResponse).live:
                    return
            except grpc.RpcError:
                if time.monotonic() > deadline:
                    raise
            time.sleep(0.05)

    def statistics(self, name: str) -> dict[str, int] | None:
        """Cumulative ModelStatistics counters of a model (all versions), None if unanswered."""
        try:
            answer = self.call("ModelStatistics", pb.ModelStatisticsRequest(name=name),
                               pb.ModelStatisticsResponse)
        except grpc.RpcError:
            return None
        stats = list(answer.model_stats)
        if not stats:
            return None
        totals = {"inference_count": sum(s.inference_count for s in stats),
                  "execution_count": sum(s.execution_count for s in stats)}
        for field in ("success", "queue", "compute_input", "compute_infer", "compute_output"):
            totals[f"{field}_count"] = sum(getattr(s.inference_stats, field).count
                                           for s in stats)
            totals[f"{field}_ns"] = sum(getattr(s.inference_stats, field).ns for s in stats)
        return totals

    def register_system(self, name: str, key: str, byte_size: int) -> None:
        self.call("SystemSharedMemoryRegister",
                  pb.SystemSharedMemoryRegisterRequest(name=name, key=key, offset=0,
                                                       byte_size=byte_size),
                  pb.SystemSharedMemoryRegisterResponse)

    def unregister_system(self, name: str) -> None:
        self.call("SystemSharedMemoryUnregister",
                  pb.SystemSharedMemoryUnregisterRequest(name=name),
                  pb.SystemSharedMemoryUnregisterResponse)

    def register_cuda(self, name: str, raw_handle: bytes, device_id: int, byte_size: int) -> None:
        self.call("CudaSharedMemoryRegister",
                  pb.CudaSharedMemoryRegisterRequest(name=name, raw_handle=raw_handle,
                                                     device_id=device_id, byte_size=byte_size),
                  pb.CudaSharedMemoryRegisterResponse)

    def unregister_cuda(self, name: str) -> None:
        self.call("CudaSharedMemoryUnregister",
                  pb.CudaSharedMemoryUnregisterRequest(name=name),
                  pb.CudaSharedMemoryUnregisterResponse)

    def close(self) -> None:
        self.channel.close()


def statistics_delta(before: dict[str, int] | None, after: dict[str, int] | None
                     ) -> dict[str, float]:
    """Average server-side times per request (ms) and batch size between two snapshots."""
    if not before or not after:
        return {}
    delta = {key: after[key] - before.get(key, 0) for key in after}
    out: dict[str, float] = {}
    if delta["execution_count"] > 0:
        out["avg_batch"] = delta["inference_count"] / delta["execution_count"]
    for field in ("success", "queue", "compute_input", "compute_infer", "compute_output"):
        if delta[f"{field}_count"] > 0:
            out[f"{field}_ms"] = delta[f"{field}_ns"] / delta[f"{field}_count"] / 1e6
    return out


def shm_params(params: Any, region: str, byte_size: int, offset: int = 0) -> None:
    params["shared_memory_region"].string_param = region
    params["shared_memory_byte_size"].int64_param = byte_size
    if offset:
        params["shared_memory_offset"].int64_param = offset


# --- requests and their checks --------------------------------------------------------------
Check = Callable[[pb.ModelInferResponse], None]


@dataclass(slots=True)
class Probe:
    """One request, serialized, with the check its answer must pass."""

    model: str
    request: bytes
    check: Check


def _output(response: pb.ModelInferResponse, name: str) -> tuple[Any, bytes]:
    for index, tensor in enumerate(response.outputs):
        if tensor.name == name:
            raw = response.raw_output_contents
            return tensor, (raw[index] if index < len(raw) else b"")
    raise CheckFailed(f"output '{name}' missing from the response")


def _expect_array(response: pb.ModelInferResponse, name: str, expected: np.ndarray,
                  datatype: str) -> None:
    tensor, raw = _output(response, name)
    if tensor.datatype != datatype:
        raise CheckFailed(f"{name}: datatype {tensor.datatype}, expected {datatype}")
    if list(tensor.shape) != list(expected.shape):
        raise CheckFailed(f"{name}: shape {list(tensor.shape)}, expected {list(expected.shape)}")
    got = np.frombuffer(raw, dtype=expected.dtype)
    if got.size != expected.size or not np.array_equal(got, expected.reshape(-1)):
        raise CheckFailed(f"{name}: wrong values")


def simple_probe(model: str = "simple", seed: int = 1) -> Probe:
    """Triton's simple model: OUTPUT0 = INPUT0 + INPUT1, OUTPUT1 = INPUT0 - INPUT1."""
    rng = np.random.default_rng(seed)
    a = rng.integers(-1000, 1000, size=(1, 16), dtype=np.int32)
    b = rng.integers(-1000, 1000, size=(1, 16), dtype=np.int32)
    request = pb.ModelInferRequest(model_name=model)
    for name, value in (("INPUT0", a), ("INPUT1", b)):
        request.inputs.add(name=name, datatype="INT32", shape=list(value.shape))
        request.raw_input_contents.append(value.tobytes())
    for name in ("OUTPUT0", "OUTPUT1"):
        request.outputs.add(name=name)

    def check(response: pb.ModelInferResponse) -> None:
        _expect_array(response, "OUTPUT0", a + b, "INT32")
        _expect_array(response, "OUTPUT1", a - b, "INT32")

    return Probe(model, request.SerializeToString(), check)


def identity_payload_probe(nbytes: int, model: str = "identity_fp32", seed: int = 2) -> Probe:
    data = np.random.default_rng(seed).standard_normal(max(1, nbytes // 4), dtype=np.float32)
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="INPUT0", datatype="FP32", shape=[data.size])
    request.raw_input_contents.append(data.tobytes())
    request.outputs.add(name="OUTPUT0")

    def check(response: pb.ModelInferResponse) -> None:
        _expect_array(response, "OUTPUT0", data, "FP32")

    return Probe(model, request.SerializeToString(), check)


def identity_shm_request(nbytes: int, in_region: str, out_region: str,
                         model: str = "identity_fp32") -> bytes:
    """Input and output both in registered regions: the message carries only metadata."""
    request = pb.ModelInferRequest(model_name=model)
    tensor = request.inputs.add(name="INPUT0", datatype="FP32", shape=[max(1, nbytes // 4)])
    shm_params(tensor.parameters, in_region, nbytes)
    output = request.outputs.add(name="OUTPUT0")
    shm_params(output.parameters, out_region, nbytes)
    return request.SerializeToString()


def check_shm_metadata(response: pb.ModelInferResponse, count: int) -> None:
    tensor, raw = _output(response, "OUTPUT0")
    if list(tensor.shape) != [count] or tensor.datatype != "FP32":
        raise CheckFailed(f"OUTPUT0: {tensor.datatype} {list(tensor.shape)}, expected FP32 "
                          f"[{count}]")
    if raw:
        raise CheckFailed(f"OUTPUT0 in shared memory, but {len(raw)} bytes came in the message")


def burn_probe(model: str, value: int = 7) -> Probe:
    """The CPU-bound model: OUTPUT0 = INPUT0 * 3 + 1."""
    data = np.array([value], dtype=np.int32)
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="INPUT0", datatype="INT32", shape=[1])
    request.raw_input_contents.append(data.tobytes())
    request.outputs.add(name="OUTPUT0")

    def check(response: pb.ModelInferResponse) -> None:
        _expect_array(response, "OUTPUT0", data * 3 + 1, "INT32")

    return Probe(model, request.SerializeToString(), check)


def verify(rpc: Rpc, probe: Probe) -> bytes:
    """Send the probe once, check the answer, return the response bytes the load must match."""
    raw = rpc.infer_bytes(probe.request)
    probe.check(pb.ModelInferResponse.FromString(raw))
    return raw
