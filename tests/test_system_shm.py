"""System shared memory end to end: a real server, tritonclient.grpc and its shm utilities.

Covers Triton's client flow, zero copy (proven by a model that writes through its input view),
every error row of the reference table for the shm RPCs and infer parameters, hostile
offsets/sizes, lifetimes under load, and leaks over many register/infer/unregister cycles.

Client segments are named ``/tcshm<pid>_...`` and every test removes the ones it made.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import posix_ipc
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException, serialize_byte_tensor

from shmserve.tests.conftest import GRPC_FRONTENDS, frontends_id
from shmserve.tests.serverproc import ServerProcess, arena_segments, build_repository, is_frontend

MODELS = ["simple", "identity_fp32", "string_upper", "shm_probe"]
PREFIX = f"tcshm{os.getpid()}_"
ALLOWED_PREFIX = f"/{PREFIX}ok_"
RESTRICT_KEY = "shmkey"
RESTRICT_VALUE = "let-me-in"
RESTRICT_HEADER = {f"triton-grpc-protocol-{RESTRICT_KEY}": RESTRICT_VALUE}
CLIENT_ID_HEADER = "shmserve-client-id"
INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
UINT64_MAX = 2**64 - 1
USAGE = "'shared_memory_byte_size' must be specified along with 'shared_memory_region'"
SENTINEL = 0xEE
_segment_numbers = itertools.count(1)   # keys are never reused within a run


# --- processes ---------------------------------------------------------------------------------

def _ppid(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return -1
    return int(stat[stat.rindex(")") + 2:].split()[1])


def worker_pids(server_pid: int) -> list[int]:
    """Workers are the children of the server's fork server: their parent's parent is it."""
    pids = [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]
    return sorted(pid for pid in pids if _ppid(_ppid(pid)) == server_pid
                  and not is_frontend(pid))


def open_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


def mappings(pid: int, key_prefix: str) -> int:
    """Lines of /proc/<pid>/maps mapping a /dev/shm file whose key starts with key_prefix."""
    try:
        lines = Path(f"/proc/{pid}/maps").read_text().splitlines()
    except OSError:
        return 0
    path = "/dev/shm" + key_prefix
    return sum(len(fields) > 5 and fields[5].startswith(path)
               for fields in (line.split() for line in lines))


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def mapped_anywhere(server: ServerProcess, key_prefix: str) -> int:
    return sum(mappings(pid, key_prefix) for pid in [server.pid, *worker_pids(server.pid)])


def wait_unmapped(server: ServerProcess, key: str, timeout: float = 5.0) -> None:
    wait_for(lambda: mapped_anywhere(server, key) == 0, timeout,
             what=f"the server and its workers to unmap {key}")


def our_segments() -> list[str]:
    return sorted(name for name in os.listdir("/dev/shm") if name.startswith(PREFIX))


def _start(tmp: Path, *flags: str) -> ServerProcess:
    server = ServerProcess(build_repository(tmp / "repo", MODELS), *flags)
    server.wait_ready()
    return server


def _stop(server: ServerProcess) -> None:
    code = server.stop()
    assert code == 0, server.log()
    wait_for(lambda: arena_segments(server.pid) == [], what="arena segments to go")


@pytest.fixture(scope="module", params=GRPC_FRONTENDS, ids=frontends_id)
def server(tmp_path_factory: pytest.TempPathFactory,
           request: pytest.FixtureRequest) -> Iterator[ServerProcess]:
    """Served by the supervisor, and by 2 frontend processes (--grpc-frontends)."""
    proc = _start(tmp_path_factory.mktemp("shm"), "--grpc-frontends", str(request.param))
    yield proc
    _stop(proc)


@pytest.fixture(scope="module")
def guarded_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """--shm-key-prefix and a restricted shared-memory protocol group."""
    proc = _start(tmp_path_factory.mktemp("guarded"), "--shm-key-prefix", ALLOWED_PREFIX,
                  f"--grpc-restricted-protocol=shared-memory:{RESTRICT_KEY}={RESTRICT_VALUE}")
    yield proc
    _stop(proc)


# --- client side -------------------------------------------------------------------------------

class Segments:
    """Client segments made with tritonclient's shm utilities; all removed at teardown."""

    def __init__(self) -> None:
        self._live: dict[str, shm.SharedMemoryRegion] = {}

    def create(self, size: int, fill: int = 0) -> tuple[str, shm.SharedMemoryRegion]:
        number = next(_segment_numbers)
        key = f"/{PREFIX}{number}_"          # the "_" ends it: no key is a prefix of another
        handle = shm.create_shared_memory_region(f"h{number}", key, size, create_only=True)
        self._live[key] = handle
        if fill:
            write(handle, 0, bytes([fill]) * size)
        return key, handle

    def destroy(self, key: str) -> None:
        handle = self._live.pop(key, None)
        if handle is not None:
            shm.destroy_shared_memory_region(handle)

    def close(self) -> None:
        for key in list(self._live):
            self.destroy(key)
        for name in our_segments():   # e.g. made by hand in a test
            with contextlib.suppress(posix_ipc.ExistentialError):
                posix_ipc.unlink_shared_memory("/" + name)


def write(handle: shm.SharedMemoryRegion, offset: int, data: bytes) -> None:
    shm.set_shared_memory_region(handle, [np.frombuffer(data, dtype=np.uint8)], offset=offset)


def read(handle: shm.SharedMemoryRegion, offset: int, size: int) -> bytes:
    return shm.get_contents_as_numpy(handle, np.uint8, [size], offset=offset).tobytes()


def read_array(handle: shm.SharedMemoryRegion, dtype: Any, shape: list[int],
               offset: int = 0) -> np.ndarray:
    return shm.get_contents_as_numpy(handle, dtype, shape, offset=offset).copy()


@pytest.fixture
def segments() -> Iterator[Segments]:
    made = Segments()
    yield made
    made.close()
    assert our_segments() == []


