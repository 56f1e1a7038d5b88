"""Memory of large requests (issue 21, item 5), against real servers.

What is measured, and why: ``VmHWM`` (peak resident set) of the supervisor. It counts every
page the process touched, shared-memory pages included, so the supervisor moves large
tensors in and out of the arenas with pwrite/pread and keeps their pages out of its resident
set; the arenas themselves are measured as what they are, /dev/shm segments.

gRPC's own receive path (grpcio 1.85, ``ReceiveMessageOperation``) holds a request three times
for a moment before the handler sees it: C-core's slices, one Python ``bytes`` per slice, and
their join. No server code runs then, so the test resets the high-water mark
(``/proc/<pid>/clear_refs``) once the request reaches the input arena and holds everything
after that -- staging, the worker's answer, the response -- to twice the request plus a
margin; the whole request, gRPC's receive included, to three times plus a margin.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from shmserve.client import Client, ShmserveError
from shmserve.tests.serverproc import (
    ServerProcess,
    arena_segments,
    build_repository,
    worker_pids,
)
from shmserve.workers.shm import ARENA_INITIAL_BYTES, Arena

MIB = 1 << 20
CHANNEL_ARGS = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]


def _status_mib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) // 1024
    raise KeyError(field)


def _input_arenas(pid: int) -> dict[str, int]:
    """The server's input arena segments (``..._w<slot>i<lane>_<generation>``) by size."""
    return {name: os.path.getsize(f"/dev/shm/{name}") for name in arena_segments(pid)
            if re.search(r"_w\d+i\d+_\d+$", name)}


def _arena_sizes(pid: int) -> dict[str, int]:
    sizes = {}
    for name in arena_segments(pid):
        try:
            sizes[name] = os.path.getsize(f"/dev/shm/{name}")
        except FileNotFoundError:
            pass
    return sizes


def _deleted_arena_mappings(pid: int) -> list[str]:
    """Mappings and descriptors of arena segments already unlinked: their pages stay
    allocated until the last of them goes."""
    with open(f"/proc/{pid}/maps") as maps:
        held = [line.split()[-2] for line in maps
                if "shmserve_arena_" in line and line.rstrip().endswith("(deleted)")]
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if "shmserve_arena_" in target and target.endswith("(deleted)"):
            held.append(target)
    return held


