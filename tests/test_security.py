"""Hardening items 1-3 (issue 21): shm keys that would crash a C library, tenants reaching
each other's memory, and a spoofed local socket. Real servers, real segments, a second Unix
user (nobody) where the suite runs as root."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from shmserve.client import Client, ShmserveError, SystemRegion
from shmserve.protos import shmserve_service_pb2 as pb
from shmserve.protos.local_socket import SYSTEM_SOCKET_DIR, prepare_socket_dir, socket_name
from shmserve.tests.serverproc import ServerProcess

A = np.arange(16, dtype=np.int32).reshape(1, 16)
NOBODY = 65534
StartServer = Callable[..., ServerProcess]
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as a second user")


def rpc(server: ServerProcess, method: str, request: object, response_type: type) -> object:
    with grpc.insecure_channel(server.url) as channel:
        call = channel.unary_unary(f"/inference.GRPCInferenceService/{method}",
                                   request_serializer=lambda m: m.SerializeToString(),
                                   response_deserializer=response_type.FromString)  # type: ignore[attr-defined]
        return call(request, timeout=10)


def register(server: ServerProcess, name: str, key: str, byte_size: int = 64,
             offset: int = 0) -> grpc.RpcError | None:
    try:
        rpc(server, "SystemSharedMemoryRegister",
            pb.SystemSharedMemoryRegisterRequest(name=name, key=key, offset=offset,
                                                 byte_size=byte_size),
            pb.SystemSharedMemoryRegisterResponse)
    except grpc.RpcError as exc:
        return exc
    return None


def assert_serving(server: ServerProcess) -> None:
    assert server.process.poll() is None, server.log()
    with Client(server.url) as client:
        assert client.is_server_live()
        np.testing.assert_array_equal(
            client.infer("simple", {"INPUT0": A, "INPUT1": A})["OUTPUT0"], A + A)


# --- 1. keys that reach a C library ------------------------------------------------------
@pytest.mark.parametrize("extra", [(), ("--shm-key-prefix", "/x")])
def test_nul_in_a_key_over_grpc_is_refused_and_the_server_stays_up(
        start_server: StartServer, extra: tuple[str, ...]) -> None:
    server = start_server(["simple"], *extra)
    for key in ("/x\x00y", "\x00", "/x\x00"):
        error = register(server, "r", key)
        assert error is not None
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
        assert error.details() == (f"cannot register shared memory region 'r' - invalid shm "
                                   f"key {key!r}")
    assert_serving(server)


def test_nul_in_a_key_through_the_local_channel_as_root(start_server: StartServer,
                                                         tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    server = start_server(["simple"], "--local-socket", str(path))
    with Client(f"local://{path}") as client:
        with pytest.raises(ShmserveError) as info:
            client.register_system_shared_memory("r", "/x\x00y", 64)
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "invalid shm key '/x\\x00y'" in info.value.message
        # the same channel goes on serving
        np.testing.assert_array_equal(
            client.infer("simple", {"INPUT0": A, "INPUT1": A})["OUTPUT0"], A + A)
    assert_serving(server)


def test_keys_that_would_be_paths_are_refused_before_any_open(start_server: StartServer
                                                               ) -> None:
    server = start_server(["simple"])
    for key in ("/../etc/passwd", "/a/../../etc/shadow", "/.."):
        error = register(server, "r", key)
        assert error is not None and error.code() == grpc.StatusCode.INTERNAL, error
        assert error.details().startswith("Unable to open shared memory region")
    assert_serving(server)


# --- 2. tenants ---------------------------------------------------------------------------
def test_client_shm_over_grpc_is_off_by_default(start_server: StartServer) -> None:
    server = start_server(["simple"], "--allow-client-shm=false")
    segment = SystemRegion(4096)
    try:
        error = register(server, "mine", segment.key)
    finally:
        segment.close()
    assert error is not None and error.code() == grpc.StatusCode.UNAVAILABLE, error
    assert "client shared memory is disabled on this server" in error.details()
    assert "--allow-client-shm" in error.details()
    status = rpc(server, "SystemSharedMemoryStatus", pb.SystemSharedMemoryStatusRequest(),
                 pb.SystemSharedMemoryStatusResponse)
    assert not status.regions  # type: ignore[attr-defined]
    assert_serving(server)


@as_root
@pytest.mark.parametrize("foreign_allowed", [False, True])
def test_segments_of_another_user_need_shm_allow_foreign_owners(
        start_server: StartServer, foreign_allowed: bool) -> None:
    extra = ["--shm-allow-foreign-owners"] if foreign_allowed else []
    server = start_server(["simple"], *extra)
    segment = SystemRegion(4096)
    try:
        os.chown(f"/dev/shm/{segment.key.lstrip('/')}", NOBODY, NOBODY)
        error = register(server, "theirs", segment.key)
    finally:
        segment.close()
    if foreign_allowed:
        assert error is None
    else:
        assert error is not None and error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
        assert error.details() == (
            f"cannot register shared memory region 'theirs' - shm key '{segment.key}' belongs "
            f"to another user than the server's (start the server with "
            f"--shm-allow-foreign-owners to allow it)")


SECOND_USER = """
import os, sys
import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException
from shmserve.client import Client, ShmserveError
grpc_url, local_url, root_key = sys.argv[1:4]
os.setgid(65534)
os.setuid(65534)
triton = grpcclient.InferenceServerClient(grpc_url)
try:
    triton.register_system_shared_memory("stolen", root_key, 64)
    print("GRPC REGISTERED")
