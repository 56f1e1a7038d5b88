"""shmserve.Server: the server inside another Python program (shmserve/embedded.py)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

import shmserve
from shmserve.client import Client, ShmserveError
from shmserve.daemon.cli import build_parser, settings_from_args
from shmserve.embedded import remove_stale_directories
from shmserve.embedded_settings import serve_arguments
from shmserve.tests.serverproc import arena_segments, build_repository
from shmserve.workers.lineage import process_alive

X = np.arange(16, dtype=np.int32).reshape(1, 16)


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    return build_repository(tmp_path / "models", ["simple", "identity_fp32"])


def _parent_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return int(stat.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _descendants(root: int) -> list[int]:
    """Every process below ``root``: the supervisor's fork server, resource tracker and
    workers."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (parent := _parent_of(int(entry))) is not None:
            children.setdefault(parent, []).append(int(entry))
    found, stack = [], [root]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def _gone(pids: list[int], within: float) -> bool:
    deadline = time.monotonic() + within
    while any(process_alive(pid) for pid in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_start_infer_load_unload_and_exit_leaves_nothing(repository: Path,
                                                         tmp_path: Path) -> None:
    with shmserve.Server(repository, model_control_mode="explicit",
                         log_file=str(tmp_path / "server.log")) as server:
        supervisor = server.pid
        assert supervisor is not None
        private = os.path.dirname(server.socket_path)
        # No network port unless asked: gRPC on a Unix socket beside the local channel's.
        assert server.status == f"serving on gRPC unix:{private}/grpc.sock"
        assert server.grpc_port is None and server.http_port is None
        with server.client() as client:
            with pytest.raises(ShmserveError):
                client.infer("simple", {"INPUT0": X, "INPUT1": X})   # explicit: not loaded
            server.load("simple")
            out = client.infer("simple", {"INPUT0": X, "INPUT1": X})
            assert client.transport == "shm"
            np.testing.assert_array_equal(out["OUTPUT0"], X + X)
            # gRPC (on its Unix socket) moves large tensors through /dev/shm arenas.
            server.load("identity_fp32")
            with Client(server.grpc_address) as over_grpc:
                big = np.ones(1 << 18, np.float32)
                out = over_grpc.infer("identity_fp32", {"INPUT0": big})
                np.testing.assert_array_equal(out["OUTPUT0"], big)
            workers = _descendants(supervisor)
            assert len(workers) >= 3 and arena_segments(supervisor)
            server.unload("simple")
            assert not client.is_model_ready("simple")
            assert client.is_model_ready("identity_fp32")
    assert not process_alive(supervisor)
    assert _gone(workers, within=10)
    assert arena_segments(supervisor) == []
    assert not os.path.exists(private)
    assert server.pid is None


def test_ports_only_when_asked(repository: Path, tmp_path: Path) -> None:
    with shmserve.Server(repository, grpc_address="127.0.0.1", grpc_port=0, allow_http=True,
                         http_address="127.0.0.1", http_port=0,
                         log_file=str(tmp_path / "server.log")) as server:
        assert server.grpc_port and server.http_port
        with grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}") as triton:
            assert triton.is_model_ready("simple")
        with httpclient.InferenceServerClient(f"127.0.0.1:{server.http_port}") as rest:
            assert rest.is_server_ready()


def test_a_host_that_blocks_sigterm_still_stops_its_server(repository: Path,
                                                          tmp_path: Path) -> None:
    """The mask of blocked signals is inherited across exec (the event loop's signal handling
    unblocks the server's: this guards that)."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        server = shmserve.Server(repository, exit_timeout_secs=20,
                                 log_file=str(tmp_path / "server.log")).start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
    started = time.monotonic()
    server.close()   # SIGTERM; were it still blocked, close() would wait 20 s, then kill
    assert time.monotonic() - started < 10
    assert "received SIGTERM; draining" in (tmp_path / "server.log").read_text()


def test_async_with(repository: Path, tmp_path: Path) -> None:
    async def main() -> np.ndarray:
        async with shmserve.Server(repository, log_file=str(tmp_path / "server.log")
                                   ) as server:
            client = server.async_client()
            try:
                out = await client.infer("simple", {"INPUT0": X, "INPUT1": X})
            finally:
                await client.close()
            return out["OUTPUT1"]

    np.testing.assert_array_equal(asyncio.run(main()), X - X)


# The host program for the next two tests: starts a server, reports, then waits.
HOST = textwrap.dedent("""
    import os, sys
    import numpy as np
    import shmserve
    from shmserve.client import Client
    server = shmserve.Server(sys.argv[1], log_file=sys.argv[2]).start()
    with server.client() as client, Client(server.grpc_address) as over_grpc:
        x = np.ones((1, 16), "int32")
        client.infer("simple", {"INPUT0": x, "INPUT1": x})
        over_grpc.infer("identity_fp32", {"INPUT0": np.ones(1 << 18, "float32")})
    if sys.argv[3] == "fork":
        child = os.fork()
        if child == 0:
            try:
                server.client()
            except shmserve.ServerError as exc:
                print("child:", exc, flush=True)
            os._exit(0)
        os.waitpid(child, 0)
    print("pid", server.pid, flush=True)
    sys.stdin.read()   # until the test closes it; then a normal exit (atexit stops the server)
