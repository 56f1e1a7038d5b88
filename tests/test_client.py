"""shmserve.client against real servers: every method, the automatic zero-copy path, leak safety.

Every test checks that it leaves no client segment in /dev/shm (the ``no_leaks`` fixture).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from shmserve.client import (
    ALIGNMENT,
    CHANNEL_OPTIONS,
    AsyncClient,
    BytesTensor,
    Client,
    HostRegion,
    MemfdRegion,
    RegionFullError,
    ShmserveError,
    StreamRequest,
    SystemRegion,
)
from shmserve.daemon import admin_shm
from shmserve.protos import shmserve_service_pb2 as pb
from shmserve.tests.serverproc import ServerProcess, free_port

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "examples" / "client"
SHM = Path("/dev/shm")
MIB16 = 4 * 1024 * 1024  # float32 elements in 16 MiB
A = np.arange(16, dtype=np.int32).reshape(1, 16)
B = np.ones((1, 16), dtype=np.int32)


def client_segments() -> set[str]:
    """Client segments this test process or its children made, or whose maker is gone.

    A key names its maker (``shmserve_client_<pid>_...``): segments of live processes of other
    test runs on the same host are theirs to clean, not this test's leak."""
    return {name for name in os.listdir(SHM)
            if name.startswith("shmserve_client_") and not _made_by_a_stranger(name)}


def _made_by_a_stranger(name: str) -> bool:
    try:
        maker = int(name[len("shmserve_client_"):].split("_", 1)[0])
    except ValueError:
        return False
    if maker == os.getpid():
        return False
    try:
        status = Path(f"/proc/{maker}/status").read_text()
    except OSError:
        return False  # gone: a leak whoever made it
    parent = next((int(line.split()[1]) for line in status.splitlines()
                   if line.startswith("PPid:")), 0)
    return parent != os.getpid()


def segment_exists(region_or_key: HostRegion | str) -> bool:
    """Whether a region's memory is still held: its name in /dev/shm, or for a memfd region
    (the local channel's, nameless) an fd of this process open on it."""
    if isinstance(region_or_key, MemfdRegion):
        return memfd_open(region_or_key.name)
    key = region_or_key if isinstance(region_or_key, str) else region_or_key.key
    return (SHM / key.lstrip("/")).exists()


def memfd_open(name: str) -> bool:
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{fd}").startswith(f"/memfd:{name} "):
                return True
    return False


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    before = client_segments()
    yield
    deadline = time.monotonic() + 2.0
    while client_segments() - before and time.monotonic() < deadline:
        time.sleep(0.02)
    leaked = client_segments() - before
    for name in leaked:  # don't let one failure cascade into the next tests
        (SHM / name).unlink(missing_ok=True)
    assert not leaked, f"test left client segments in /dev/shm: {sorted(leaked)}"


@pytest.fixture
def client(example_server: ServerProcess) -> Iterator[Client]:
    with Client(example_server.url) as c:
        yield c


class Recorder(grpc.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """Records the size of every ModelInfer request and response as sent on the wire."""

    def __init__(self) -> None:
        self.sizes: list[tuple[int, int]] = []

    def intercept_unary_unary(self, continuation: Callable[..., Any], details: Any,
                              request: Any) -> Any:
        outcome = continuation(details, request)
        if details.method.endswith("/ModelInfer"):
            self.sizes.append((len(request), len(outcome.result())))
        return outcome


def run_program(source: str, url: str, *args: str, timeout: float = 60
                ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(source), url, *args],
                          capture_output=True, text=True, timeout=timeout)


# --- health, metadata, config, statistics, repository ----------------------------------------

def test_health_and_metadata(client: Client) -> None:
    assert client.is_server_live() is True
    assert client.is_server_ready() is True
    assert client.is_model_ready("simple") is True
    assert client.is_model_ready("simple", "1") is True
    assert client.is_model_ready("no_such_model") is False
    meta = client.server_metadata()
    assert meta.name == "shmserve" and "system_shared_memory" in meta.extensions
    model = client.model_metadata("simple")
    assert [(t.name, t.datatype, list(t.shape)) for t in model.inputs] == [
        ("INPUT0", "INT32", [-1, 16]), ("INPUT1", "INT32", [-1, 16])]
    assert model.versions == ["1"]
    config = client.model_config("simple")
    assert config.name == "simple" and config.max_batch_size == 8
    assert [m.name for m in client.repository_index()] == [
        "identity_fp32", "simple", "string_upper"]
    assert all(m.state == "READY" for m in client.repository_index(ready=True))


