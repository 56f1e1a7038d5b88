"""GPUs: CUDA shared-memory regions, workers pinned to their GPU, the pytorch backend on a GPU.

Tests marked ``gpu`` need a CUDA GPU, torch built with CUDA and cuda-python (tritonclient's
``cuda_shared_memory``); tests/conftest.py skips them on hosts without a GPU. The rest run
anywhere: CudaSharedMemoryRegister validation through the RPCs, the pinning environment of a
fresh process, the python backend's FORCE_CPU_ONLY_INPUT_TENSORS switch, and the worker's CUDA
IPC cache (workers/cuda_ipc.py) driven through a stand-in GPU whose "device memory" is host
memory.
"""

from __future__ import annotations

import base64
import concurrent.futures
import ctypes
import json
import os
import secrets
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from shmserve.protos import shmserve_service_pb2 as pb
from shmserve.protos.datatypes import serialize_bytes_tensor
from shmserve.tests.serverproc import ServerProcess, arena_segments, build_repository
from shmserve.workers.backend import BackendError, InstanceSpec, ModelSpec, Request
from shmserve.workers.cuda_ipc import (
    CudaError,
    CudaPythonRuntime,
    CudaRegions,
    IpcMapping,
    _CudaArrayView,
    local_ordinal,
    output_meta,
    probe_region,
)
from shmserve.workers.protocol import CUDA, TensorRef

# =============================================================================================
# A stand-in GPU for the worker's CUDA IPC cache


class FakeGpu:
    """CudaRuntime over host buffers: a handle names a buffer, its address is the pointer."""

    def __init__(self) -> None:
        self.buffers: dict[bytes, ctypes.Array[ctypes.c_char]] = {}
        self.opened: list[tuple[bytes, int]] = []
        self.closed: list[tuple[int, int]] = []
        self.copies: list[tuple[int, int, int, int]] = []
        self.failing_devices: set[int] = set()

    def allocate(self, size: int, fill: int = 0) -> bytes:
        handle = secrets.token_bytes(64)
        buffer = ctypes.create_string_buffer(size)
        ctypes.memset(buffer, fill, size)
        self.buffers[handle] = buffer
        return handle

    def memory(self, handle: bytes) -> memoryview:
        return memoryview(self.buffers[handle]).cast("B")

    def pointer(self, handle: bytes) -> int:
        return ctypes.addressof(self.buffers[handle])

    # -- CudaRuntime ---------------------------------------------------------------------------
    def open_handle(self, raw_handle: bytes, device: int) -> int:
        self.opened.append((raw_handle, device))
        if device in self.failing_devices or raw_handle not in self.buffers:
            raise CudaError("cudaIpcOpenMemHandle failed: cudaErrorInvalidValue: invalid argument")
        return self.pointer(raw_handle)

    def close_handle(self, pointer: int, device: int) -> None:
        self.closed.append((pointer, device))

    def allocation_size(self, pointer: int, device: int) -> int | None:
        for buffer in self.buffers.values():
            if ctypes.addressof(buffer) == pointer:
                return len(buffer)
        return None

    def copy(self, dst: int, src: int, nbytes: int, device: int, stream: int = 0) -> None:
        self.copies.append((dst, src, nbytes, device))
        ctypes.memmove(dst, src, nbytes)


def cuda_ref(name: str, datatype: str, shape: list[int], region_id: int, handle: bytes,
             device: int = 0, offset: int = 0, nbytes: int | None = None) -> TensorRef:
    size = nbytes if nbytes is not None else int(np.prod(shape)) * np.dtype(
        {"FP32": np.float32, "INT32": np.int32, "UINT8": np.uint8}.get(datatype, np.uint8)
    ).itemsize
    return TensorRef(name, datatype, shape, CUDA, [region_id, handle, device], offset, size)


@pytest.fixture
def gpu(monkeypatch: pytest.MonkeyPatch) -> FakeGpu:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return FakeGpu()


@pytest.mark.parametrize(("host_gpu", "visible", "ordinal"), [
    (3, None, 3),
    (3, "3", 0),
    (3, "1,3", 1),
    (2, "1,3", None),
    (3, "3,-1,2", 0),
    (2, "3,-1,2", None),           # CUDA ignores everything after an invalid entry
    (5, "GPU-8f2a1c", 0),          # pinned by UUID: the only device
    (5, "", None),
])
def test_local_ordinal(host_gpu: int, visible: str | None, ordinal: int | None) -> None:
    assert local_ordinal(host_gpu, visible) == ordinal


def test_handles_open_lazily_once_per_registration(gpu: FakeGpu) -> None:
    regions = CudaRegions(None, lambda: gpu)
    assert gpu.opened == [] and len(regions) == 0      # nothing happens before first use
    handle = gpu.allocate(64)
    ref = cuda_ref("x", "FP32", [4], 1, handle, device=2)
    regions.host_input(ref)
    regions.host_input(ref)
    assert gpu.opened == [(handle, 2)]                  # CPU instance: the region's GPU context
    # The same allocation registered again under another name is another registration.
    regions.host_input(cuda_ref("x", "FP32", [4], 2, handle, device=2))
    assert len(gpu.opened) == 2 and len(regions) == 2
    regions.release(1)
    assert gpu.closed == [(gpu.pointer(handle), 2)]
    regions.release(1)                                  # twice is harmless
    regions.release(2)
    assert len(gpu.closed) == 2 and len(regions) == 0