@pytest.fixture
def identity_server(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[ServerProcess]:
    # The supervisor's own memory and arenas: with frontend processes a large request goes
    # from a frontend's memfd to the worker, past both (test_frontends.py).
    extra = ("--grpc-frontends", "1", *getattr(request, "param", ()))
    repo = build_repository(tmp_path / "repo", ["identity_fp32"])
    server = ServerProcess(repo, *extra)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def _infer(url: str, data: np.ndarray) -> np.ndarray:
    client = grpcclient.InferenceServerClient(url, channel_args=CHANNEL_ARGS)
    try:
        tensor = grpcclient.InferInput("INPUT0", [data.size], "FP32")
        tensor.set_data_from_numpy(data)
        result = client.infer("identity_fp32", [tensor], client_timeout=300)
        output = result.as_numpy("OUTPUT0")
        assert output is not None
        return output
    finally:
        client.close()


@pytest.mark.parametrize("identity_server", [("--arena-idle-secs", "0")], indirect=True)
def test_peak_supervisor_rss_for_a_512_mib_request(identity_server: ServerProcess) -> None:
    server = identity_server
    request_bytes = 512 * MIB
    data = np.arange(request_bytes // 4, dtype=np.float32)
    baseline = _status_mib(server.pid, "VmRSS")
    receive_peak: list[int] = []
    done = threading.Event()

    def reset_peak_once_staged() -> None:
        """When the input arena has the request's size, gRPC has handed it over."""
        while not done.is_set():
            if any(size >= request_bytes for size in _input_arenas(server.pid).values()):
                receive_peak.append(_status_mib(server.pid, "VmHWM"))
                with open(f"/proc/{server.pid}/clear_refs", "w") as clear_refs:
                    clear_refs.write("5")  # reset VmHWM to the current resident set
                return
            time.sleep(0.001)

    watcher = threading.Thread(target=reset_peak_once_staged)
    watcher.start()
    try:
        output = _infer(server.url, data)
    finally:
        done.set()
        watcher.join()
    assert output.shape == data.shape
    assert output[0] == 0 and output[-1] == data[-1] and output[12345] == 12345
    del output
    assert receive_peak, "the request never reached the input arena at its size"
    request_mib = request_bytes // MIB
    after_handover = _status_mib(server.pid, "VmHWM")
    assert after_handover < baseline + 2 * request_mib + 128, (
        f"from staging to response the supervisor peaked at {after_handover} MiB "
        f"(started at {baseline} MiB) for a {request_mib} MiB request and response")
    assert receive_peak[0] < baseline + 3 * request_mib + 128, (
        f"receiving it the supervisor peaked at {receive_peak[0]} MiB")
    # Nothing of it stays: the heap was trimmed, the arenas' pages are not ours.
    assert _status_mib(server.pid, "VmRSS") < baseline + 64


def _minor_faults(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as stat:
        return int(stat.read().rsplit(")", 1)[1].split()[7])


@pytest.mark.parametrize("identity_server", [("--arena-idle-secs", "0")], indirect=True)
def test_large_requests_reuse_the_heap_and_give_it_back_when_idle(
        identity_server: ServerProcess) -> None:
    """16 MiB in and out, again and again: the supervisor's buffers for them (gRPC's join of
    the request, the response, gRPC's copy of it) reuse the heap's pages instead of faulting
    fresh ones in each time (glibc mmaps blocks this large, or trims them as they are freed:
    about 12,000 faults a request); once idle, the pages go back (daemon/heap.py)."""
    server = identity_server
    data = np.ones(16 * MIB // 4, dtype=np.float32)
    baseline = _status_mib(server.pid, "VmRSS")
    for _ in range(2):
        assert _infer(server.url, data).shape == data.shape
    faults = _minor_faults(server.pid)
    for _ in range(5):
        assert _infer(server.url, data).shape == data.shape
    faults = _minor_faults(server.pid) - faults
    assert faults < 16 * MIB // 4096, f"{faults} page faults for 5 requests of 16 MiB"
    deadline = time.monotonic() + 20
    while _status_mib(server.pid, "VmRSS") >= baseline + 24:
        if time.monotonic() > deadline:
            pytest.fail(f"the supervisor kept {_status_mib(server.pid, 'VmRSS')} MiB "
                        f"(started at {baseline} MiB) after idle")
        time.sleep(0.2)


@pytest.mark.parametrize("identity_server", [("--arena-idle-secs", "2")], indirect=True)
def test_arenas_shrink_back_after_idle(identity_server: ServerProcess) -> None:
    server = identity_server
    data = np.ones(64 * MIB // 4, dtype=np.float32)
    assert _infer(server.url, data).shape == data.shape
    grown = {name: size for name, size in _arena_sizes(server.pid).items() if size >= 64 * MIB}
    assert len(grown) == 2, f"expected the input and the output arena grown: {grown}"
    workers = worker_pids(server.pid)
    assert len(workers) == 1

    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        sizes = _arena_sizes(server.pid)
        held = _deleted_arena_mappings(server.pid) + _deleted_arena_mappings(workers[0])
        if all(size <= MIB for size in sizes.values()) and not held:
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"arenas still grown after idle: {sizes}; unlinked but held: {held}")
    assert _status_mib(workers[0], "RssShmem") < 8
    assert _status_mib(server.pid, "RssShmem") < 8
    # The next large request grows them again and is answered.
    np.testing.assert_array_equal(_infer(server.url, data * 2)[:8], np.full(8, 2.0))


@pytest.mark.parametrize("identity_server", [("--max-request-bytes", str(MIB))], indirect=True)
def test_max_request_bytes_over_grpc(identity_server: ServerProcess) -> None:
    small = np.ones(MIB // 8, dtype=np.float32)  # 128 KiB
    np.testing.assert_array_equal(_infer(identity_server.url, small), small)
    with pytest.raises(InferenceServerException) as info:
        _infer(identity_server.url, np.ones(2 * MIB // 4, dtype=np.float32))
    assert info.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
    assert "larger than max" in (info.value.message() or "")
    assert f"vs. {MIB}" in (info.value.message() or ""), info.value.message()
    np.testing.assert_array_equal(_infer(identity_server.url, small), small)  # still serving


def test_max_request_bytes_over_the_local_channel(tmp_path: Path) -> None:
    repo = build_repository(tmp_path / "repo", ["identity_fp32"])
    socket_path = str(tmp_path / "shmserve.sock")
    with ServerProcess(repo, "--local-socket", socket_path, "--max-request-bytes",
                       str(MIB)) as server:
        server.wait_ready()
        with Client(f"local://{socket_path}") as client:
            small = np.ones(MIB // 8, dtype=np.float32)
            np.testing.assert_array_equal(client.infer("identity_fp32",
                                                       {"INPUT0": small})["OUTPUT0"], small)
            with pytest.raises(ShmserveError) as info:
                client.infer("identity_fp32", {"INPUT0": np.ones(2 * MIB // 4, np.float32)})
            assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert info.value.message == (f"request tensor data of {2 * MIB} bytes is larger "
                                          f"than --max-request-bytes ({MIB})")
            assert client.transport == "shm"


def test_segment_file_io_matches_the_mapping() -> None:
    """Large tensors go through pwrite/pread, small ones through the mapping: same bytes."""
    arena = Arena(os.getpid(), "memtest")
    try:
        segment = arena.ensure(4 * MIB)
        large = np.random.default_rng(1).integers(0, 255, 2 * MIB, dtype=np.uint8)
        segment.write(64, memoryview(large))
        assert bytes(segment.buf[64:64 + large.nbytes]) == large.tobytes()
        assert segment.read(64, large.nbytes) == large.tobytes()
        small = b"\x07" * 1000
        segment.write(3 * MIB, small)
        assert segment.read(3 * MIB, len(small)) == small
        assert arena.grown
        key = segment.key
        assert arena.shrink() and arena.segment is None
        assert not os.path.exists(f"/dev/shm{key}")
        assert not arena.shrink()  # nothing grown any more
        assert arena.ensure(100).size == ARENA_INITIAL_BYTES and not arena.grown
    finally:
        arena.close()