@pytest.fixture
def client(server: ServerProcess) -> Iterator[grpcclient.InferenceServerClient]:
    """A tritonclient on the shared server; the regions a test registered are removed after."""
    triton = grpcclient.InferenceServerClient(server.url)
    yield triton
    triton.unregister_system_shared_memory()
    for owner in ("a", "b"):
        triton.unregister_system_shared_memory(headers={CLIENT_ID_HEADER: owner})
    status = triton.get_system_shared_memory_status()
    triton.close()
    assert list(status.regions) == [], "a test left regions registered"


def expect_error(code: grpc.StatusCode, text: str, call: Callable[..., Any], *args: Any,
                 prefix: bool = False, **kwargs: Any) -> None:
    with pytest.raises(InferenceServerException) as info:
        call(*args, **kwargs)
    assert info.value.status() == str(code), info.value
    message = info.value.message()
    if prefix:
        assert message.startswith(text), message
    else:
        assert message == text


def shm_input(name: str, shape: list[int], datatype: str, region: str, byte_size: int,
              offset: int = 0) -> grpcclient.InferInput:
    return grpcclient.InferInput(name, shape, datatype).set_shared_memory(region, byte_size,
                                                                           offset)


def shm_output(name: str, region: str, byte_size: int,
               offset: int = 0) -> grpcclient.InferRequestedOutput:
    output = grpcclient.InferRequestedOutput(name)
    output.set_shared_memory(region, byte_size, offset)
    return output


def raw_params(tensor: grpcclient.InferInput | grpcclient.InferRequestedOutput,
               **params: tuple[str, Any]) -> None:
    """Set tensor parameters as given: key=(oneof field, value); the field may be wrong."""
    message = tensor._get_tensor()
    for key, (field, value) in params.items():
        setattr(message.parameters[key], field, value)


def message_input(name: str, array: np.ndarray, datatype: str) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


def assert_serving(server: ServerProcess, triton: grpcclient.InferenceServerClient,
                   workers: list[int]) -> None:
    """Alive, no worker crashed or restarted, and plain inference still works."""
    assert server.process.poll() is None, server.log()
    assert triton.is_server_live()
    assert worker_pids(server.pid) == workers, "a worker died during the test"
    data = np.arange(16, dtype=np.int32).reshape(1, 16)
    result = triton.infer("simple", [message_input("INPUT0", data, "INT32"),
                                     message_input("INPUT1", data, "INT32")])
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), data * 2)


# --- Triton's client flow ----------------------------------------------------------------------

def test_simple_grpc_shm_client_flow(client: grpcclient.InferenceServerClient,
                                     segments: Segments) -> None:
    """tritonclient's simple_grpc_shm_client.py, step by step."""
    input0 = np.arange(16, dtype=np.int32).reshape(1, 16)
    input1 = np.ones((1, 16), dtype=np.int32)
    size = input0.nbytes
    out_key, out_handle = segments.create(size * 2)
    client.register_system_shared_memory("output_data", out_key, size * 2)
    in_key, in_handle = segments.create(size * 2)
    shm.set_shared_memory_region(in_handle, [input0])
    shm.set_shared_memory_region(in_handle, [input1], offset=size)
    client.register_system_shared_memory("input_data", in_key, size * 2)

    status = client.get_system_shared_memory_status()
    assert {r.name: (r.key, r.offset, r.byte_size) for r in status.regions.values()} == {
        "input_data": (in_key, 0, size * 2), "output_data": (out_key, 0, size * 2)}

    inputs = [shm_input("INPUT0", [1, 16], "INT32", "input_data", size),
              shm_input("INPUT1", [1, 16], "INT32", "input_data", size, offset=size)]
    outputs = [shm_output("OUTPUT0", "output_data", size),
               shm_output("OUTPUT1", "output_data", size, offset=size)]
    result = client.infer("simple", inputs, outputs=outputs)

    response = result.get_response()
    assert list(response.raw_output_contents) == [b"", b""]   # no tensor bytes on the wire
    for name in ("OUTPUT0", "OUTPUT1"):
        output = result.get_output(name)
        assert output is not None
        assert (output.datatype, list(output.shape)) == ("INT32", [1, 16])
    np.testing.assert_array_equal(read_array(out_handle, np.int32, [1, 16]), input0 + input1)
    np.testing.assert_array_equal(read_array(out_handle, np.int32, [1, 16], offset=size),
                                  input0 - input1)

    one = client.get_system_shared_memory_status(region_name="input_data")
    assert list(one.regions) == ["input_data"]
    client.unregister_system_shared_memory("input_data")
    client.unregister_system_shared_memory("output_data")
    assert list(client.get_system_shared_memory_status().regions) == []


def test_mixed_request(client: grpcclient.InferenceServerClient, segments: Segments) -> None:
    """Some tensors in regions, some in the message, in both directions."""
    input0 = np.arange(16, dtype=np.int32).reshape(1, 16) * 3
    input1 = np.full((1, 16), 5, dtype=np.int32)
    in_key, in_handle = segments.create(64)
    shm.set_shared_memory_region(in_handle, [input0])
    out_key, out_handle = segments.create(64)
    client.register_system_shared_memory("mixed_in", in_key, 64)
    client.register_system_shared_memory("mixed_out", out_key, 64)

    for first_in_shm in (True, False):
        shm_tensor = shm_input("INPUT0" if first_in_shm else "INPUT1", [1, 16], "INT32",
                               "mixed_in", 64)
        wire = message_input("INPUT1" if first_in_shm else "INPUT0", input1, "INT32")
        inputs = [shm_tensor, wire] if first_in_shm else [wire, shm_tensor]
        result = client.infer("simple", inputs, outputs=[
            shm_output("OUTPUT0", "mixed_out", 64), grpcclient.InferRequestedOutput("OUTPUT1")])
        a, b = (input0, input1) if first_in_shm else (input1, input0)
        np.testing.assert_array_equal(read_array(out_handle, np.int32, [1, 16]), a + b)
        np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)
        assert result.get_response().raw_output_contents[0] == b""