def test_release_waits_for_the_last_tensor_over_the_region(gpu: FakeGpu) -> None:
    regions = CudaRegions(None, lambda: gpu)
    handle = gpu.allocate(64)
    mapping = regions.mapping([7, handle, 0], "input 'x'")
    # What torch.as_tensor keeps alive for as long as the tensor (and its views) live:
    view = _CudaArrayView(mapping, mapping.pointer + 16, 32)
    assert view.__cuda_array_interface__ == {
        "shape": (32,), "typestr": "|u1", "data": (mapping.pointer + 16, False),
        "strides": None, "version": 3}
    del mapping
    regions.release(7)
    assert gpu.closed == []                             # a request's tensor still uses it
    del view
    assert gpu.closed == [(gpu.pointer(handle), 0)]


def test_close_all_closes_everything(gpu: FakeGpu) -> None:
    regions = CudaRegions(None, lambda: gpu)
    mappings = [regions.mapping([i, gpu.allocate(8), 0], "x") for i in range(3)]
    regions.close_all()
    assert all(isinstance(m, IpcMapping) and m.closed for m in mappings)
    assert len(gpu.closed) == 3


def test_host_input_at_an_offset(gpu: FakeGpu) -> None:
    regions = CudaRegions(None, lambda: gpu)
    handle = gpu.allocate(256, fill=0xEE)
    values = np.arange(12, dtype=np.float32)
    gpu.memory(handle)[100:148] = values.tobytes()
    array = regions.host_input(cuda_ref("x", "FP32", [3, 4], 1, handle, offset=100))
    np.testing.assert_array_equal(array, values.reshape(3, 4))
    words = np.array([b"cuda", b"", b"ipc"], dtype=np.object_)
    data = serialize_bytes_tensor(words)
    gpu.memory(handle)[200:200 + len(data)] = data
    parsed = regions.host_input(TensorRef("w", "BYTES", [3], CUDA, [1, handle, 0], 200, len(data)))
    assert parsed.tolist() == words.tolist()
    # BYTES always go through the host, whatever torch offers.
    assert regions.input(TensorRef("w", "BYTES", [3], CUDA, [1, handle, 0], 200,
                                   len(data))).tolist() == words.tolist()


def test_bounds_are_checked_against_the_allocation(gpu: FakeGpu) -> None:
    regions = CudaRegions(None, lambda: gpu)
    handle = gpu.allocate(64)
    with pytest.raises(BackendError) as caught:
        regions.host_input(cuda_ref("x", "FP32", [4], 1, handle, offset=56))
    assert caught.value.code == "INVALID_ARGUMENT"
    assert caught.value.message == ("input 'x' lies outside its CUDA shared memory region "
                                    "(offset 56 + 16 bytes, allocation of 64 bytes)")


def test_bad_handles(gpu: FakeGpu) -> None:
    regions = CudaRegions(None, lambda: gpu)
    with pytest.raises(BackendError, match=r"invalid CUDA IPC handle for input 'x': 10 bytes"):
        regions.host_input(cuda_ref("x", "FP32", [1], 1, b"0123456789"))
    with pytest.raises(BackendError) as caught:
        regions.host_input(cuda_ref("x", "FP32", [1], 2, secrets.token_bytes(64), device=1))
    assert caught.value.code == "INVALID_ARGUMENT"
    assert caught.value.message == (
        "failed to open the CUDA shared memory handle for input 'x' (GPU 1): "
        "cudaIpcOpenMemHandle failed: cudaErrorInvalidValue: invalid argument (device 1)")
    assert len(regions) == 0