except InferenceServerException as exc:
    print("GRPC REFUSED", exc.status())
print("GRPC SEES", sorted(triton.get_system_shared_memory_status(as_json=True).get("regions", {})))
# root's local-channel regions are private ("@<channel>:<name>"): try the first channels' names
x = np.arange(16, dtype=np.int32).reshape(1, 16)
read = 0
for channel in range(1, 33):
    inputs = [grpcclient.InferInput("INPUT0", [1, 16], "INT32"),
              grpcclient.InferInput("INPUT1", [1, 16], "INT32")]
    inputs[0].set_shared_memory(f"@{channel}:root-private", 64)
    inputs[1].set_data_from_numpy(x)
    try:
        triton.infer("simple", inputs)
        read += 1
    except InferenceServerException as exc:
        assert "Unable to find shared memory region" in exc.message(), exc.message()
print("GRPC READ", read)
with Client(local_url) as client:
    try:
        client.register_system_shared_memory("stolen", root_key, 64)
        print("LOCAL REGISTERED")
    except ShmserveError as exc:
        print("LOCAL REFUSED", exc.code.name, exc.message)
"""


@as_root
def test_a_second_user_can_neither_register_nor_read_root_segments_by_default(
        start_server: StartServer) -> None:
    shared = Path(tempfile.mkdtemp(prefix="shmserve-test-"))  # pytest's tmp is root-only
    shared.chmod(0o755)
    path = shared / "s.sock"
    root_segment = SystemRegion(4096)
    marker = root_segment.ndarray((64,), np.uint8)
    marker[:] = 7
    try:
        server = start_server(["simple"], "--allow-client-shm=false", "--local-socket",
                              str(path))
        path.chmod(0o666)  # let the other user connect
        with Client(f"local://{path}") as root_client:
            root_client.register_system_shared_memory("root-private", root_segment.key, 4096)
            done = subprocess.run([sys.executable, "-c", textwrap.dedent(SECOND_USER),
                                   server.url, f"local://{path}", root_segment.key],
                                  capture_output=True, text=True, timeout=120, cwd="/")
            # root's region is untouched and still its own
            assert (marker == 7).all()
            assert "root-private" in root_client.shared_memory_status()
    finally:
        root_segment.close()
        shutil.rmtree(shared, ignore_errors=True)
    assert done.returncode == 0, done.stderr
    assert "GRPC REFUSED StatusCode.UNAVAILABLE" in done.stdout, done.stdout
    assert "GRPC SEES []" in done.stdout, done.stdout
    assert "GRPC READ 0" in done.stdout, done.stdout
    assert "LOCAL REFUSED INVALID_ARGUMENT" in done.stdout, done.stdout
    assert "belongs to another user" in done.stdout


# --- 3. a spoofed local socket ------------------------------------------------------------
FAKE_SERVER = """
import os, socket, sys
path = sys.argv[1]
os.setgid(65534)
os.setuid(65534)
listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
listener.bind(path)
listener.listen(4)
print("LISTENING", flush=True)
listener.settimeout(30)
received = 0
try:
    while True:
        connection, _ = listener.accept()
        connection.settimeout(2)
        try:
            while chunk := connection.recv(65536):
                received += len(chunk)
        except OSError:
            pass
        connection.close()
        print("RECEIVED", received, flush=True)