def test_bytes_tensors_in_shm(client: grpcclient.InferenceServerClient,
                              segments: Segments) -> None:
    """BYTES in regions use the length-prefixed layout, both ways."""
    text = np.array([[b"hello", b"", b"shared memory", b"\xc3\xa9t\xc3\xa9"]], dtype=object)
    serialized = serialize_byte_tensor(text)
    payload = serialized.item()
    in_key, in_handle = segments.create(256, fill=SENTINEL)
    shm.set_shared_memory_region(in_handle, [serialized], offset=13)
    out_key, out_handle = segments.create(256, fill=SENTINEL)
    client.register_system_shared_memory("text_in", in_key, 256)
    client.register_system_shared_memory("text_out", out_key, 256)

    result = client.infer("string_upper",
                          [shm_input("TEXT", [1, 4], "BYTES", "text_in", len(payload), 13)],
                          outputs=[shm_output("UPPER", "text_out", 200, offset=7)])
    expected = np.array([[item.upper() for item in text.reshape(-1)]], dtype=object)
    upper = shm.get_contents_as_numpy(out_handle, np.object_, [1, 4], offset=7)
    np.testing.assert_array_equal(upper, expected)
    written = len(serialize_byte_tensor(expected).item())
    assert read(out_handle, 0, 7) == bytes([SENTINEL]) * 7
    assert read(out_handle, 7 + written, 256 - 7 - written) == bytes([SENTINEL]) * (249 - written)
    output = result.get_output("UPPER")
    assert output is not None and list(output.shape) == [1, 4]

    # Too small for the serialized result: Triton's INTERNAL text, nothing written.
    expect_error(grpc.StatusCode.INTERNAL,
                 f"shared memory size specified with the request for output 'UPPER' (10 bytes) "
                 f"should be at least {written} bytes to hold the results",
                 client.infer, "string_upper",
                 [shm_input("TEXT", [1, 4], "BYTES", "text_in", len(payload), 13)],
                 outputs=[shm_output("UPPER", "text_out", 10, offset=100)])
    assert read(out_handle, 100, 156) == bytes([SENTINEL]) * 156

    # A length prefix that claims more than the window holds never reads past it.
    write(in_handle, 200, (1000).to_bytes(4, "little") + b"abcd")
    expect_error(grpc.StatusCode.INVALID_ARGUMENT,
                 "malformed BYTES data for inference input 'TEXT'",
                 client.infer, "string_upper",
                 [shm_input("TEXT", [1, 1], "BYTES", "text_in", 8, 200)], prefix=True)


def test_unaligned_offsets(client: grpcclient.InferenceServerClient, segments: Segments) -> None:
    """Registration and tensor offsets that are not page (or even element) aligned."""
    data = (np.arange(1000, dtype=np.float32) * 0.5).astype(np.float32)
    key, handle = segments.create(3 * 4096 + 100, fill=SENTINEL)
    reg_offset, in_offset, out_offset = 4099, 3, 4001 + 2
    write(handle, reg_offset + in_offset, data.tobytes())
    client.register_system_shared_memory("odd", key, 2 * 4096 + 50, offset=reg_offset)
    client.infer("identity_fp32",
                 [shm_input("INPUT0", [1000], "FP32", "odd", data.nbytes, in_offset)],
                 outputs=[shm_output("OUTPUT0", "odd", 4100, out_offset)])
    start = reg_offset + out_offset
    np.testing.assert_array_equal(read_array(handle, np.float32, [1000], offset=start), data)
    assert read(handle, start + data.nbytes, 100) == bytes([SENTINEL]) * 100
    assert read(handle, 0, reg_offset + in_offset) == bytes([SENTINEL]) * (reg_offset + in_offset)

    ints = np.arange(16, dtype=np.int32).reshape(1, 16)
    write(handle, reg_offset + 7, ints.tobytes())
    write(handle, reg_offset + 77, (ints * 10).tobytes())
    client.infer("simple", [shm_input("INPUT0", [1, 16], "INT32", "odd", 64, 7),
                            shm_input("INPUT1", [1, 16], "INT32", "odd", 64, 77)],
                 outputs=[shm_output("OUTPUT1", "odd", 64, 8177)])
    np.testing.assert_array_equal(
        read_array(handle, np.int32, [1, 16], offset=reg_offset + 8177), ints - ints * 10)


# --- zero copy ---------------------------------------------------------------------------------

def test_zero_copy_input_is_a_view_of_the_client_segment(
        client: grpcclient.InferenceServerClient, segments: Segments) -> None:
    """shm_probe adds 1 to its input IN PLACE: the client's own segment shows the change."""
    key, handle = segments.create(8192, fill=SENTINEL)
    original = bytes(range(256)) * 4
    write(handle, 1000, original)
    client.register_system_shared_memory("probe_in", key, 8192)
    out_key, out_handle = segments.create(2048, fill=SENTINEL)
    client.register_system_shared_memory("probe_out", out_key, 2048)

    result = client.infer("shm_probe",
                          [shm_input("INPUT0", [1024], "UINT8", "probe_in", 1024, 1000)],
                          outputs=[shm_output("OUTPUT0", "probe_out", 1024, 512),
                                   grpcclient.InferRequestedOutput("WRITEABLE")])
    bumped = bytes((b + 1) % 256 for b in original)
    assert result.as_numpy("WRITEABLE").tolist() == [1]
    assert read(handle, 1000, 1024) == bumped          # the backend wrote into OUR segment
    assert read(handle, 0, 1000) == bytes([SENTINEL]) * 1000
    assert read(handle, 2024, 8192 - 2024) == bytes([SENTINEL]) * (8192 - 2024)
    assert read(out_handle, 512, 1024) == bumped
    assert read(out_handle, 0, 512) + read(out_handle, 1536, 512) == bytes([SENTINEL]) * 1024

    # The same bytes through the message: the backend gets a copy (possibly read-only), and the
    # client's segment is not involved.
    wire = np.frombuffer(original, dtype=np.uint8)
    result = client.infer("shm_probe", [message_input("INPUT0", wire, "UINT8")])
    copied = result.as_numpy("WRITEABLE").tolist() == [1]
    assert result.as_numpy("OUTPUT0").tobytes() == (bumped if copied else original)
    assert read(handle, 1000, 1024) == bumped


def _minor_faults(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2:].split()[7])