def test_gpu_instance_opens_in_its_own_context(gpu: FakeGpu,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    # A worker of host GPU 2 runs with CUDA_VISIBLE_DEVICES=2: its GPU is ordinal 0.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2")
    regions = CudaRegions(2, lambda: gpu)
    own, other = gpu.allocate(64), gpu.allocate(64)
    assert regions.mapping([1, own, 2], "x").device == 0
    # A region on GPU 3 (hidden here) is opened in GPU 2's context too: lazy peer access.
    remote = regions.mapping([2, other, 3], "x")
    assert (remote.device, remote.host_gpu) == (0, 3)
    assert gpu.opened == [(own, 0), (other, 0)]


def test_falls_back_to_the_regions_own_context(gpu: FakeGpu,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    # When both GPUs are visible and peer mapping fails, open where the memory lives.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    gpu.failing_devices = {0}
    regions = CudaRegions(2, lambda: gpu)
    handle = gpu.allocate(64)
    assert regions.mapping([1, handle, 3], "x").device == 1
    assert gpu.opened == [(handle, 0), (handle, 1)]


def test_instance_gpu_not_visible(gpu: FakeGpu, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    regions = CudaRegions(2, lambda: gpu)
    with pytest.raises(BackendError, match="GPU 2 of this instance is not visible"):
        regions.mapping([1, gpu.allocate(8), 2], "x")


def test_outputs_are_written_into_the_region(gpu: FakeGpu) -> None:
    regions = CudaRegions(None, lambda: gpu)
    handle = gpu.allocate(128, fill=0xAB)
    target = TensorRef("y", "", [], CUDA, [1, handle, 0], 32, 64)
    values = np.arange(4, dtype=np.int32)
    assert regions.write(target, values, "y") == 16
    assert bytes(gpu.memory(handle)[32:48]) == values.tobytes()
    assert bytes(gpu.memory(handle)[48:64]) == b"\xab" * 16
    words = np.array([b"ab", b"c"], dtype=np.object_)
    assert regions.write(target, words, "y") == len(serialize_bytes_tensor(words))
    assert bytes(gpu.memory(handle)[32:43]) == serialize_bytes_tensor(words)
    with pytest.raises(BackendError) as caught:
        regions.write(target, np.zeros(17, np.float32), "y")
    assert caught.value.code == "INTERNAL"
    assert caught.value.message == (
        "shared memory size specified with the request for output 'y' (64 bytes) should be at "
        "least 68 bytes to hold the results")
    beyond = TensorRef("y", "", [], CUDA, [1, handle, 0], 100, 64)
    with pytest.raises(BackendError, match="output 'y' lies outside its CUDA shared memory"):
        regions.write(beyond, np.zeros(16, np.float32), "y")


def test_torch_outputs_and_metadata(gpu: FakeGpu) -> None:
    torch = pytest.importorskip("torch")
    regions = CudaRegions(None, lambda: gpu)
    handle = gpu.allocate(64)
    target = TensorRef("y", "", [], CUDA, [1, handle, 0], 0, 64)
    tensor = torch.arange(6, dtype=torch.float32).reshape(2, 3).t()   # not contiguous
    assert output_meta(tensor) == ("FP32", [3, 2], 24)
    assert regions.write(target, tensor, "y") == 24
    np.testing.assert_array_equal(np.frombuffer(bytes(gpu.memory(handle)[:24]), np.float32),
                                  tensor.contiguous().reshape(-1).numpy())
    assert output_meta(torch.zeros(2, dtype=torch.bfloat16)) == ("BF16", [2], 4)
    assert output_meta(np.array([b"abc"], dtype=np.object_)) == ("BYTES", [1], 7)
    from shmserve.workers.cuda_ipc import host_array
    half = host_array(torch.tensor([1.5, -2.0], dtype=torch.bfloat16))
    assert half.dtype.name == "bfloat16" and half.astype(np.float32).tolist() == [1.5, -2.0]


def test_device_outputs_are_copied_once_when_written(gpu: FakeGpu) -> None:
    torch = pytest.importorskip("torch")
    from shmserve.workers.cuda_ipc import DeviceOutput, device_output
    tensor = torch.arange(6, dtype=torch.int32).reshape(2, 3).t()     # not contiguous
    expected = tensor.contiguous().numpy().tobytes()
    assert device_output(tensor) is None            # CPU tensors take the host path
    out = DeviceOutput(tensor)
    assert len(out) == 24
    host = bytearray(32)
    out.write_to(memoryview(host)[4:28])            # e.g. straight into a system region
    assert bytes(host[4:28]) == expected and bytes(host[:4]) == bytes(4)
    assert bytes(out) == expected                   # inline in the control frame
    assert len(DeviceOutput(torch.zeros(0))) == 0
    regions = CudaRegions(None, lambda: gpu)
    handle = gpu.allocate(64)
    target = TensorRef("y", "", [], CUDA, [1, handle, 0], 8, 32)
    assert regions.write(target, out, "y") == 24
    assert bytes(gpu.memory(handle)[8:32]) == expected
    assert regions.write(target, memoryview(b"raw bytes"), "y") == 9
    assert bytes(gpu.memory(handle)[8:17]) == b"raw bytes"


def test_probe_region(gpu: FakeGpu) -> None:
    handle = gpu.allocate(256)
    assert probe_region(handle, 0, 256, gpu) is None
    assert probe_region(handle, 0, 257, gpu) == "byte_size 257 exceeds the allocation's 256 bytes"
    assert "cudaErrorInvalidValue" in (probe_region(secrets.token_bytes(64), 0, 8, gpu) or "")
    assert len(gpu.closed) == 2


def test_cuda_python_missing_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("cuda", "cuda.bindings", "cuda.bindings.runtime", "cuda.bindings.driver",
                 "cuda.cuda", "cuda.cudart"):
        monkeypatch.setitem(sys.modules, name, None)
    regions = CudaRegions(None)
    with pytest.raises(BackendError) as caught:
        regions.host_input(cuda_ref("x", "FP32", [1], 1, secrets.token_bytes(64)))
    assert caught.value.code == "UNAVAILABLE"
    assert "pip install 'shmserve[cuda]'" in caught.value.message


def test_real_cuda_python_on_a_host_without_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("cuda.bindings.runtime", reason="cuda-python is not installed")
    if os.path.isdir("/proc/driver/nvidia/gpus") and os.listdir("/proc/driver/nvidia/gpus"):
        pytest.skip("this host has a GPU")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    regions = CudaRegions(None, CudaPythonRuntime)
    with pytest.raises(BackendError) as caught:
        regions.host_input(cuda_ref("x", "FP32", [1], 1, secrets.token_bytes(64)))
    assert caught.value.code == "INVALID_ARGUMENT"
    # No driver: cudaSetDevice/cudaIpcOpenMemHandle report cudaErrorInsufficientDriver (or
    # cudaErrorNoDevice); either way the request fails with CUDA's own name for the problem.
    assert caught.value.message.startswith(
        "failed to open the CUDA shared memory handle for input 'x' (GPU 0): ")
    assert " failed: cudaError" in caught.value.message


# =============================================================================================
# Pinning, in a fresh process


def test_pin_process_sets_cuda_visible_devices_first() -> None:
    script = textwrap.dedent("""
        import json, os, sys
        from shmserve.workers.main import pin_process
        before = os.environ.get("CUDA_VISIBLE_DEVICES")
        pin_process("3", [0])
        pinned = os.environ.get("CUDA_VISIBLE_DEVICES")
        os.environ["CUDA_VISIBLE_DEVICES"] = "5"
        pin_process(None, None)             # a CPU instance: the environment is left alone
        print(json.dumps({
            "before": before, "pinned": pinned, "cpu": os.environ["CUDA_VISIBLE_DEVICES"],
            "affinity": sorted(os.sched_getaffinity(0)),
            "imported": sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "cuda")),
        }))
    """)
    env = {key: value for key, value in os.environ.items() if key != "CUDA_VISIBLE_DEVICES"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, timeout=60, check=True)
    report = json.loads(done.stdout)
    assert report == {"before": None, "pinned": "3", "cpu": "5", "affinity": [0],
                      "imported": []}


# =============================================================================================
# CudaSharedMemoryRegister validation (the supervisor never opens a handle)


@pytest.fixture(scope="module")
def cpu_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    repo = build_repository(tmp_path_factory.mktemp("cuda_rpc") / "repo", ["simple"])
    server = ServerProcess(repo)
    server.wait_ready()
    yield server
    assert server.stop() == 0, server.log()
    deadline = time.monotonic() + 5.0
    while arena_segments(server.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert arena_segments(server.pid) == []


def raw_register(url: str, request: pb.CudaSharedMemoryRegisterRequest) -> None:
    with grpc.insecure_channel(url) as channel:
        call = channel.unary_unary(
            "/inference.GRPCInferenceService/CudaSharedMemoryRegister",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=pb.CudaSharedMemoryRegisterResponse.FromString)
        call(request, timeout=10)


def test_cuda_register_validation(cpu_server: ServerProcess) -> None:
    triton = grpcclient.InferenceServerClient(cpu_server.url)
    try:
        def refused(name: str, handle: bytes, device: int, size: int) -> str:
            with pytest.raises(InferenceServerException) as caught:
                triton.register_cuda_shared_memory(name, base64.b64encode(handle), device, size)
            assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"
            message = str(caught.value.message())
            assert message.startswith(f"failed to register shared memory region '{name}': "
                                      f"invalid args"), message
            return message

        refused("short", b"\x01" * 10, 0, 64)
        refused("long", b"\x01" * 65, 0, 64)
        refused("empty", b"", 0, 64)
        refused("nodev", b"\x01" * 64, 4096, 64)
        refused("zero", b"\x01" * 64, 0, 0)
        if not (os.path.isdir("/proc/driver/nvidia/gpus")
                and os.listdir("/proc/driver/nvidia/gpus")):
            assert "(no GPU 0 on this host)" in refused("gpu0", b"\x01" * 64, 0, 64)
        for handle, device in ((b"\x02" * 63, 0), (b"\x02" * 64, -1)):
            with pytest.raises(grpc.RpcError) as raw:
                raw_register(cpu_server.url, pb.CudaSharedMemoryRegisterRequest(
                    name="raw", raw_handle=handle, device_id=device, byte_size=16))
            assert raw.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert raw.value.details() == ("failed to register shared memory region 'raw': "
                                           "invalid args")

        with pytest.raises(InferenceServerException) as caught:
            triton.get_cuda_shared_memory_status("nope")
        assert caught.value.status() == "StatusCode.NOT_FOUND"
        assert caught.value.message() == "Unable to find CUDA shared memory region: 'nope'"
        triton.unregister_cuda_shared_memory("nope")        # unknown name: OK, no-op
        triton.unregister_cuda_shared_memory()
        assert list(triton.get_cuda_shared_memory_status().regions) == []
        # The server keeps serving.
        values = np.arange(16, dtype=np.int32).reshape(1, 16)
        inputs = []
        for name in ("INPUT0", "INPUT1"):
            item = grpcclient.InferInput(name, [1, 16], "INT32")
            item.set_data_from_numpy(values)
            inputs.append(item)
        result = triton.infer("simple", inputs)
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), values * 2)
    finally:
        triton.close()


# =============================================================================================
# The python backend's FORCE_CPU_ONLY_INPUT_TENSORS (in-process, torch CPU tensors stand in for
# the torch CUDA tensors a CUDA region gives)

PROBE_MODEL = '''
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            tensor = pb_utils.get_input_tensor_by_name(request, "INPUT0")
            if tensor.is_cpu() and type(tensor._data).__module__ == "numpy":
                kind, doubled = "numpy", pb_utils.Tensor("OUTPUT0", tensor.as_numpy() * 2)
            else:
                import torch.utils.dlpack
                value = torch.utils.dlpack.from_dlpack(tensor.to_dlpack())
                kind, doubled = "dlpack", pb_utils.Tensor.from_dlpack("OUTPUT0", value * 2)
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                doubled, pb_utils.Tensor("KIND", np.array([kind.encode()], dtype=np.object_))]))
        return responses
'''


def probe_spec(tmp_path: Path, force_cpu: str | None) -> ModelSpec:
    version = tmp_path / "probe" / "1"
    version.mkdir(parents=True)
    (version / "model.py").write_text(PROBE_MODEL)
    config: dict[str, Any] = {
        "name": "probe", "backend": "python", "max_batch_size": 0,
        "input": [{"name": "INPUT0", "data_type": "TYPE_FP32", "dims": [-1]}],
        "output": [{"name": "OUTPUT0", "data_type": "TYPE_FP32", "dims": [-1]},
                   {"name": "KIND", "data_type": "TYPE_STRING", "dims": [1]}],
    }
    if force_cpu is not None:
        config["parameters"] = {"FORCE_CPU_ONLY_INPUT_TENSORS": {"string_value": force_cpu}}
    return ModelSpec("probe", 1, config, str(tmp_path / "probe"), str(version))


@pytest.mark.parametrize(("force_cpu", "kind"), [(None, "numpy"), ("yes", "numpy"),
                                                 ("no", "dlpack")])
def test_python_backend_force_cpu_only_input_tensors(tmp_path: Path, force_cpu: str | None,
                                                     kind: str) -> None:
    torch = pytest.importorskip("torch")
    from shmserve.workers.backends.python import PythonBackend
    spec = probe_spec(tmp_path, force_cpu)
    backend = PythonBackend()
    backend.model_initialize(spec)
    backend.instance_initialize(spec, InstanceSpec("probe_0_0", "KIND_CPU", 0, 0))
    try:
        [response] = backend.execute([Request("r", {"INPUT0": torch.arange(3.0)}, [])])
    finally:
        backend.instance_finalize()
        backend.model_finalize()
    assert response.error is None, response.error
    assert response.outputs["KIND"].tolist() == [kind.encode()]
    assert np.asarray(response.outputs["OUTPUT0"]).tolist() == [0.0, 2.0, 4.0]


# =============================================================================================
# On a GPU host


def cuda_stack() -> tuple[Any, Any]:
    """(torch, tritonclient.utils.cuda_shared_memory), or skip with the reason."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch was built without CUDA or sees no GPU")
    try:
        import tritonclient.utils.cuda_shared_memory as cudashm
    except (ImportError, RuntimeError) as exc:
        pytest.skip(f"tritonclient's CUDA shared memory needs cuda-python: {exc}")
    return torch, cudashm


GPU_PROBE = '''
import json
import os

import numpy as np
import torch
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.args = args

    def execute(self, requests):
        report = json.dumps({
            "visible": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "device_id": self.args["model_instance_device_id"],
            "kind": self.args["model_instance_kind"],
            "count": torch.cuda.device_count(),
        }).encode()
        return [pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor("REPORT", np.array([report], dtype=np.object_))])
            for _ in requests]
'''


def write_python_model(repo: Path, name: str, source: str, config: str) -> None:
    (repo / name / "1").mkdir(parents=True)
    (repo / name / "1" / "model.py").write_text(source)
    (repo / name / "config.pbtxt").write_text(config)


@pytest.fixture(scope="module")
def gpu_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    torch, _ = cuda_stack()
    from shmserve.tests import pt_models
    count = torch.cuda.device_count()
    repo = pt_models.build_pt_repository(tmp_path_factory.mktemp("gpu") / "repo",
                                         ["pt_simple", "pt_inplace", "pt_linear"])
    write_python_model(repo, "gpu_probe", GPU_PROBE, textwrap.dedent(f"""
        name: "gpu_probe"
        backend: "python"
        input [ {{ name: "INPUT0", data_type: TYPE_FP32, dims: [ 1 ] }} ]
        output [ {{ name: "REPORT", data_type: TYPE_STRING, dims: [ 1 ] }} ]
        instance_group [ {{ count: 1, kind: KIND_GPU, gpus: [ {count - 1} ] }} ]
    """))
    for name, force in (("gpu_dlpack", "no"), ("gpu_numpy", "yes")):
        write_python_model(repo, name, PROBE_MODEL, textwrap.dedent(f"""
            name: "{name}"
            backend: "python"
            input [ {{ name: "INPUT0", data_type: TYPE_FP32, dims: [ -1 ] }} ]
            output [
              {{ name: "OUTPUT0", data_type: TYPE_FP32, dims: [ -1 ] }},
              {{ name: "KIND", data_type: TYPE_STRING, dims: [ 1 ] }}
            ]
            parameters {{ key: "FORCE_CPU_ONLY_INPUT_TENSORS"
                          value: {{ string_value: "{force}" }} }}
            instance_group [ {{ count: 1, kind: KIND_GPU, gpus: [ 0 ] }} ]
        """))
    server = ServerProcess(repo)
    server.wait_ready(timeout=180)
    yield server
    assert server.stop() == 0, server.log()


@pytest.fixture
def triton(gpu_server: ServerProcess) -> Iterator[grpcclient.InferenceServerClient]:
    client = grpcclient.InferenceServerClient(gpu_server.url)
    client.unregister_cuda_shared_memory()
    yield client
    client.unregister_cuda_shared_memory()
    client.close()


class Regions:
    """tritonclient CUDA regions that are destroyed at the end of a test."""

    def __init__(self, cudashm: Any, client: grpcclient.InferenceServerClient) -> None:
        self.cudashm = cudashm
        self.client = client
        self.handles: list[Any] = []

    def create(self, name: str, size: int, device: int = 0,
               contents: list[np.ndarray] | None = None, register: bool = True) -> Any:
        handle = self.cudashm.create_shared_memory_region(name, size, device)
        self.handles.append(handle)
        if contents:
            self.cudashm.set_shared_memory_region(handle, contents)
        if register:
            self.client.register_cuda_shared_memory(name, self.cudashm.get_raw_handle(handle),
                                                    device, size)
        return handle

    def read(self, handle: Any, dtype: Any, shape: list[int]) -> np.ndarray:
        return np.asarray(self.cudashm.get_contents_as_numpy(handle, dtype, shape))

    def close(self) -> None:
        for handle in self.handles:
            self.cudashm.destroy_shared_memory_region(handle)


@pytest.fixture
def regions(triton: grpcclient.InferenceServerClient) -> Iterator[Regions]:
    _, cudashm = cuda_stack()
    made = Regions(cudashm, triton)
    yield made
    triton.unregister_cuda_shared_memory()
    made.close()


def shm_in(name: str, shape: list[int], datatype: str, region: str, size: int,
           offset: int = 0) -> grpcclient.InferInput:
    item = grpcclient.InferInput(name, shape, datatype)
    item.set_shared_memory(region, size, offset)
    return item


def shm_out(name: str, region: str, size: int, offset: int = 0
            ) -> grpcclient.InferRequestedOutput:
    item = grpcclient.InferRequestedOutput(name)
    item.set_shared_memory(region, size, offset)
    return item


@pytest.mark.gpu
def test_large_device_inputs_reach_the_host_through_pinned_memory() -> None:
    """A CPU-only view of a large CUDA tensor comes from page-locked memory, small ones not."""
    torch = pytest.importorskip("torch")
    from shmserve.workers.cuda_ipc import PINNED_STAGING_MIN_BYTES, host_array
    large = torch.arange(PINNED_STAGING_MIN_BYTES // 4, dtype=torch.float32, device="cuda")
    small = torch.arange(16, dtype=torch.float32, device="cuda")
    for tensor, pinned in ((large, True), (small, False)):
        array = host_array(tensor)
        np.testing.assert_array_equal(array, tensor.cpu().numpy())
        assert torch.from_numpy(array).is_pinned() is pinned
    half = host_array(torch.ones(PINNED_STAGING_MIN_BYTES // 2, dtype=torch.bfloat16,
                                 device="cuda"))
    assert half.dtype.itemsize == 2 and torch.from_numpy(half.view(np.int16)).is_pinned()
    assert (half.view(np.int16) == torch.ones(1, dtype=torch.bfloat16).view(torch.int16)
            .item()).all()


@pytest.mark.gpu
def test_simple_grpc_cudashm_client_flow(triton: grpcclient.InferenceServerClient,
                                         regions: Regions) -> None:
    """tritonclient's simple_grpc_cudashm_client.py, against a TorchScript model on GPU 0."""
    input0 = np.arange(16, dtype=np.int32)
    input1 = np.ones(16, dtype=np.int32)
    size = input0.nbytes
    out0 = regions.create("output0_data", size)
    out1 = regions.create("output1_data", size)
    regions.create("input0_data", size, contents=[input0])
    regions.create("input1_data", size, contents=[input1])
    result = triton.infer("pt_simple",
                          [shm_in("INPUT0", [1, 16], "INT32", "input0_data", size),
                           shm_in("INPUT1", [1, 16], "INT32", "input1_data", size)],
                          outputs=[shm_out("OUTPUT0", "output0_data", size),
                                   shm_out("OUTPUT1", "output1_data", size)])
    for name in ("OUTPUT0", "OUTPUT1"):
        output = result.get_output(name)
        assert (output.datatype, list(output.shape)) == ("INT32", [1, 16])
    # The bytes are in the regions only: one empty raw entry per output, as Triton sends.
    assert list(result.get_response().raw_output_contents) == [b"", b""]
    np.testing.assert_array_equal(regions.read(out0, np.int32, [1, 16])[0], input0 + input1)
    np.testing.assert_array_equal(regions.read(out1, np.int32, [1, 16])[0], input0 - input1)
    status = triton.get_cuda_shared_memory_status()
    assert sorted(status.regions) == ["input0_data", "input1_data", "output0_data",
                                      "output1_data"]
    assert status.regions["input0_data"].device_id == 0
    assert status.regions["input0_data"].byte_size == size
    triton.unregister_cuda_shared_memory()
    assert list(triton.get_cuda_shared_memory_status().regions) == []


@pytest.mark.gpu
def test_cuda_input_is_zero_copy(triton: grpcclient.InferenceServerClient,
                                 regions: Regions) -> None:
    """pt_inplace adds 1 to its input IN PLACE: the client's own allocation shows the change."""
    sentinel = 0xEE
    original = (np.arange(1024) % 251).astype(np.uint8)
    handle = regions.create("probe_in", 4096, contents=[
        np.full(1000, sentinel, np.uint8), original, np.full(4096 - 2024, sentinel, np.uint8)])
    out = regions.create("probe_out", 2048, contents=[np.full(2048, sentinel, np.uint8)])
    result = triton.infer("pt_inplace", [shm_in("INPUT__0", [1024], "UINT8", "probe_in", 1024,
                                                1000)],
                          outputs=[shm_out("OUTPUT__0", "probe_out", 1024, 512),
                                   grpcclient.InferRequestedOutput("OUTPUT__1")])
    bumped = original + 1
    assert result.as_numpy("OUTPUT__1").tolist() == [0]          # ran on cuda:0 (its GPU)
    seen = regions.read(handle, np.uint8, [4096])
    np.testing.assert_array_equal(seen[1000:2024], bumped)       # the model wrote into OUR memory
    assert (seen[:1000] == sentinel).all() and (seen[2024:] == sentinel).all()
    written = regions.read(out, np.uint8, [2048])
    np.testing.assert_array_equal(written[512:1536], bumped)     # output: one device copy
    assert (written[:512] == sentinel).all() and (written[1536:] == sentinel).all()


@pytest.mark.gpu
def test_gpu_outputs_to_payload_and_system_region(triton: grpcclient.InferenceServerClient,
                                                  regions: Regions) -> None:
    import tritonclient.utils.shared_memory as sysshm
    values = np.arange(16, dtype=np.int32).reshape(1, 16)
    regions.create("in0", 64, contents=[values])
    result = triton.infer("pt_simple", [shm_in("INPUT0", [1, 16], "INT32", "in0", 64),
                                        shm_in("INPUT1", [1, 16], "INT32", "in0", 64)])
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), values * 2)   # one D2H copy
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), values * 0)
    key = f"/shmserve_gpu_test_{os.getpid()}"
    host = sysshm.create_shared_memory_region("sys_out", key, 128)
    try:
        triton.register_system_shared_memory("sys_out", key, 128)
        result = triton.infer("pt_simple", [shm_in("INPUT0", [1, 16], "INT32", "in0", 64),
                                            shm_in("INPUT1", [1, 16], "INT32", "in0", 64)],
                              outputs=[shm_out("OUTPUT0", "sys_out", 64, 64),
                                       grpcclient.InferRequestedOutput("OUTPUT1")])
        # One device-to-host copy, straight into the client's segment.
        np.testing.assert_array_equal(
            sysshm.get_contents_as_numpy(host, np.int32, [1, 16], offset=64), values * 2)
        np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), values * 0)
    finally:
        triton.unregister_system_shared_memory("sys_out")
        sysshm.destroy_shared_memory_region(host)