except OSError:
    pass
"""


@pytest.fixture
def fake_server() -> Iterator[tuple[Path, subprocess.Popen[str]]]:
    """Another user listening at a path in a world-writable directory, as in /tmp."""
    shared = Path(tempfile.mkdtemp(prefix="shmserve-test-"))
    shared.chmod(0o1777)
    path = shared / "shmserve-8001.sock"
    process = subprocess.Popen([sys.executable, "-c", textwrap.dedent(FAKE_SERVER), str(path)],
                               stdout=subprocess.PIPE, text=True, cwd="/")
    assert process.stdout is not None
    assert process.stdout.readline().strip() == "LISTENING"
    try:
        yield path, process
    finally:
        process.kill()
        process.communicate()
        shutil.rmtree(shared, ignore_errors=True)


@as_root
def test_the_client_refuses_a_socket_served_by_another_user(
        fake_server: tuple[Path, subprocess.Popen[str]]) -> None:
    path, process = fake_server
    with Client(f"local://{path}") as client:
        with pytest.raises(ShmserveError) as info:
            client.infer("simple", {"INPUT0": A, "INPUT1": A})
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    assert f"served by uid {NOBODY}" in info.value.message
    assert process.stdout is not None
    assert process.stdout.readline().strip() == "RECEIVED 0"  # nothing sent, not a doorbell


@as_root
def test_a_trusted_uid_may_be_named(fake_server: tuple[Path, subprocess.Popen[str]]) -> None:
    """Naming the uid lets the connection through (the fake then fails the handshake)."""
    path, _ = fake_server
    with Client(f"local://{path}", server_uid=NOBODY) as client:
        with pytest.raises(ShmserveError) as info:
            client.infer("simple", {"INPUT0": A, "INPUT1": A})
    assert "served by uid" not in info.value.message


@as_root
def test_a_grpc_url_falls_back_to_grpc_past_a_spoofed_socket(
        start_server: StartServer, fake_server: tuple[Path, subprocess.Popen[str]],
        caplog: pytest.LogCaptureFixture) -> None:
    path, _ = fake_server
    server = start_server(["simple"])
    with Client(server.url, transport="shm", local_socket=str(path)) as client:
        np.testing.assert_array_equal(
            client.infer("simple", {"INPUT0": A, "INPUT1": A})["OUTPUT0"], A + A)
        assert client.transport == "grpc"
    assert any(f"served by uid {NOBODY}" in r.getMessage() for r in caplog.records)


def test_the_default_socket_is_in_a_directory_only_the_server_can_write(
        start_server: StartServer) -> None:
    server = start_server(["simple"])
    directory = (os.environ.get("RUNTIME_DIRECTORY") or
                 (SYSTEM_SOCKET_DIR if os.geteuid() == 0
                  else os.path.join(tempfile.gettempdir(), f"shmserve-{os.geteuid()}")))
    path = os.path.join(directory, socket_name(server.port))
    assert stat.S_ISSOCK(os.stat(path).st_mode)
    info = os.stat(directory)
    assert info.st_uid == os.geteuid()
    assert not info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    with Client(server.url, transport="shm") as client:
        client.infer("simple", {"INPUT0": A, "INPUT1": A})
        assert client.transport == "shm"


def test_a_server_refuses_a_socket_directory_others_can_write(
        start_server: StartServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    unsafe = tmp_path / "run"
    unsafe.mkdir()
    unsafe.chmod(0o777)
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(unsafe))
    server = start_server(["simple"], wait=False)
    assert server.process.wait(60) != 0
    assert f"local socket directory '{unsafe}' is writable by other users" in server.log()


def test_prepare_socket_dir_creates_private_directories_and_refuses_links(tmp_path: Path
                                                                           ) -> None:
    fresh = tmp_path / "fresh"
    prepare_socket_dir(str(fresh), 0o700)
    assert stat.S_IMODE(os.stat(fresh).st_mode) == 0o700
    prepare_socket_dir(str(fresh), 0o700)  # an existing safe directory is fine
    link = tmp_path / "link"
    link.symlink_to(fresh)
    with pytest.raises(PermissionError, match="is not a directory"):
        prepare_socket_dir(str(link), 0o700)
