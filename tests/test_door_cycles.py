"""Answered requests are freed by reference counting, whichever door they came through.

A request and its reply point at each other; a door that keeps its side after answering
leaves one cycle per request for the garbage collector (≈ 7 µs a request in the HTTP door's
profile, docs/performance.md). The server here runs with the collector off and counts, at
exit, the InferRequest objects still alive.
"""

from __future__ import annotations

import queue
import textwrap
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from shmserve.client import Client
from shmserve.tests.serverproc import ServerProcess, build_repository

DATA = np.arange(16, dtype=np.int32).reshape(1, 16)
REQUESTS = 10

# Run inside the server (Python imports sitecustomize at start-up): the supervisor collects
# no garbage, and counts at exit the InferRequest objects still alive.
_COUNT_AT_EXIT = textwrap.dedent("""
    import atexit, gc, os, sys
    if sys.argv[1:2] == ["serve"]:
        gc.disable()

        def _count() -> None:
            from shmserve.daemon.request import InferRequest
            live = sum(1 for item in gc.get_objects() if isinstance(item, InferRequest))
            with open(os.environ["SHMSERVE_TEST_LIVE_REQUESTS"], "w") as out:
                out.write(str(live))

        atexit.register(_count)
""")


def _http(server: ServerProcess) -> None:
    with httpclient.InferenceServerClient(server.http_url) as client:
        for binary in (True, False) * (REQUESTS // 2):
            inputs = [httpclient.InferInput(name, [1, 16], "INT32")
                      for name in ("INPUT0", "INPUT1")]
            for tensor in inputs:
                tensor.set_data_from_numpy(DATA, binary_data=binary)
            outputs = [httpclient.InferRequestedOutput(name, binary_data=binary)
                       for name in ("OUTPUT0", "OUTPUT1")]
            result = client.infer("simple", inputs, outputs=outputs)
            assert (result.as_numpy("OUTPUT0") == DATA * 2).all()


def _grpc_inputs() -> list[grpcclient.InferInput]:
    inputs = [grpcclient.InferInput(name, [1, 16], "INT32") for name in ("INPUT0", "INPUT1")]
    for tensor in inputs:
        tensor.set_data_from_numpy(DATA)
    return inputs


def _grpc_unary(server: ServerProcess) -> None:
    with grpcclient.InferenceServerClient(server.url) as client:
        for _ in range(REQUESTS):
            result = client.infer("simple", _grpc_inputs())
            assert (result.as_numpy("OUTPUT0") == DATA * 2).all()


def _grpc_stream(server: ServerProcess) -> None:
    answers: queue.Queue[object] = queue.Queue()
    with grpcclient.InferenceServerClient(server.url) as client:
        client.start_stream(lambda result, error: answers.put(error or result))
        for _ in range(REQUESTS):
            client.async_stream_infer("simple", _grpc_inputs())
        for _ in range(REQUESTS):
            result = answers.get(timeout=30)
            assert isinstance(result, grpcclient.InferResult), result
            assert (result.as_numpy("OUTPUT0") == DATA * 2).all()
        client.stop_stream()


def _local(server: ServerProcess) -> None:
    with Client(f"local://{server.repository.parent / 'door.sock'}") as client:
        for _ in range(REQUESTS):
            outputs = client.infer("simple", {"INPUT0": DATA, "INPUT1": DATA})
            assert (outputs["OUTPUT0"] == DATA * 2).all()


@pytest.mark.parametrize("door", [_http, _grpc_unary, _grpc_stream, _local],
                         ids=["http", "grpc", "grpc-stream", "local"])
def test_answered_requests_leave_no_cycles(door: Callable[[ServerProcess], None],
                                           tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_COUNT_AT_EXIT)
    counted = tmp_path / "live-requests"
    monkeypatch.setenv("PYTHONPATH", str(site))
    monkeypatch.setenv("SHMSERVE_TEST_LIVE_REQUESTS", str(counted))
    repo = build_repository(tmp_path / "repo", ["simple"])
    with ServerProcess(repo, "--local-socket", str(tmp_path / "door.sock")) as server:
        server.wait_ready()
        door(server)
        assert server.stop() == 0
    # Left to the (here disabled) garbage collector, all of them would still be alive.
    assert counted.read_text() == "0"