def settled(read: Callable[[], Any], expected: Any, timeout: float = 5.0) -> Any:
    """``read()`` once it returns ``expected`` (or its last value after ``timeout``).

    Statistics follow an answer by microseconds, not before it: a local-channel client gets
    its answer from the worker, which reports to the supervisor right after (as Triton's
    backends report statistics after sending responses)."""
    deadline = time.monotonic() + timeout
    value = read()
    while value != expected and time.monotonic() < deadline:
        time.sleep(0.01)
        value = read()
    return value


def test_model_statistics_count_requests(client: Client) -> None:
    def count() -> int:
        (stats,) = client.model_statistics("simple")
        assert stats.name == "simple" and stats.version == "1"
        return int(stats.inference_count)

    before = count()
    for _ in range(3):
        client.infer("simple", {"INPUT0": A, "INPUT1": B})
    assert settled(count, before + 3) == before + 3
    assert {s.name for s in client.model_statistics()} >= {"simple", "identity_fp32"}


def test_load_and_unload(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server(None, "--model-control-mode", "explicit", "--load-model", "*")
    with Client(server.url) as client:
        client.unload_model("string_upper")
        assert client.is_model_ready("string_upper") is False
        client.load_model("string_upper")
        assert client.is_model_ready("string_upper") is True
        text = np.array([["ok"]], dtype=object)
        assert client.infer("string_upper", {"TEXT": text})["UPPER"].tolist() == [[b"OK"]]

        # A config override and a model file sent with the load request.
        config = json.dumps({
            "name": "identity_fp32", "backend": "python", "max_batch_size": 0,
            "input": [{"name": "INPUT0", "data_type": "TYPE_FP32", "dims": [-1]}],
            "output": [{"name": "OUTPUT0", "data_type": "TYPE_FP32", "dims": [-1]}]})
        model_py = textwrap.dedent("""
            import triton_python_backend_utils as pb_utils
            class TritonPythonModel:
                def execute(self, requests):
                    return [pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(
                        "OUTPUT0", pb_utils.get_input_tensor_by_name(r, "INPUT0").as_numpy()
                        * 2)]) for r in requests]
            """).encode()
        client.load_model("identity_fp32", config=config, files={"1/model.py": model_py})
        x = np.arange(4, dtype=np.float32)
        np.testing.assert_array_equal(
            client.infer("identity_fp32", {"INPUT0": x})["OUTPUT0"], x * 2)

        with pytest.raises(ShmserveError) as info:
            client.load_model("no_such_model")
        assert info.value.code == grpc.StatusCode.INTERNAL
        assert "no_such_model" in info.value.message


def test_load_in_mode_none_is_refused(client: Client) -> None:
    with pytest.raises(ShmserveError) as info:
        client.unload_model("simple")
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    assert "explicit model load / unload is not allowed" in info.value.message


# --- inference with bytes ------------------------------------------------------------------

def test_infer_payload(client: Client) -> None:
    out = client.infer("simple", {"INPUT0": A, "INPUT1": B})
    np.testing.assert_array_equal(out["OUTPUT0"], A + B)
    np.testing.assert_array_equal(out["OUTPUT1"], A - B)
    assert out["OUTPUT0"].dtype == np.int32 and out["OUTPUT0"].shape == (1, 16)

    batch = np.tile(A, (3, 1))
    only = client.infer("simple", {"INPUT0": batch, "INPUT1": batch}, outputs=["OUTPUT1"],
                        version="1", request_id="r-7", parameters={"priority": 0, "x": "y"},
                        timeout=30)
    assert list(only) == ["OUTPUT1"] and only["OUTPUT1"].shape == (3, 16)
    assert not only["OUTPUT1"].any()

    # Non-contiguous inputs are made contiguous; the answer is the same.
    wide = np.arange(64, dtype=np.int32).reshape(2, 32)[:, ::2]
    np.testing.assert_array_equal(
        client.infer("simple", {"INPUT0": wide, "INPUT1": wide})["OUTPUT0"], wide * 2)


def test_infer_big_payload(client: Client) -> None:
    """16 MiB each way: the channel's message-size limits are raised (gRPC's default is 4)."""
    assert ("grpc.max_receive_message_length", 2**31 - 1) in CHANNEL_OPTIONS
    x = np.random.default_rng(1).random(MIB16, dtype=np.float32)
    np.testing.assert_array_equal(client.infer("identity_fp32", {"INPUT0": x})["OUTPUT0"], x)


def test_infer_bytes_payload(client: Client) -> None:
    text = np.array([["abc", "Déjà"], ["x", ""]], dtype=object)
    out = client.infer("string_upper", {"TEXT": text})["UPPER"]
    assert out.shape == (2, 2)
    assert out.tolist() == [[b"ABC", "Déjà".encode().upper()], [b"X", b""]]
    fixed = np.array([[b"ab", b"cd"]], dtype="S2")
    assert client.infer("string_upper", {"TEXT": fixed})["UPPER"].tolist() == [[b"AB", b"CD"]]


# --- errors --------------------------------------------------------------------------------

def test_server_errors_carry_code_and_message(client: Client) -> None:
    with pytest.raises(ShmserveError) as info:
        client.infer("no_such_model", {"INPUT0": A})
    assert info.value.code == grpc.StatusCode.NOT_FOUND
    assert info.value.message == "Request for unknown model: 'no_such_model' is not found"

    with pytest.raises(ShmserveError) as info:
        client.infer("simple", {"INPUT0": A.astype(np.float32), "INPUT1": B})
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.message == ("inference input 'INPUT0' data-type is 'FP32', but model "
                                  "'simple' expects 'INT32'")

    with pytest.raises(ShmserveError) as info:
        client.model_config("no_such_model")
    assert info.value.code == grpc.StatusCode.NOT_FOUND

    with pytest.raises(ShmserveError) as info:
        client.shared_memory_status("no_such_region")
    assert info.value.code == grpc.StatusCode.NOT_FOUND
    assert info.value.message == "Unable to find system shared memory region: 'no_such_region'"

    with pytest.raises(ShmserveError) as info:
        client.register_system_shared_memory("arena", "/shmserve_arena_1_x_1", 64)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_client_side_errors(client: Client) -> None:
    with pytest.raises(ShmserveError) as info:
        client.infer("simple", {"INPUT0": np.zeros((1, 16), np.complex64), "INPUT1": B})
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "INPUT0" in info.value.message

    with pytest.raises(ShmserveError) as info:
        client.infer("simple", {"INPUT0": A, "INPUT1": B}, outputs={"OUTPUT0": np.empty((1, 16))})
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a C-contiguous view into one of this client's registered" in info.value.message

    with pytest.raises(ShmserveError) as info:
        client.infer("simple", {"INPUT0": A, "INPUT1": B}, parameters={"bad": [1]})  # type: ignore[dict-item]
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_deadline_and_unreachable_server(client: Client) -> None:
    with pytest.raises(ShmserveError) as info:
        client.infer("identity_fp32", {"INPUT0": np.zeros(MIB16, np.float32)}, timeout=0.001)
    assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED

    with Client(f"127.0.0.1:{free_port()}", timeout=2) as nobody:
        with pytest.raises(ShmserveError) as info:
            nobody.is_server_live()
        assert info.value.code == grpc.StatusCode.UNAVAILABLE
        assert info.value.message
        assert str(info.value).startswith("[UNAVAILABLE]")


# --- shared memory: the automatic zero-copy path ------------------------------------------

def test_zero_copy_request_carries_no_tensor_bytes(example_server: ServerProcess) -> None:
    recorder = Recorder()
    with Client(example_server.url, interceptors=[recorder]) as client, \
            client.shared_memory(2 * MIB16 * 4 + 4096) as region:
        x = region.ndarray(MIB16, np.float32)
        x[:] = np.random.default_rng(2).random(MIB16, dtype=np.float32)
        y = region.ndarray(MIB16, np.float32)

        # What the client builds: references only, no raw_input_contents.
        payload = client.serialize_infer_request("identity_fp32", {"INPUT0": x},
                                                 outputs={"OUTPUT0": y})
        assert len(payload) < 1024
        request = pb.ModelInferRequest.FromString(payload)
        assert list(request.raw_input_contents) == []
        params = request.inputs[0].parameters
        assert params["shared_memory_region"].string_param == region.name
        assert params["shared_memory_byte_size"].int64_param == x.nbytes
        assert "shared_memory_offset" not in params  # x is at offset 0
        out_params = request.outputs[0].parameters
        assert out_params["shared_memory_offset"].int64_param == x.nbytes  # 64-aligned already

        # What goes on the wire both ways, and where the answer lands.
        out = client.infer("identity_fp32", {"INPUT0": x}, outputs={"OUTPUT0": y})
        (sent, received), = recorder.sizes
        assert sent < 1024 and received < 1024, recorder.sizes
        assert out["OUTPUT0"] is y
        np.testing.assert_array_equal(y, x)

        # The server reads the region itself: change the data in place, infer again.
        x *= 2
        client.infer("identity_fp32", {"INPUT0": x}, outputs={"OUTPUT0": y})
        np.testing.assert_array_equal(y, x)
        assert all(s < 1024 and r < 1024 for s, r in recorder.sizes)


def test_views_offsets_and_fallbacks(client: Client) -> None:
    with client.shared_memory(1 << 16) as region:
        block = region.ndarray((4, 16), np.int32)
        block[:] = np.arange(64, dtype=np.int32).reshape(4, 16)
        ones = region.copy(np.ones((2, 16), np.int32))
        # A contiguous slice is a reference with an offset into the region.
        rows = block[1:3]
        request = pb.ModelInferRequest.FromString(client.serialize_infer_request(
            "simple", {"INPUT0": rows, "INPUT1": ones}))
        assert list(request.raw_input_contents) == []
        assert request.inputs[0].parameters["shared_memory_offset"].int64_param == 64
        out = client.infer("simple", {"INPUT0": rows, "INPUT1": ones})
        np.testing.assert_array_equal(out["OUTPUT0"], rows + 1)

        # A non-contiguous view of region memory goes as bytes, and still computes right.
        strided_region = region.ndarray((16, 2), np.int32).T
        strided_region[:] = block[:2]
        assert not strided_region.flags.c_contiguous and region.contains(strided_region)
        request = pb.ModelInferRequest.FromString(client.serialize_infer_request(
            "simple", {"INPUT0": strided_region, "INPUT1": ones}))
        assert len(request.raw_input_contents) == 1  # INPUT1 by reference, INPUT0 as bytes
        out = client.infer("simple", {"INPUT0": strided_region, "INPUT1": ones})
        np.testing.assert_array_equal(out["OUTPUT0"], block[:2] + 1)

        # A larger output buffer comes back as a view of it with the output's shape.
        flat = region.ndarray(64, np.int32)
        out = client.infer("simple", {"INPUT0": rows, "INPUT1": ones},
                           outputs={"OUTPUT0": flat, "OUTPUT1": None})
        assert out["OUTPUT0"].shape == (2, 16) and np.shares_memory(out["OUTPUT0"], flat)
        np.testing.assert_array_equal(out["OUTPUT0"], rows + 1)
        np.testing.assert_array_equal(out["OUTPUT1"], rows - 1)

        # Too small an output region: the server's error.
        tiny = region.ndarray((1, 16), np.int32)
        with pytest.raises(ShmserveError) as info:
            client.infer("simple", {"INPUT0": rows, "INPUT1": ones}, outputs={"OUTPUT0": tiny})
        assert info.value.code == grpc.StatusCode.INTERNAL
        assert "should be at least 128 bytes" in info.value.message
    # After the region is closed its arrays are ordinary memory: sent as bytes.
    request = pb.ModelInferRequest.FromString(client.serialize_infer_request(
        "simple", {"INPUT0": rows, "INPUT1": ones}))
    assert len(request.raw_input_contents) == 2
    np.testing.assert_array_equal(
        client.infer("simple", {"INPUT0": rows, "INPUT1": ones})["OUTPUT0"], rows + 1)


def test_region_allocator(client: Client) -> None:
    with client.shared_memory(1000) as region:
        assert region.byte_size == 1000 and region.used == 0
        first = region.ndarray(3, np.uint8)
        second = region.ndarray((2, 2), np.float64)
        offsets = [region.locate(a.__array_interface__["data"][0], a.nbytes)
                   for a in (first, second)]
        assert offsets == [0, ALIGNMENT]
        assert second.flags.c_contiguous and second.flags.writeable
        with pytest.raises(RegionFullError) as info:
            region.ndarray(1000, np.uint8)
        assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert isinstance(info.value, MemoryError | ShmserveError)
        region.reset()
        assert region.used == 0
        again = region.ndarray(1000, np.uint8)
        assert np.shares_memory(again, first) and region.free == 0
        with pytest.raises(ShmserveError):
            region.ndarray((2,), object)
        status = client.shared_memory_status(region.name)
        assert status[region.name].byte_size == 1000
        assert status[region.name].key == region.key


def test_bytes_tensors_in_a_region(client: Client) -> None:
    with client.shared_memory(1 << 16) as region:
        text = region.bytes_tensor(["zero", b"copy", "strings"], shape=(1, 3))
        assert isinstance(text, BytesTensor) and region.contains(text.data)
        assert text.decode().tolist() == [[b"zero", b"copy", b"strings"]]
        request = pb.ModelInferRequest.FromString(
            client.serialize_infer_request("string_upper", {"TEXT": text}))
        assert list(request.raw_input_contents) == []
        assert request.inputs[0].datatype == "BYTES" and list(request.inputs[0].shape) == [1, 3]
        upper = region.ndarray(1024, np.uint8)
        out = client.infer("string_upper", {"TEXT": text}, outputs={"UPPER": upper})
        assert out["UPPER"].tolist() == [[b"ZERO", b"COPY", b"STRINGS"]]
        # BYTES input from a region, output as bytes.
        assert client.infer("string_upper", {"TEXT": text})["UPPER"].shape == (1, 3)


def test_raw_registration_of_a_segment_made_elsewhere(client: Client) -> None:
    segment = SystemRegion(4096)  # stands in for a segment another program created
    try:
        client.register_system_shared_memory("made_elsewhere", segment.key, 1024, offset=1024)
        status = client.shared_memory_status("made_elsewhere")["made_elsewhere"]
        assert (status.key, status.offset, status.byte_size) == (segment.key, 1024, 1024)
        with pytest.raises(ShmserveError) as info:
            client.register_system_shared_memory("made_elsewhere", segment.key, 1024)
        assert info.value.code == grpc.StatusCode.ALREADY_EXISTS
        # Not one of the client's own regions: its arrays are not sent as references.
        assert len(pb.ModelInferRequest.FromString(client.serialize_infer_request(
            "simple", {"INPUT0": segment.copy(A), "INPUT1": B})).raw_input_contents) == 2
        client.unregister_system_shared_memory("made_elsewhere")
        assert "made_elsewhere" not in client.shared_memory_status()
    finally:
        segment.close()


def test_unregister_all_touches_only_this_clients_regions(example_server: ServerProcess
                                                         ) -> None:
    with Client(example_server.url) as first, Client(example_server.url) as second, \
            first.shared_memory(4096) as mine, second.shared_memory(4096) as theirs:
        assert first.client_id != second.client_id
        first.unregister_system_shared_memory()  # "all": only first's regions
        names = set(second.shared_memory_status())
        assert theirs.name in names and mine.name not in names
    # Leaving both blocks is fine although `mine` was already unregistered.
    assert not segment_exists(mine) and not segment_exists(theirs)


# --- leak safety ---------------------------------------------------------------------------

def test_exception_inside_with_leaves_nothing(client: Client) -> None:
    with pytest.raises(RuntimeError, match="boom"), client.shared_memory(1 << 20) as region:
        region.ndarray(16, np.float32)[:] = 1
        assert segment_exists(region)
        raise RuntimeError("boom")
    assert not segment_exists(region) and region.closed
    assert region.name not in client.shared_memory_status()
    assert client.regions == []


CHILD_RAISES = """
import sys
import numpy as np
from shmserve.client import Client
with Client(sys.argv[1]) as client, client.shared_memory(1 << 20) as region:
    x = region.copy(np.ones((1, 16), np.int32))
    client.infer("simple", {"INPUT0": x, "INPUT1": x})
    print(region.key, flush=True)
    raise ValueError("failing on purpose")
"""


def test_program_raising_inside_with_leaves_nothing(example_server: ServerProcess) -> None:
    done = run_program(CHILD_RAISES, example_server.url)
    assert done.returncode == 1 and "failing on purpose" in done.stderr
    key = done.stdout.strip()
    assert key.startswith("/shmserve_client_")
    assert not segment_exists(key)
    with Client(example_server.url) as client:
        assert key.lstrip("/") not in client.shared_memory_status()


CHILD_HOLDS = """
import sys
import numpy as np
from shmserve.client import Client
with Client(sys.argv[1]) as client, client.shared_memory(1 << 20) as region:
    x = region.copy(np.ones((1, 16), np.int32))
    client.infer("simple", {"INPUT0": x, "INPUT1": x}, outputs={"OUTPUT0": region.ndarray(
        (1, 16), np.int32)})
    print(region.key, flush=True)
    sys.stdin.readline()  # hold the region until told to go
print("released", flush=True)
"""


def _start_holder(url: str) -> tuple[subprocess.Popen[str], str]:
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(CHILD_HOLDS), url],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    key = child.stdout.readline().strip()
    assert key.startswith("/shmserve_client_"), key
    return child, key


