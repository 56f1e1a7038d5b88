"""Run a real shmserve server as a subprocess for tests and benchmarks."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

import grpc

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "models"
TEST_MODELS = Path(__file__).resolve().parent / "models"
READY_LINE = "shmserve ready: "  # logged once start-up loading is over


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """``count`` distinct free ports (held open together while chosen: two single calls may
    be given the same port once the first socket is closed)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def arena_segments(pid: int | None = None) -> list[str]:
    prefix = "shmserve_arena_" + (f"{pid}_" if pid is not None else "")
    return sorted(name for name in os.listdir("/dev/shm") if name.startswith(prefix))


def build_repository(target: Path, models: Sequence[str]) -> Path:
    """Copy example/test models by name into a fresh repository directory."""
    target.mkdir(parents=True, exist_ok=True)
    for name in models:
        source = EXAMPLES / name if (EXAMPLES / name).is_dir() else TEST_MODELS / name
        shutil.copytree(source, target / name)
    return target


class ServerProcess:
    """``shmserve serve`` on 127.0.0.1 and a free port; stopped with SIGTERM.

    Client shared memory over gRPC is on (``--allow-client-shm``) unless ``extra`` says
    otherwise: most suites register regions over gRPC as Triton's clients do. ``python``: the
    interpreter to run it with (another environment), this one by default.
    """

    def __init__(self, repository: Path, *extra: str, log_path: Path | None = None,
                 python: str | None = None, env: Mapping[str, str] | None = None) -> None:
        self.repository = repository
        self.port, self.http_port = free_ports(2)
        self.url = f"127.0.0.1:{self.port}"
        self.http_url = f"127.0.0.1:{self.http_port}"
        self.log_path = log_path or repository.parent / f"server-{self.port}.log"
        self._log = open(self.log_path, "wb")
        env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        if not any(arg.startswith("--allow-client-shm") for arg in extra):
            extra = ("--allow-client-shm", *extra)
        if not any(arg.startswith("--grpc-frontends") for arg in extra) \
                and "SHMSERVE_GRPC_FRONTENDS" not in os.environ:
            # Today's topology whatever the host's cores (the default depends on them); the
            # environment variable runs a whole suite with more.
            extra = ("--grpc-frontends", "1", *extra)
        self.process = subprocess.Popen(
            [python or sys.executable, "-m", "shmserve.daemon", "serve", "--model-repository",
             str(repository), "--grpc-address", "127.0.0.1", "--grpc-port", str(self.port),
             "--http-address", "127.0.0.1", "--http-port", str(self.http_port),
             "--exit-timeout-secs", "10", "--metrics-port", "0", *extra],
            stdout=self._log, stderr=subprocess.STDOUT, env=env)

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metrics_page(self) -> str:
        """The Prometheus page, from the metrics port the server logged."""
        port = re.search(r"Started Metrics Service at [\d.]+:(\d+)", self.log())
        assert port is not None, self.log()
        with urllib.request.urlopen(f"http://127.0.0.1:{port.group(1)}/metrics",
                                    timeout=10) as page:
            return str(page.read().decode())

    def metric(self, name: str, model: str) -> float:
        """The value of a per-model series ``name{model="<model>",...}``."""
        text = self.metrics_page()
        found = re.search(rf'^{name}{{model="{model}",[^}}]*}} (\S+)$', text, re.MULTILINE)
        assert found is not None, text
        return float(found.group(1))

    def wait_ready(self, timeout: float = 60.0, models_ready: bool = True,
                   credentials: grpc.ChannelCredentials | None = None) -> None:
        """Wait until ServerReady (or only ServerLive, with models_ready=False) answers true
        (over TLS with ``credentials``)."""
        from shmserve.protos import shmserve_service_pb2 as pb
        deadline = time.monotonic() + timeout
        method = "ServerReady" if models_ready else "ServerLive"
        response_type = pb.ServerReadyResponse if models_ready else pb.ServerLiveResponse
        with (grpc.insecure_channel(self.url) if credentials is None
              else grpc.secure_channel(self.url, credentials)) as channel:
            call = channel.unary_unary(f"/inference.GRPCInferenceService/{method}",
                                       request_serializer=lambda m: m.SerializeToString(),
                                       response_deserializer=response_type.FromString)
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"server exited with {self.process.returncode}:\n"
                                       f"{self.log()}")
                try:
                    answer = call(pb.ServerReadyRequest() if models_ready
                                  else pb.ServerLiveRequest(), timeout=1.0)
                    if getattr(answer, "ready", getattr(answer, "live", False)):
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.05)
        raise TimeoutError(f"server not ready after {timeout}s:\n{self.log()}")

    def wait_started(self, timeout: float = 60.0) -> None:
        """Wait until start-up loading finished, whatever its outcome (a server with
        --exit-on-error=false and a failed model stays unready while strict)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if READY_LINE in self.log():
                return
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n"
                                   f"{self.log()}")
            time.sleep(0.05)
        raise TimeoutError(f"server did not finish starting after {timeout}s:\n{self.log()}")

    def stop(self, timeout: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self._log.close()
        return self.process.returncode

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def child_pids(pid: int) -> list[int]:
    children: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            children.append(int(entry))
    return children


FRONTEND_COMM = "shmserve-fe"  # a gRPC frontend process's short name (--grpc-frontends)


def is_frontend(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/comm") as comm:
            return comm.read().startswith(FRONTEND_COMM)
    except OSError:
        return False


def worker_pids(server_pid: int) -> list[int]:
    """Workers are children of the server's fork server (a child of the server), as are its
    gRPC frontend processes (not counted)."""
    return sorted(pid for fork_server in child_pids(server_pid) for pid in child_pids(fork_server)
                  if not is_frontend(pid))


def frontend_pids(server_pid: int) -> list[int]:
    """The server's gRPC frontend processes (--grpc-frontends N > 1)."""
    return sorted(pid for fork_server in child_pids(server_pid) for pid in child_pids(fork_server)
                  if is_frontend(pid))


def thread_io(pid: int) -> dict[int, tuple[int, int]]:
    """(rchar, wchar) of each thread of ``pid``: bytes its read/write-like syscalls moved."""
    moved = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            fields = dict(line.split(": ") for line in
                          Path(f"/proc/{pid}/task/{tid}/io").read_text().splitlines())
        except OSError:
            continue
        moved[int(tid)] = (int(fields["rchar"]), int(fields["wchar"]))
    return moved


def rss_mib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) // 1024
    raise KeyError("VmRSS")


def wait_heap_given_back(pid: int, kept_mib: int, timeout: float = 20.0) -> None:
    """Until the server gave back the heap pages it kept after a large request
    (daemon/heap.py: once idle): its resident set down by ``kept_mib`` from now, or steady
    for a few of the heap's checks (it kept none: with frontend processes, say)."""
    below = rss_mib(pid) - kept_mib
    deadline = time.monotonic() + timeout
    last, steady_since = rss_mib(pid), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.1)
        rss = rss_mib(pid)
        if rss < below:
            return
        if rss != last:
            last, steady_since = rss, time.monotonic()
        elif time.monotonic() - steady_since > 3.0:
            return