@pytest.mark.gpu
def test_cuda_region_into_a_cpu_instance(triton: grpcclient.InferenceServerClient,
                                         regions: Regions) -> None:
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    regions.create("cpu_in", x.nbytes, contents=[x])
    out = regions.create("cpu_out", 24)
    triton.infer("pt_linear", [shm_in("INPUT__0", [2, 4], "FP32", "cpu_in", x.nbytes)],
                 outputs=[shm_out("OUTPUT__0", "cpu_out", 24)])
    weight = np.arange(12, dtype=np.float32).reshape(4, 3) / 10
    np.testing.assert_allclose(regions.read(out, np.float32, [2, 3]),
                               x @ weight + np.array([1, 2, 3], np.float32), rtol=1e-6)


@pytest.mark.gpu
def test_region_on_another_gpu_is_copied_once(triton: grpcclient.InferenceServerClient,
                                              regions: Regions) -> None:
    torch, _ = cuda_stack()
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    original = np.arange(256, dtype=np.uint8)
    handle = regions.create("far_in", 256, device=1, contents=[original])
    result = triton.infer("pt_inplace", [shm_in("INPUT__0", [256], "UINT8", "far_in", 256)])
    np.testing.assert_array_equal(result.as_numpy("OUTPUT__0"), original + 1)
    assert result.as_numpy("OUTPUT__1").tolist() == [0]          # still ran on its own GPU
    # The model changed a copy on GPU 0, not the client's memory on GPU 1.
    np.testing.assert_array_equal(regions.read(handle, np.uint8, [256]), original)
    out = regions.create("far_out", 256, device=1)
    regions.create("near_in", 256, device=0, contents=[original])
    triton.infer("pt_inplace", [shm_in("INPUT__0", [256], "UINT8", "near_in", 256)],
                 outputs=[shm_out("OUTPUT__0", "far_out", 256)])
    np.testing.assert_array_equal(regions.read(out, np.uint8, [256]), original + 1)