def _shm_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shmserve.daemon", "shm", *args],
                          capture_output=True, text=True, timeout=60, check=True)


def test_sigkilled_program_leaves_segment_that_clean_removes(example_server: ServerProcess
                                                            ) -> None:
    killed, dead_key = _start_holder(example_server.url)
    alive, live_key = _start_holder(example_server.url)
    try:
        killed.send_signal(signal.SIGKILL)
        killed.communicate(timeout=10)  # reaps it and closes the pipes
        assert segment_exists(dead_key), "a SIGKILLed client cannot clean up after itself"

        with Client(example_server.url) as client, client.shared_memory(4096) as own:
            listing = {s.name: s for s in admin_shm.list_segments()}
            assert listing[dead_key[1:]].alive is False
            assert listing[dead_key[1:]].pid == killed.pid
            assert listing[dead_key[1:]].size == 1 << 20
            assert listing[live_key[1:]].alive is True
            assert listing[own.name].alive is True
            ls = _shm_cli("ls").stdout
            assert dead_key[1:] in ls and "dead" in ls and own.name in ls

            cleaned = _shm_cli("clean").stdout
            assert f"removed /dev/shm/{dead_key[1:]}" in cleaned
            assert f"pid {killed.pid} is gone" in cleaned
            assert not segment_exists(dead_key)
            # Segments of live processes stay: another program's, and this one's.
            assert segment_exists(live_key) and segment_exists(own)
            assert live_key[1:] not in cleaned and own.name not in cleaned
            assert "nothing to clean" in _shm_cli("clean").stdout
            # The server still lists the dead client's registration: drop it.
            client.unregister_system_shared_memory(dead_key[1:])
    finally:
        assert alive.stdin is not None
        alive.stdin.write("\n")
        alive.stdin.flush()
        out, _ = alive.communicate(timeout=30)
        assert alive.returncode == 0 and "released" in out
    assert not segment_exists(live_key)