""")


def _host(repository: Path, tmp_path: Path, mode: str) -> tuple[subprocess.Popen[str], int,
                                                                  list[str]]:
    host = subprocess.Popen([sys.executable, "-c", HOST, str(repository),
                             str(tmp_path / "server.log"), mode],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert host.stdout is not None
    lines = []
    for line in host.stdout:
        lines.append(line)
        if line.startswith("pid "):
            return host, int(line.split()[1]), lines
    raise AssertionError(f"the host program ended: {lines}")


def _end(host: subprocess.Popen[str], signum: int | None = None) -> None:
    """End the host program: with a signal, or by closing its stdin (a normal exit)."""
    assert host.stdin is not None and host.stdout is not None
    if signum is not None:
        host.send_signal(signum)
    host.stdin.close()
    host.wait(30)
    host.stdout.close()


def test_parent_sigkilled_takes_the_server_and_its_workers(repository: Path,
                                                           tmp_path: Path) -> None:
    host, supervisor, _ = _host(repository, tmp_path, "plain")
    try:
        processes = [supervisor, *_descendants(supervisor)]
        assert len(processes) >= 5  # + its fork server, resource tracker, two workers
        assert arena_segments(supervisor)
        os.kill(host.pid, signal.SIGKILL)
        host.wait()
        assert _gone(processes, within=15), "the server outlived its host program"
        assert arena_segments(supervisor) == []
        # The host could not remove its server's private directory; the next Server does.
        (private,) = Path(tempfile.gettempdir()).glob(f"shmserve-embedded-{host.pid}-*")
        assert list(private.iterdir()) == []   # the server removed its sockets
        assert str(private) in remove_stale_directories()
    finally:
        _end(host, signal.SIGKILL)


def test_a_forked_child_cannot_use_the_parents_server(repository: Path,
                                                      tmp_path: Path) -> None:
    host, supervisor, lines = _host(repository, tmp_path, "fork")
    try:
        message = "".join(lines)
        assert f"belongs to process {host.pid}" in message and "is a fork of it" in message
        assert process_alive(supervisor)  # the child's exit did not end the parent's server
        private = next(Path(tempfile.gettempdir()).glob(f"shmserve-embedded-{host.pid}-*"))
    finally:
        _end(host)   # a normal exit: atexit stops the server
    assert _gone([supervisor], within=15)
    assert not private.exists()


def test_unknown_setting_and_bad_values_fail_before_anything_starts() -> None:
    with pytest.raises(TypeError, match=r"unknown setting.*grpc_prot"):
        shmserve.Server("models", grpc_prot=1)
    with pytest.raises(ValueError, match=r"model_control_mode.*choose from none, explicit"):
        shmserve.Server("models", model_control_mode="manual")
    with pytest.raises(ValueError, match="grpc_port"):
        shmserve.Server("models", grpc_port="eighty")
    with pytest.raises(TypeError, match=r"allow_http.*True or False"):
        shmserve.Server("models", allow_http="yes")
    with pytest.raises(TypeError, match=r"lifeline_fd.*the server sets it"):
        shmserve.Server("models", lifeline_fd=3)
    with pytest.raises(TypeError, match=r"worker_heartbeat_secs.*internal"):
        shmserve.Server("models", worker_heartbeat_secs=1.0)


def test_keyword_settings_mean_what_the_flags_mean() -> None:
    given = {"model_repository": "/m", "grpc_port": 0, "allow_http": True,
             "model_control_mode": "explicit", "load_models": ["a", "b"],
             "exit_timeout_secs": 2.5, "restricted_protocols": [({"health", "inference"},
                                                                 "key", "v")],
             "repoagent_directory": None, "log_verbose": -1}
    args = build_parser().parse_args(["serve", *serve_arguments(given)])
    settings = settings_from_args(args)
    for name, value in given.items():
        assert getattr(settings, name) == value, name


def test_import_shmserve_stays_light() -> None:
    code = ("import sys, shmserve; name = shmserve.Server.__name__; "
            "print([m for m in ('grpc', 'numpy', 'torch') if m in sys.modules], name)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd="/")
    assert out.stdout.split() == ["[]", "Server"]