@pytest.mark.gpu
def test_kind_gpu_workers_are_pinned(triton: grpcclient.InferenceServerClient) -> None:
    torch, _ = cuda_stack()
    last = torch.cuda.device_count() - 1
    value = grpcclient.InferInput("INPUT0", [1], "FP32")
    value.set_data_from_numpy(np.zeros(1, np.float32))
    report = json.loads(triton.infer("gpu_probe", [value]).as_numpy("REPORT")[0])
    assert report == {"visible": str(last), "device_id": "0", "kind": "GPU", "count": 1}
    config = triton.get_model_config("gpu_probe").config
    assert [list(group.gpus) for group in config.instance_group] == [[last]]


@pytest.mark.gpu
@pytest.mark.parametrize(("model", "kind"), [("gpu_dlpack", b"dlpack"), ("gpu_numpy", b"numpy")])
def test_python_backend_gpu_tensors(triton: grpcclient.InferenceServerClient, regions: Regions,
                                    model: str, kind: bytes) -> None:
    values = np.arange(8, dtype=np.float32)
    regions.create(f"{model}_in", 32, contents=[values])
    out = regions.create(f"{model}_out", 32)
    result = triton.infer(model, [shm_in("INPUT0", [8], "FP32", f"{model}_in", 32)],
                          outputs=[shm_out("OUTPUT0", f"{model}_out", 32),
                                   grpcclient.InferRequestedOutput("KIND")])
    assert result.as_numpy("KIND").tolist() == [kind]
    np.testing.assert_array_equal(regions.read(out, np.float32, [8]), values * 2)