def test_owner_liveness_rules(tmp_path: Path) -> None:
    now = time.time()
    assert admin_shm.owner_alive(os.getpid(), now) is True
    # A segment last changed long before this process started: its pid was reused.
    assert admin_shm.owner_alive(os.getpid(), 0.0) is False
    # An exited but unreaped child (a zombie) counts as gone.
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 10
    while admin_shm.owner_alive(child.pid, now) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert admin_shm.owner_alive(child.pid, now) is False
    child.wait()
    # ls/clean in another directory; names that are not ours are ignored.
    (tmp_path / "shmserve_client_1_0_abcd").write_bytes(b"x" * 10)
    (tmp_path / "shmserve_arena_1_w_1").write_bytes(b"x")
    (tmp_path / "unrelated").write_bytes(b"x")
    segments = admin_shm.list_segments(str(tmp_path))
    assert [s.name for s in segments] == ["shmserve_client_1_0_abcd"]
    assert admin_shm.main(["ls", "--dir", str(tmp_path), "--json"]) == 0
    assert admin_shm.main(["clean", "--dir", str(tmp_path), "--dry-run"]) == 0
    assert (tmp_path / "shmserve_client_1_0_abcd").exists()


def test_close_and_garbage_collection_release_regions(example_server: ServerProcess) -> None:
    client = Client(example_server.url)
    context = client.shared_memory(4096)
    region = context.__enter__()
    assert client.regions == [region] and segment_exists(region)
    client.close()
    assert not segment_exists(region) and region.closed
    with pytest.raises(ShmserveError):
        client.shared_memory(4096).__enter__()

    # A region nobody closes is unlinked when it is garbage collected.
    orphan = SystemRegion(4096)
    key = orphan.key
    assert segment_exists(key)
    del orphan
    assert not segment_exists(key)


