"""Start the reference Triton 2.51 (CPU, python backend) on a model repository of our choosing.

The binary comes from ../shared/peers/setup_triton.sh, which unpacks it under
``$ANCHORS`` (default ``~/.cache/shmserve-anchors``). Benches use this to serve the *same*
python-backend models on Triton and on shmserve in one run. Nothing here is part of the
product; without the peer installed, :func:`available` is False and benches skip Triton.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from types import TracebackType


def anchors_dir() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "shmserve-anchors"
    return Path(os.environ.get("ANCHORS", default))


def _binary() -> Path:
    return anchors_dir() / "tritonserver" / "bin" / "tritonserver"


def available() -> bool:
    return _binary().is_file()


def perf_analyzer() -> str | None:
    path = os.environ.get("PERF_ANALYZER") or str(anchors_dir() / "bin" / "perf_analyzer")
    return path if Path(path).is_file() else None


class TritonPeer:
    """``with TritonPeer(repo) as triton: triton.grpc_url`` — a tritonserver child process.

    The repository is copied so Triton's python stub never writes __pycache__ into ours.
    """

    def __init__(self, repository: Path, *, grpc_port: int = 18001, http_port: int = 18000,
                 extra_args: tuple[str, ...] = (), ready_timeout_s: float = 180.0) -> None:
        self.repository = repository
        self.grpc_url = f"127.0.0.1:{grpc_port}"
        self.http_url = f"127.0.0.1:{http_port}"
        self._ports = (grpc_port, http_port)
        self._extra = extra_args
        self._ready_timeout_s = ready_timeout_s
        self._workdir: tempfile.TemporaryDirectory[str] | None = None
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> TritonPeer:
        if not available():
            raise RuntimeError(f"Triton peer not installed at {_binary()} "
                               "(run ../shared/peers/setup_triton.sh)")
        anchors = anchors_dir()
        self._workdir = tempfile.TemporaryDirectory(prefix="triton-peer-")
        repo = Path(self._workdir.name) / "repo"
        shutil.copytree(self.repository, repo,
                        ignore=shutil.ignore_patterns("__pycache__"))
        libs = (anchors / "tritonserver" / "LD_LIBRARY_PATH").read_text().strip()
        env = dict(os.environ)
        env["LD_LIBRARY_PATH"] = ":".join(filter(None, [libs, env.get("LD_LIBRARY_PATH")]))
        # The python backend stub finds its interpreter through the venv's python3 on PATH.
        env["PATH"] = f"{anchors / 'venv-triton' / 'bin'}:{env.get('PATH', '')}"
        log = open(Path(self._workdir.name) / "triton.log", "wb")
        grpc_port, http_port = self._ports
        self.process = subprocess.Popen(
            [str(_binary()), f"--model-repository={repo}",
             f"--backend-directory={anchors / 'tritonserver' / 'backends'}",
             f"--cache-directory={anchors / 'tritonserver' / 'caches'}",
             "--http-address=127.0.0.1", "--grpc-address=127.0.0.1",
             f"--http-port={http_port}", f"--grpc-port={grpc_port}",
             "--allow-metrics=false", "--allow-gpu-metrics=false", *self._extra],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        log.close()
        try:
            self._wait_ready()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _wait_ready(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + self._ready_timeout_s
        url = f"http://{self.http_url}/v2/health/ready"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"tritonserver exited {self.process.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        raise RuntimeError(
            f"tritonserver not ready after {self._ready_timeout_s} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        if self._workdir is None:
            return ""
        path = Path(self._workdir.name) / "triton.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        if self._workdir is not None:
            self._workdir.cleanup()
            self._workdir = None