def test_region_tensors_fault_no_pages_per_request(server: ServerProcess,
                                                   client: grpcclient.InferenceServerClient,
                                                   segments: Segments) -> None:
    """16 MiB in and out of client regions, three times: the worker maps each region once
    and keeps it (a fresh mapping per request faults in 8,192 pages: reading the input and
    writing the output), and the supervisor touches none of the bytes."""
    size = 16 << 20
    key, handle = segments.create(2 * size)
    write(handle, 0, np.arange(size // 4, dtype=np.float32).tobytes())
    client.register_system_shared_memory("faults", key, 2 * size)
    inputs = [shm_input("INPUT0", [size // 4], "FP32", "faults", size)]
    outputs = [shm_output("OUTPUT0", "faults", size, size)]
    client.infer("identity_fp32", inputs, outputs=outputs)     # maps the region
    (worker,) = [pid for pid in worker_pids(server.pid)
                 if b"worker identity_fp32 " in Path(f"/proc/{pid}/cmdline").read_bytes()]
    before = {pid: _minor_faults(pid) for pid in (worker, server.pid)}
    for _ in range(3):
        client.infer("identity_fp32", inputs, outputs=outputs)
    faulted = {pid: _minor_faults(pid) - count for pid, count in before.items()}
    assert read(handle, size, 64) == read(handle, 0, 64)
    assert faulted[worker] < 1000, f"the worker faulted {faulted[worker]} pages in 3 requests"
    assert faulted[server.pid] < 1000, \
        f"the supervisor faulted {faulted[server.pid]} pages in 3 requests"


# --- registration errors -----------------------------------------------------------------------

def test_register_errors(client: grpcclient.InferenceServerClient, segments: Segments) -> None:
    key, _ = segments.create(4096)
    client.register_system_shared_memory("dup", key, 4096)
    expect_error(grpc.StatusCode.ALREADY_EXISTS,
                 "shared memory region 'dup' already in manager",
                 client.register_system_shared_memory, "dup", key, 16)
    for bad_key in ("/", "//", "///"):
        expect_error(grpc.StatusCode.INVALID_ARGUMENT,
                     f"cannot register shared memory region 'x' - invalid shm key '{bad_key}'",
                     client.register_system_shared_memory, "x", bad_key, 16)
    for missing in (f"/{PREFIX}missing", f"/{PREFIX}a/b", "/..", f"/{PREFIX}" + "n" * 300):
        expect_error(grpc.StatusCode.INTERNAL,
                     f"Unable to open shared memory region: '{missing}'",
                     client.register_system_shared_memory, "x", missing, 16)
    for offset, byte_size in ((0, 4097), (4000, 97), (4096, 1), (UINT64_MAX, 1),
                              (1, UINT64_MAX), (2**63, 2**63), (2**64 - 4096, 4096)):
        expect_error(grpc.StatusCode.INVALID_ARGUMENT,
                     "failed to register shared memory region 'x': invalid args",
                     client.register_system_shared_memory, "x", key, byte_size, offset)
    expect_error(grpc.StatusCode.NOT_FOUND,
                 "Unable to find system shared memory region: 'nope'",
                 client.get_system_shared_memory_status, region_name="nope")
    client.unregister_system_shared_memory("nope")            # unknown name: OK, no-op
    client.register_system_shared_memory("tail", key, 1, offset=4095)   # exactly fits
    assert sorted(client.get_system_shared_memory_status().regions) == ["dup", "tail"]


def test_reserved_arena_prefix_is_refused(server: ServerProcess,
                                          client: grpcclient.InferenceServerClient) -> None:
    """No spelling of the server's arena keys can be registered (not even existing ones)."""
    big = np.arange(64 * 1024, dtype=np.float32)      # > inline limit: staged in the arenas
    client.infer("identity_fp32", [message_input("INPUT0", big, "FP32")])
    arenas = arena_segments(server.pid)
    assert arenas, "expected the request to create arena segments"
    keys = ["/shmserve_arena_0_x_1", "shmserve_arena_0_x_1"]
    for name in arenas:
        keys += [f"/{name}", name, f"//{name}", f"///{name}"]
    for key in keys:
        expect_error(grpc.StatusCode.INVALID_ARGUMENT,
                     f"cannot register shared memory region 'steal' - shm key '{key}' uses a "
                     f"prefix reserved for the server",
                     client.register_system_shared_memory, "steal", key, 64)


# --- infer parameter errors --------------------------------------------------------------------

def _simple_inputs(region: str) -> list[grpcclient.InferInput]:
    return [shm_input("INPUT0", [1, 16], "INT32", region, 64),
            shm_input("INPUT1", [1, 16], "INT32", region, 64, 64)]


def test_infer_parameter_errors(client: grpcclient.InferenceServerClient,
                                segments: Segments) -> None:
    key, _ = segments.create(256)
    client.register_system_shared_memory("in", key, 128)       # the region is 128 bytes
    invalid = grpc.StatusCode.INVALID_ARGUMENT

    def infer(inputs: list[grpcclient.InferInput],
              outputs: list[grpcclient.InferRequestedOutput] | None = None) -> Any:
        return client.infer("simple", inputs, outputs=outputs)

    good = _simple_inputs("in")
    infer(good)
    expect_error(grpc.StatusCode.NOT_FOUND, "Unable to find shared memory region: 'nope'",
                 infer, [shm_input("INPUT0", [1, 16], "INT32", "nope", 64), good[1]])
    expect_error(grpc.StatusCode.NOT_FOUND, "Unable to find shared memory region: 'nope'",
                 infer, good, [shm_output("OUTPUT0", "nope", 64)])
    for offset in (128, 129, 10_000):
        expect_error(invalid, "Invalid offset for shared memory region: 'in'",
                     infer, [shm_input("INPUT0", [1, 16], "INT32", "in", 64, offset), good[1]])
        expect_error(invalid, "Invalid offset for shared memory region: 'in'",
                     infer, good, [shm_output("OUTPUT0", "in", 64, offset)])
    for offset, byte_size in ((65, 64), (127, 2), (0, 129)):
        expect_error(invalid, "Invalid offset + byte size for shared memory region: 'in'",
                     infer, [shm_input("INPUT0", [1, 16], "INT32", "in", byte_size, offset),
                             good[1]])
        expect_error(invalid, "Invalid offset + byte size for shared memory region: 'in'",
                     infer, good, [shm_output("OUTPUT0", "in", byte_size, offset)])

    def with_params(**params: tuple[str, Any]) -> grpcclient.InferInput:
        tensor = grpcclient.InferInput("INPUT0", [1, 16], "INT32")
        raw_params(tensor, **params)
        return tensor

    region = ("string_param", "in")
    malformed: list[dict[str, tuple[str, Any]]] = [
        {"shared_memory_region": region},                                  # no byte size
        {"shared_memory_region": region, "shared_memory_offset": ("int64_param", 0)},
        {"shared_memory_offset": ("int64_param", 0)},                      # no region
        {"shared_memory_byte_size": ("int64_param", 64)},
        {"shared_memory_offset": ("int64_param", 0),
         "shared_memory_byte_size": ("int64_param", 64)},
        {"shared_memory_region": ("int64_param", 1),                       # wrong types
         "shared_memory_byte_size": ("int64_param", 64)},
        {"shared_memory_region": ("bool_param", True),
         "shared_memory_byte_size": ("int64_param", 64)},
        {"shared_memory_region": region, "shared_memory_byte_size": ("string_param", "64")},
        {"shared_memory_region": region, "shared_memory_byte_size": ("double_param", 64.0)},
        {"shared_memory_region": region, "shared_memory_byte_size": ("int64_param", 64),
         "shared_memory_offset": ("bool_param", True)},
    ]
    for params in malformed:
        expect_error(invalid, USAGE, infer, [with_params(**params), good[1]], prefix=True)
        output = grpcclient.InferRequestedOutput("OUTPUT0")
        raw_params(output, **params)
        expect_error(invalid, USAGE, infer, good, [output], prefix=True)

    both = shm_input("INPUT0", [1, 16], "INT32", "in", 64)
    both._get_tensor().contents.int_contents.extend(range(16))
    expect_error(invalid, "unexpected 'content' provided when using shared memory",
                 infer, [both, good[1]], prefix=True)
    expect_error(invalid, "input byte size mismatch for input 'INPUT0' for model 'simple'. "
                          "Expected 64, got 128",
                 infer, [shm_input("INPUT0", [1, 16], "INT32", "in", 128), good[1]])


def test_output_region_too_small(client: grpcclient.InferenceServerClient,
                                 segments: Segments) -> None:
    in_key, in_handle = segments.create(128)
    write(in_handle, 0, np.arange(32, dtype=np.int32).tobytes())
    out_key, out_handle = segments.create(300, fill=SENTINEL)
    client.register_system_shared_memory("in", in_key, 128)
    client.register_system_shared_memory("out", out_key, 300)
    expect_error(grpc.StatusCode.INTERNAL,
                 "shared memory size specified with the request for output 'OUTPUT0' (32 bytes) "
                 "should be at least 64 bytes to hold the results",
                 client.infer, "simple", _simple_inputs("in"),
                 outputs=[shm_output("OUTPUT0", "out", 32, 10),
                          shm_output("OUTPUT1", "out", 64, 100)])
    assert read(out_handle, 0, 300) == bytes([SENTINEL]) * 300

    # Larger than needed: exactly the result's bytes are written, nothing past them.
    client.infer("simple", _simple_inputs("in"), outputs=[shm_output("OUTPUT0", "out", 200, 10)])
    ints = np.arange(32, dtype=np.int32)
    assert read(out_handle, 10, 64) == (ints[:16] + ints[16:]).tobytes()
    assert read(out_handle, 0, 10) + read(out_handle, 74, 226) == bytes([SENTINEL]) * 236


# --- hostile offsets and sizes -----------------------------------------------------------------

BAD_OFFSET = "Invalid offset for shared memory region: 'win'"
BAD_SIZE = "Invalid offset + byte size for shared memory region: 'win'"
WINDOW = 256
HOSTILE: list[tuple[str, int, str, int, str]] = [
    # (offset field, offset, byte size field, byte size, expected message)
    ("int64_param", -1, "int64_param", 16, BAD_OFFSET),
    ("int64_param", INT64_MIN, "int64_param", 16, BAD_OFFSET),
    ("int64_param", INT64_MIN, "int64_param", INT64_MAX, BAD_OFFSET),
    ("int64_param", INT64_MAX, "int64_param", 1, BAD_OFFSET),
    ("int64_param", WINDOW, "int64_param", 0, BAD_OFFSET),
    ("int64_param", 2**62, "int64_param", 2**62, BAD_OFFSET),
    ("uint64_param", UINT64_MAX, "int64_param", 1, BAD_OFFSET),
    ("uint64_param", 2**64 - 8, "uint64_param", 16, BAD_OFFSET),
    ("int64_param", 0, "int64_param", -1, BAD_SIZE),
    ("int64_param", 16, "int64_param", INT64_MIN, BAD_SIZE),
    ("int64_param", 8, "int64_param", INT64_MAX, BAD_SIZE),
    ("int64_param", 1, "uint64_param", UINT64_MAX, BAD_SIZE),
    ("int64_param", WINDOW - 1, "int64_param", 2, BAD_SIZE),
    ("int64_param", 0, "int64_param", WINDOW + 1, BAD_SIZE),
    ("int64_param", WINDOW // 2, "uint64_param", 2**64 - WINDOW // 2, BAD_SIZE),
]


def test_hostile_offsets_and_sizes(server: ServerProcess,
                                   client: grpcclient.InferenceServerClient,
                                   segments: Segments) -> None:
    """The probe writes +1 through every input byte it is given and every output lands in a
    region: any access outside [offset, offset + byte_size) would show in the sentinels."""
    workers = worker_pids(server.pid)
    key, handle = segments.create(3 * WINDOW, fill=SENTINEL)
    client.register_system_shared_memory("win", key, WINDOW, offset=WINDOW)  # the middle third

    def probe_input(offset_field: str, offset: int, size_field: str, size: int
                    ) -> grpcclient.InferInput:
        tensor = grpcclient.InferInput("INPUT0", [16], "UINT8")
        raw_params(tensor, shared_memory_region=("string_param", "win"),
                   shared_memory_offset=(offset_field, offset),
                   shared_memory_byte_size=(size_field, size))
        return tensor

    for offset_field, offset, size_field, size, message in HOSTILE:
        expect_error(grpc.StatusCode.INVALID_ARGUMENT, message, client.infer, "shm_probe",
                     [probe_input(offset_field, offset, size_field, size)])
        output = grpcclient.InferRequestedOutput("OUTPUT0")
        raw_params(output, shared_memory_region=("string_param", "win"),
                   shared_memory_offset=(offset_field, offset),
                   shared_memory_byte_size=(size_field, size))
        wire = message_input("INPUT0", np.zeros(16, dtype=np.uint8), "UINT8")
        expect_error(grpc.StatusCode.INVALID_ARGUMENT, message, client.infer, "shm_probe",
                     [wire], outputs=[output])
    assert read(handle, 0, 3 * WINDOW) == bytes([SENTINEL]) * (3 * WINDOW)

    # Shapes that disagree with a valid window are refused before anything is touched.
    for shape in ([17], [2**40], [0]):
        expect_error(grpc.StatusCode.INVALID_ARGUMENT,
                     f"input byte size mismatch for input 'INPUT0' for model 'shm_probe'. "
                     f"Expected {shape[0]}, got 16",
                     client.infer, "shm_probe", [shm_input("INPUT0", shape, "UINT8", "win", 16,
                                                           WINDOW - 16)])
    assert read(handle, 0, 3 * WINDOW) == bytes([SENTINEL]) * (3 * WINDOW)

    # The edges of the window: exactly those bytes change.
    for offset in (0, WINDOW - 16):    # output written over the (bumped) input window
        client.infer("shm_probe", [shm_input("INPUT0", [16], "UINT8", "win", 16, offset)],
                     outputs=[shm_output("OUTPUT0", "win", 16, offset)])
    expected = bytearray([SENTINEL]) * (3 * WINDOW)
    expected[WINDOW:WINDOW + 16] = bytes([SENTINEL + 1]) * 16
    expected[2 * WINDOW - 16:2 * WINDOW] = bytes([SENTINEL + 1]) * 16
    assert read(handle, 0, 3 * WINDOW) == bytes(expected)
    assert_serving(server, client, workers)


# --- lifetimes ---------------------------------------------------------------------------------

def _in_background(server: ServerProcess, outcome: dict[str, Any], label: str,
                   inputs: list[grpcclient.InferInput],
                   outputs: list[grpcclient.InferRequestedOutput] | None = None,
                   **kwargs: Any) -> threading.Thread:
    """Run one shm_probe request on its own client in a thread; outcome[label] = result/error."""
    def run() -> None:
        own = grpcclient.InferenceServerClient(server.url)
        try:
            outcome[label] = own.infer("shm_probe", inputs, outputs=outputs, **kwargs)
        except Exception as exc:  # reported by the test
            outcome[label] = exc
        finally:
            own.close()

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_unregister_while_requests_use_the_region(server: ServerProcess,
                                                  client: grpcclient.InferenceServerClient,
                                                  segments: Segments) -> None:
    """Unregister answers at once; requests executing AND queued on the region still complete
    in place, and the workers drop the mappings only after them."""
    workers = worker_pids(server.pid)
    key, handle = segments.create(4096, fill=7)
    out_key, out_handle = segments.create(4096)
    queued_key, queued_handle = segments.create(512, fill=20)
    client.register_system_shared_memory("busy_in", key, 4096)
    client.register_system_shared_memory("busy_out", out_key, 4096)
    client.register_system_shared_memory("queued", queued_key, 512)
    outcome: dict[str, Any] = {}
    threads = [_in_background(
        server, outcome, "executing",
        [shm_input("INPUT0", [256], "UINT8", "busy_in", 256, 100)],
        [shm_output("OUTPUT0", "busy_out", 256, 8)], parameters={"sleep_ms": 1000},
        client_timeout=20)]
    try:
        wait_for(lambda: mapped_anywhere(server, key) > 0,
                 what="the worker to map the input region")
        # shm_probe has one instance, busy for a second: this one waits in the queue.
        threads.append(_in_background(
            server, outcome, "queued", [shm_input("INPUT0", [128], "UINT8", "queued", 128)],
            [shm_output("OUTPUT0", "queued", 128, 256)], client_timeout=20))
        time.sleep(0.3)
        for name in ("busy_in", "busy_out", "queued"):
            client.unregister_system_shared_memory(name)
        expect_error(grpc.StatusCode.NOT_FOUND,
                     "Unable to find system shared memory region: 'busy_in'",
                     client.get_system_shared_memory_status, region_name="busy_in")
        expect_error(grpc.StatusCode.NOT_FOUND, "Unable to find shared memory region: 'busy_in'",
                     client.infer, "shm_probe",
                     [shm_input("INPUT0", [16], "UINT8", "busy_in", 16)])
        # The name is free again at once; the new registration is a different mapping.
        other_key, other_handle = segments.create(64, fill=40)
        client.register_system_shared_memory("busy_in", other_key, 64)
        client.infer("shm_probe", [shm_input("INPUT0", [64], "UINT8", "busy_in", 64)],
                     client_timeout=20)
    finally:
        for thread in threads:
            thread.join(30)
    assert not any(thread.is_alive() for thread in threads)
    for label in ("executing", "queued"):
        assert isinstance(outcome.get(label), grpcclient.InferResult), (label, outcome.get(label))
    assert read(handle, 100, 256) == bytes([8]) * 256          # the old region, in place
    assert read(handle, 0, 100) + read(handle, 356, 4096 - 356) == bytes([7]) * (4096 - 256)
    assert read(out_handle, 8, 256) == bytes([8]) * 256
    assert read(queued_handle, 0, 128) + read(queued_handle, 256, 128) == bytes([21]) * 256
    assert read(queued_handle, 128, 128) + read(queued_handle, 384, 128) == bytes([20]) * 256
    assert read(other_handle, 0, 64) == bytes([41]) * 64
    for gone in (key, out_key, queued_key):
        wait_unmapped(server, gone)
    assert_serving(server, client, workers)


def test_abandoned_request_leaves_an_unregistered_region_alone(
        start_server: Callable[..., ServerProcess], segments: Segments) -> None:
    server = start_server(["shm_probe"])     # its own server: the bug leaks a mapping
    client = grpcclient.InferenceServerClient(server.url)
    try:
        _abandon(server, client, segments)
    finally:
        client.close()


def _abandon(server: ServerProcess, client: grpcclient.InferenceServerClient,
             segments: Segments) -> None:
    key, _ = segments.create(64, fill=1)
    abandoned_key, abandoned_handle = segments.create(64, fill=1)
    client.register_system_shared_memory("hold", key, 64)
    client.register_system_shared_memory("abandoned", abandoned_key, 64)
    outcome: dict[str, Any] = {}
    thread = _in_background(server, outcome, "slow",
                            [shm_input("INPUT0", [64], "UINT8", "hold", 64)],
                            parameters={"sleep_ms": 700}, client_timeout=20)
    try:
        wait_for(lambda: mapped_anywhere(server, key) > 0, what="the slow request to start")
        expect_error(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded", client.infer,
                     "shm_probe", [shm_input("INPUT0", [64], "UINT8", "abandoned", 64)],
                     client_timeout=0.2)
        client.unregister_system_shared_memory("abandoned")
    finally:
        thread.join(30)
    assert isinstance(outcome.get("slow"), grpcclient.InferResult)
    client.unregister_system_shared_memory("hold")
    time.sleep(0.3)   # let a (wrongly) dispatched abandoned request run
    assert read(abandoned_handle, 0, 64) == bytes([1]) * 64, "written after unregister"
    wait_unmapped(server, abandoned_key, timeout=2.0)


def test_unregister_and_reregister_under_load(server: ServerProcess,
                                              client: grpcclient.InferenceServerClient,
                                              segments: Segments) -> None:
    """Several threads infer through two regions while another thread keeps unregistering and
    re-registering them (sometimes onto another segment). The only error a request may see is
    the region being absent; every answer that succeeds is correct."""
    workers = worker_pids(server.pid)
    threads_count, count, width = 3, 256, 1024
    keys = [segments.create(threads_count * width * 2) for _ in range(2)]
    stop = threading.Event()
    failures: list[str] = []
    tally = {"ok": 0, "absent": 0, "toggles": 0}
    lock = threading.Lock()

    def register(index: int) -> None:
        key = keys[index][0]
        client.register_system_shared_memory("load_in", key, threads_count * width)
        client.register_system_shared_memory("load_out", key, threads_count * width,
                                             offset=threads_count * width)

    def toggler() -> None:
        index = 0
        while not stop.is_set():
            try:
                client.unregister_system_shared_memory("load_in")
                client.unregister_system_shared_memory("load_out")
                time.sleep(0.002)
                index = (index + 1) % 2 if tally["toggles"] % 5 == 4 else index
                register(index)
                tally["toggles"] += 1
                time.sleep(0.01)
            except Exception as exc:
                failures.append(f"toggler: {exc}")
                return

    def worker_thread(slot: int) -> None:
        own = grpcclient.InferenceServerClient(server.url)
        try:
            iteration = 0
            while not stop.is_set():
                iteration += 1
                data = np.full(count, slot * 1000 + iteration, dtype=np.float32)
                for _, handle in keys:   # the same window in both segments
                    shm.set_shared_memory_region(handle, [data], offset=slot * width)
                try:
                    own.infer("identity_fp32",
                              [shm_input("INPUT0", [count], "FP32", "load_in", width,
                                         slot * width)],
                              outputs=[shm_output("OUTPUT0", "load_out", width, slot * width)],
                              client_timeout=20)
                except InferenceServerException as exc:
                    if exc.status() == str(grpc.StatusCode.NOT_FOUND) and \
                            exc.message().startswith("Unable to find shared memory region:"):
                        with lock:
                            tally["absent"] += 1
                        continue
                    failures.append(f"thread {slot}: {exc.status()} {exc.message()}")
                    return
                # Whichever segment served the request holds the answer in this window.
                answers = [read_array(handle, np.float32, [count],
                                      offset=threads_count * width + slot * width)
                           for _, handle in keys]
                if not any(np.array_equal(answer, data) for answer in answers):
                    failures.append(f"thread {slot}: wrong output")
                    return
                with lock:
                    tally["ok"] += 1
        finally:
            own.close()

    register(0)
    pool = [threading.Thread(target=worker_thread, args=(n,)) for n in range(threads_count)]
    pool.append(threading.Thread(target=toggler))
    for thread in pool:
        thread.start()
    time.sleep(2.5)
    stop.set()
    for thread in pool:
        thread.join(30)
    assert not any(thread.is_alive() for thread in pool)
    assert failures == []
    assert tally["ok"] > 20 and tally["toggles"] > 20, tally
    client.unregister_system_shared_memory()
    for key, _ in keys:
        wait_unmapped(server, key)
    assert_serving(server, client, workers)


def test_unregister_all_is_scoped_to_the_caller(client: grpcclient.InferenceServerClient,
                                                segments: Segments) -> None:
    key, _ = segments.create(4096)
    for name in ("anon1", "anon2"):
        client.register_system_shared_memory(name, key, 64)
    for owner in ("a", "b"):
        client.register_system_shared_memory(f"{owner}1", key, 64,
                                             headers={CLIENT_ID_HEADER: owner})
    client.unregister_system_shared_memory(headers={CLIENT_ID_HEADER: "a"})
    assert sorted(client.get_system_shared_memory_status().regions) == ["anon1", "anon2", "b1"]
    client.unregister_system_shared_memory()      # tritonclient: no header, anonymous
    assert sorted(client.get_system_shared_memory_status().regions) == ["b1"]
    client.unregister_system_shared_memory(headers={CLIENT_ID_HEADER: "b"})
    assert list(client.get_system_shared_memory_status().regions) == []


def test_client_unlinks_without_unregistering(server: ServerProcess,
                                              client: grpcclient.InferenceServerClient,
                                              segments: Segments) -> None:
    workers = worker_pids(server.pid)
    ints = np.arange(16, dtype=np.int32).reshape(1, 16)
    # Mapped by the worker, then unlinked by the client: the mapping keeps the memory alive.
    key, handle = segments.create(256)
    shm.set_shared_memory_region(handle, [ints, ints])
    client.register_system_shared_memory("gone", key, 256)
    client.infer("simple", _simple_inputs("gone"), outputs=[shm_output("OUTPUT0", "gone", 64,
                                                                       128)])
    segments.destroy(key)
    assert key.lstrip("/") not in os.listdir("/dev/shm")
    result = client.infer("simple", _simple_inputs("gone"),
                          outputs=[shm_output("OUTPUT0", "gone", 64, 128)])
    assert result.get_output("OUTPUT0") is not None
    client.unregister_system_shared_memory("gone")
    wait_unmapped(server, key)

    # Unlinked before the worker ever mapped it: an error, not a crash.
    for as_output in (False, True):
        key, handle = segments.create(256)
        client.register_system_shared_memory("early", key, 256)
        segments.destroy(key)
        inputs = ([message_input("INPUT0", ints, "INT32"), message_input("INPUT1", ints, "INT32")]
                  if as_output else _simple_inputs("early"))
        outputs = [shm_output("OUTPUT0", "early", 64)] if as_output else None
        expect_error(grpc.StatusCode.INTERNAL, f"Unable to open shared memory region: '{key}'",
                     client.infer, "simple", inputs, outputs=outputs, prefix=True)
        client.unregister_system_shared_memory("early")
    assert_serving(server, client, workers)


def test_no_leaks_over_200_cycles(server: ServerProcess, client: grpcclient.InferenceServerClient,
                                  segments: Segments) -> None:
    """register -> infer (input and output in the region) -> unregister -> destroy, 200 times:
    no growth in fds or mappings of the server and its workers, nor in /dev/shm entries."""
    processes = [server.pid, *worker_pids(server.pid)]
    data = np.arange(1024, dtype=np.float32)

    def cycle(index: int) -> None:
        key, handle = segments.create(8192)
        shm.set_shared_memory_region(handle, [data])
        client.register_system_shared_memory("cycle", key, 8192)
        client.infer("identity_fp32", [shm_input("INPUT0", [1024], "FP32", "cycle", 4096)],
                     outputs=[shm_output("OUTPUT0", "cycle", 4096, 4096)])
        assert read(handle, 4096, 4096) == data.tobytes(), f"cycle {index}"
        client.unregister_system_shared_memory("cycle")
        segments.destroy(key)

    def settled() -> bool:
        return mapped_anywhere(server, "/" + PREFIX) == 0

    for index in range(5):
        cycle(index)
    wait_for(settled, what="mappings of the warm-up cycles to go")
    fds = {pid: open_fds(pid) for pid in processes}

    def entries() -> list[str]:  # this test's and this server's: other runs may share the host
        arena = f"shmserve_arena_{server.pid}_"
        return sorted(name for name in os.listdir("/dev/shm")
                      if name.startswith((PREFIX, arena)))

    shm_entries = entries()
    for index in range(200):
        cycle(index)
    wait_for(settled, what="mappings of the client segments to go")
    assert worker_pids(server.pid) == processes[1:]
    assert {pid: open_fds(pid) for pid in processes} == fds
    assert entries() == shm_entries
    assert our_segments() == []


# --- key prefix and restricted protocol ------------------------------------------------------

def test_shm_key_prefix(guarded_server: ServerProcess, segments: Segments) -> None:
    triton = grpcclient.InferenceServerClient(guarded_server.url)
    try:
        other_key, _ = segments.create(64)
        expect_error(grpc.StatusCode.INVALID_ARGUMENT,
                     f"cannot register shared memory region 'x' - shm key '{other_key}' does not "
                     f"start with the allowed prefix '{ALLOWED_PREFIX}'",
                     triton.register_system_shared_memory, "x", other_key, 64,
                     headers=RESTRICT_HEADER)
        handle = shm.create_shared_memory_region("ok", f"{ALLOWED_PREFIX}1", 64, create_only=True)
        try:
            for name, key in (("ok1", f"{ALLOWED_PREFIX}1"), ("ok2", f"/{ALLOWED_PREFIX}1"),
                              ("ok3", ALLOWED_PREFIX.lstrip("/") + "1")):
                triton.register_system_shared_memory(name, key, 64, headers=RESTRICT_HEADER)
            write(handle, 0, bytes(range(64)))
            triton.infer("shm_probe", [shm_input("INPUT0", [64], "UINT8", "ok2", 64)])
            assert read(handle, 0, 64) == bytes(range(1, 65))
            triton.unregister_system_shared_memory(headers=RESTRICT_HEADER)
        finally:
            shm.destroy_shared_memory_region(handle)
    finally:
        triton.close()


def test_restricted_shared_memory_protocol(guarded_server: ServerProcess,
                                           segments: Segments) -> None:
    triton = grpcclient.InferenceServerClient(guarded_server.url)
    refused = f"This protocol is restricted, expecting header 'triton-grpc-protocol-{RESTRICT_KEY}'"
    key = f"{ALLOWED_PREFIX}r"
    handle = shm.create_shared_memory_region("r", key, 64, create_only=True)
    try:
        for headers in (None, {f"triton-grpc-protocol-{RESTRICT_KEY}": "wrong"},
                        {"triton-grpc-protocol-other": RESTRICT_VALUE}):
            for call, args in ((triton.register_system_shared_memory, ("r", key, 64)),
                               (triton.get_system_shared_memory_status, ()),
                               (triton.unregister_system_shared_memory, ("r",)),
                               (triton.get_cuda_shared_memory_status, ()),
                               (triton.unregister_cuda_shared_memory, ())):
                expect_error(grpc.StatusCode.UNAVAILABLE, refused, call, *args, headers=headers)
        triton.register_system_shared_memory("r", key, 64, headers=RESTRICT_HEADER)
        status = triton.get_system_shared_memory_status(headers=RESTRICT_HEADER)
        assert list(status.regions) == ["r"]
        # Other groups are not restricted: inference through the region needs no header.
        assert triton.is_server_live()
        triton.infer("shm_probe", [shm_input("INPUT0", [64], "UINT8", "r", 64)])
        assert read(handle, 0, 64) == bytes([1]) * 64
        triton.unregister_system_shared_memory("r", headers=RESTRICT_HEADER)
        assert list(triton.get_system_shared_memory_status(headers=RESTRICT_HEADER).regions) == []
    finally:
        shm.destroy_shared_memory_region(handle)
        triton.close()