def test_cuda_regions_are_an_extension_point(client: Client) -> None:
    with pytest.raises(ShmserveError) as info:
        client.cuda_shared_memory(1024)
    assert info.value.code == grpc.StatusCode.UNIMPLEMENTED


# --- streaming ---------------------------------------------------------------------------

def test_stream_infer(client: Client) -> None:
    with client.shared_memory(1 << 16) as region:
        out_region = region.ndarray((1, 16), np.int32)
        requests: list[Any] = [
            {"INPUT0": A, "INPUT1": B},
            {"INPUT0": A},  # missing INPUT1: answered in-band, the stream goes on
            StreamRequest({"INPUT0": region.copy(A), "INPUT1": region.copy(B)},
                          outputs={"OUTPUT0": out_region}, request_id="in-region"),
            {"INPUT0": A * 3, "INPUT1": B},
        ]
        results = sorted(client.stream_infer("simple", requests), key=lambda r: r.index)
        assert [r.index for r in results] == [0, 1, 2, 3]
        np.testing.assert_array_equal(results[0].unwrap()["OUTPUT0"], A + B)
        assert results[1].error is not None and "missing required input" in \
            results[1].error.message
        with pytest.raises(ShmserveError):
            results[1].unwrap()
        assert results[2].request_id == "in-region" and results[2].outputs["OUTPUT0"] is \
            out_region
        np.testing.assert_array_equal(out_region, A + B)
        np.testing.assert_array_equal(results[3].outputs["OUTPUT1"], A * 3 - B)

    def failing() -> Iterator[dict[str, np.ndarray]]:
        yield {"INPUT0": A, "INPUT1": B}
        raise KeyError("from the request iterable")

    stream = client.stream_infer("simple", failing())
    with pytest.raises(KeyError, match="from the request iterable"):
        list(stream)
    # Stopping early cancels the stream.
    gen = client.stream_infer("simple", ({"INPUT0": A, "INPUT1": B} for _ in range(100)))
    assert next(gen).error is None
    gen.close()