@pytest.mark.gpu
def test_unregister_and_reregister_cycles(triton: grpcclient.InferenceServerClient,
                                          regions: Regions, gpu_server: ServerProcess) -> None:
    values = np.arange(16, dtype=np.int32).reshape(1, 16)
    for cycle in range(20):
        regions.create("cycle", 64, contents=[values + cycle])
        result = triton.infer("pt_simple", [shm_in("INPUT0", [1, 16], "INT32", "cycle", 64),
                                            shm_in("INPUT1", [1, 16], "INT32", "cycle", 64)])
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), (values + cycle) * 2)
        triton.unregister_cuda_shared_memory("cycle")
        regions.cudashm.destroy_shared_memory_region(regions.handles.pop())
    with pytest.raises(InferenceServerException) as caught:
        triton.infer("pt_simple", [shm_in("INPUT0", [1, 16], "INT32", "cycle", 64),
                                   shm_in("INPUT1", [1, 16], "INT32", "cycle", 64)])
    assert caught.value.message() == "Unable to find shared memory region: 'cycle'"


@pytest.mark.gpu
def test_concurrent_requests_on_cuda_regions(triton: grpcclient.InferenceServerClient,
                                             regions: Regions, gpu_server: ServerProcess) -> None:
    for index in range(8):
        regions.create(f"c{index}", 64,
                       contents=[np.full((1, 16), index, np.int32)])

    def call(index: int) -> np.ndarray:
        own = grpcclient.InferenceServerClient(gpu_server.url)
        try:
            region = f"c{index}"
            return np.asarray(own.infer(
                "pt_simple", [shm_in("INPUT0", [1, 16], "INT32", region, 64),
                              shm_in("INPUT1", [1, 16], "INT32", region, 64)]
            ).as_numpy("OUTPUT0"))
        finally:
            own.close()

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        outputs = list(pool.map(call, range(8)))
    for index, output in enumerate(outputs):
        assert (output == 2 * index).all()


@pytest.mark.gpu
def test_unopenable_handle_fails_the_request_not_the_server(
        triton: grpcclient.InferenceServerClient, regions: Regions) -> None:
    # The supervisor never opens handles, so a well-formed but bogus handle registers; the
    # worker that tries to open it fails the request with INVALID_ARGUMENT and keeps serving.
    triton.register_cuda_shared_memory("bogus", base64.b64encode(secrets.token_bytes(64)), 0, 64)
    with pytest.raises(InferenceServerException) as caught:
        triton.infer("pt_simple", [shm_in("INPUT0", [1, 16], "INT32", "bogus", 64),
                                   shm_in("INPUT1", [1, 16], "INT32", "bogus", 64)])
    assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "failed to open the CUDA shared memory handle for input 'INPUT0'" in \
        caught.value.message()
    triton.unregister_cuda_shared_memory("bogus")
    values = np.ones((1, 16), np.int32)
    regions.create("fine", 64, contents=[values])
    result = triton.infer("pt_simple", [shm_in("INPUT0", [1, 16], "INT32", "fine", 64),
                                        shm_in("INPUT1", [1, 16], "INT32", "fine", 64)])
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), values * 2)
