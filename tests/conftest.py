"""Fixtures: real shmserve servers on loopback, checked for leaked shared memory."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from shmserve.tests.serverproc import ServerProcess, arena_segments, build_repository

EXAMPLE_MODELS = ["simple", "identity_fp32", "string_upper"]


def _has_cuda() -> bool:
    gpus = "/proc/driver/nvidia/gpus"
    return os.path.isdir(gpus) and bool(os.listdir(gpus))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none on this host")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def assert_no_arenas(pid: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while arena_segments(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert arena_segments(pid) == [], "server left arena segments in /dev/shm"


StartServer = Callable[..., ServerProcess]


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[StartServer]:
    """Start servers on a repository made of the named models; all stopped at teardown."""
    started: list[ServerProcess] = []

    def start(models: list[str] | None = None, *extra: str, repository: Path | None = None,
              wait: bool = True) -> ServerProcess:
        repo = repository or build_repository(tmp_path / f"repo{len(started)}",
                                              models or EXAMPLE_MODELS)
        server = ServerProcess(repo, *extra)
        started.append(server)
        if wait:
            server.wait_ready()
        return server

    yield start
    for server in started:
        server.stop()
        assert_no_arenas(server.pid)


#: The gRPC suite's module servers run twice: the supervisor serving gRPC itself, and two
#: frontend processes (--grpc-frontends 2) forwarding to it.
GRPC_FRONTENDS = [1, 2]


def frontends_id(count: int) -> str:
    return f"{count}frontend" + ("s" if count > 1 else "")


def serve_models(tmp_path_factory: pytest.TempPathFactory,
                 models: list[str], frontends: int = 1) -> Iterator[ServerProcess]:
    """Body of a module-scoped server fixture: start, yield, stop cleanly, no leaked arenas."""
    repo = build_repository(tmp_path_factory.mktemp("server") / "repo", models)
    server = ServerProcess(repo, "--grpc-frontends", str(frontends))
    server.wait_ready()
    yield server
    code = server.stop()
    assert code == 0, server.log()
    assert_no_arenas(server.pid)


@pytest.fixture(scope="module")
def example_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server on the example models, shared by a module's read-mostly tests."""
    yield from serve_models(tmp_path_factory, EXAMPLE_MODELS)