# --- the asyncio client ------------------------------------------------------------------

def test_async_client_methods(example_server: ServerProcess) -> None:
    async def main() -> None:
        async with AsyncClient(example_server.url) as client:
            assert await client.is_server_live() and await client.is_server_ready()
            assert await client.is_model_ready("simple")
            assert (await client.server_metadata()).name == "shmserve"
            assert (await client.model_metadata("simple")).inputs[0].name == "INPUT0"
            assert (await client.model_config("simple")).max_batch_size == 8
            assert len(await client.repository_index()) == 3
            assert (await client.model_statistics("simple"))[0].name == "simple"
            out = await client.infer("simple", {"INPUT0": A, "INPUT1": B})
            np.testing.assert_array_equal(out["OUTPUT0"], A + B)
            with pytest.raises(ShmserveError) as info:
                await client.infer("no_such_model", {"INPUT0": A})
            assert info.value.code == grpc.StatusCode.NOT_FOUND
            with pytest.raises(ShmserveError) as info:
                await client.unload_model("simple")
            assert info.value.code == grpc.StatusCode.UNAVAILABLE
            with pytest.raises(ShmserveError) as info:
                await client.load_model("simple")
            assert info.value.code == grpc.StatusCode.UNAVAILABLE

            async with client.shared_memory(1 << 16) as region:
                assert region.name in await client.shared_memory_status()
                x = region.copy(A)
                y = region.ndarray((1, 16), np.int32)
                assert len(client.serialize_infer_request(
                    "simple", {"INPUT0": x, "INPUT1": x})) < 512
                out = await client.infer("simple", {"INPUT0": x, "INPUT1": x},
                                         outputs={"OUTPUT0": y, "OUTPUT1": None})
                assert out["OUTPUT0"] is y
                np.testing.assert_array_equal(y, 2 * A)

                async def requests() -> Any:
                    for i in range(5):
                        yield {"INPUT0": A + i, "INPUT1": B}
                    yield {"INPUT0": A}

                results = [r async for r in client.stream_infer("simple", requests())]
                assert sorted(r.index for r in results) == list(range(6))
                for r in results:
                    if r.index == 5:
                        assert r.error is not None
                    else:
                        np.testing.assert_array_equal(r.unwrap()["OUTPUT0"], A + r.index + B)

            with pytest.raises(RuntimeError):
                async with client.shared_memory(4096) as doomed:
                    raise RuntimeError
            assert not segment_exists(doomed)
            assert doomed.name not in await client.shared_memory_status()

    asyncio.run(main())


def test_async_client_concurrency_32(example_server: ServerProcess) -> None:
    concurrency = 32

    async def main() -> None:
        async with AsyncClient(example_server.url) as client, \
                client.shared_memory(1 << 20) as region:
            ones = region.copy(B)
            xs = [region.copy(np.full((1, 16), i, np.int32)) for i in range(concurrency)]
            outs = [region.ndarray((1, 16), np.int32) for _ in range(concurrency)]

            def one(i: int) -> Any:
                if i % 2:  # half through shared memory, half as bytes
                    return client.infer("simple", {"INPUT0": xs[i], "INPUT1": ones},
                                        outputs={"OUTPUT0": outs[i], "OUTPUT1": None})
                return client.infer("simple", {"INPUT0": np.full((1, 16), i, np.int32),
                                               "INPUT1": B})

            for _ in range(3):
                results = await asyncio.gather(*(one(i) for i in range(concurrency)))
                for i, result in enumerate(results):
                    np.testing.assert_array_equal(result["OUTPUT0"], i + 1)
                    np.testing.assert_array_equal(result["OUTPUT1"], i - 1)
                    if i % 2:
                        assert result["OUTPUT0"] is outs[i]

    asyncio.run(main())


# --- alongside tritonclient, typing, examples ---------------------------------------------

def test_works_beside_tritonclient(example_server: ServerProcess) -> None:
    import tritonclient.grpc as triton

    with Client(example_server.url) as ours, \
            triton.InferenceServerClient(example_server.url) as theirs:
        i0 = triton.InferInput("INPUT0", [1, 16], "INT32")
        i0.set_data_from_numpy(A)
        i1 = triton.InferInput("INPUT1", [1, 16], "INT32")
        i1.set_data_from_numpy(B)
        np.testing.assert_array_equal(theirs.infer("simple", [i0, i1]).as_numpy("OUTPUT0"),
                                      ours.infer("simple", {"INPUT0": A, "INPUT1": B})
                                      ["OUTPUT0"])
        assert theirs.get_model_metadata("simple").name == ours.model_metadata("simple").name
        with ours.shared_memory(4096) as region:
            # tritonclient sees our region on the server, and can use it by name.
            status = theirs.get_system_shared_memory_status(region.name)
            assert status.regions[region.name].byte_size == 4096
            x = region.copy(A)
            ref = triton.InferInput("INPUT0", [1, 16], "INT32")
            ref.set_shared_memory(region.name, x.nbytes)
            out = theirs.infer("simple", [ref, i1]).as_numpy("OUTPUT0")
            np.testing.assert_array_equal(out, A + B)


def test_import_pulls_in_no_gpu_stack() -> None:
    code = ("import sys, shmserve.client; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'cuda', 'tritonclient', 'multiprocessing')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=True)
    assert done.stdout.strip() == "[]"
    assert (Path(__file__).resolve().parent.parent / "client" / "py.typed").exists()


@pytest.mark.parametrize("example", sorted(p.name for p in EXAMPLES_DIR.glob("*.py")))
def test_examples_run(example: str, example_server: ServerProcess) -> None:
    done = subprocess.run([sys.executable, "-W", "error", str(EXAMPLES_DIR / example)],
                          env=dict(os.environ, SHMSERVE_URL=example_server.url),
                          capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stdout + done.stderr
