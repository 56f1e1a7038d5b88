"""shmserve.client's stream_infer on decoupled models (many answers per request), through gRPC
and through the local channel, with the sync and the async client."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from shmserve.client import AsyncClient, Client, StreamRequest, StreamResult
from shmserve.tests.conftest import assert_no_arenas
from shmserve.tests.serverproc import ServerProcess, build_repository

MODELS = ["repeat_ms", "square_int32", "midstream_error"]
DOORS = ["grpc", "local"]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, Path]]:
    base = tmp_path_factory.mktemp("streaming_client")
    socket_path = base / "shmserve.sock"
    server = ServerProcess(build_repository(base / "repo", MODELS),
                           "--local-socket", str(socket_path))
    server.wait_ready()
    yield server, socket_path
    assert server.stop() == 0, server.log()
    assert_no_arenas(server.pid)


def _url(server: tuple[ServerProcess, Path], door: str) -> str:
    return server[0].url if door == "grpc" else f"local://{server[1]}"


def _requests() -> list[StreamRequest]:
    return [StreamRequest({"IN": np.array([3], dtype=np.int32)}, request_id="three"),
            StreamRequest({"IN": np.array([0], dtype=np.int32)}, request_id="zero",
                          parameters={"triton_enable_empty_final_response": True}),
            StreamRequest({"IN": np.array([2], dtype=np.int32)}, request_id="two")]


def _check(results: list[StreamResult]) -> None:
    by_id: dict[str, list[StreamResult]] = {}
    for result in results:
        assert result.error is None, result.error
        by_id.setdefault(result.request_id, []).append(result)
    three, zero, two = by_id["three"], by_id["zero"], by_id["two"]
    assert [r.outputs["OUT"].tolist() for r in three] == [[3]] * 3
    assert [r.outputs["OUT"].tolist() for r in two] == [[2]] * 2
    assert [r.index for r in three] == [0] * 3 and [r.index for r in two] == [2] * 2
    assert [r.final for r in three + two] == [False] * 5  # no empty final asked for
    assert len(zero) == 1 and zero[0].final and zero[0].outputs == {} and zero[0].index == 1


@pytest.mark.parametrize("door", DOORS)
def test_sync_stream_infer_yields_every_response(server: tuple[ServerProcess, Path],
                                                 door: str) -> None:
    with Client(_url(server, door)) as client:
        results = list(client.stream_infer("square_int32", _requests(), timeout=30))
    _check(results)


@pytest.mark.parametrize("door", DOORS)
def test_async_stream_infer_yields_every_response(server: tuple[ServerProcess, Path],
                                                  door: str) -> None:
    async def run() -> list[StreamResult]:
        async with AsyncClient(_url(server, door)) as client:
            return [result async for result in
                    client.stream_infer("square_int32", _requests(), timeout=30)]
    _check(asyncio.run(run()))


@pytest.mark.parametrize("door", DOORS)
def test_error_mid_stream_comes_as_a_result(server: tuple[ServerProcess, Path],
                                            door: str) -> None:
    with Client(_url(server, door)) as client:
        results = list(client.stream_infer(
            "midstream_error", [{"IN": np.array([5], dtype=np.int32)}], timeout=30))
    assert [r.error is None for r in results] == [True, False, True, False]
    assert results[1].error is not None and "midstream failure" in results[1].error.message
    assert [r.final for r in results] == [False, False, False, True]
    assert all(r.index == 0 for r in results)


@pytest.mark.parametrize("door", DOORS)
@pytest.mark.parametrize("use_async", [False, True])
def test_closing_the_stream_early_cancels_for_the_model(server: tuple[ServerProcess, Path],
                                                        door: str, use_async: bool,
                                                        tmp_path: Path) -> None:
    cancel_log = tmp_path / "cancelled.txt"
    request = StreamRequest({"IN": np.arange(100, dtype=np.int32),
                             "DELAY_MS": np.array([50], dtype=np.int32)},
                            parameters={"cancel_log": str(cancel_log)})

    def seen_by_model() -> bool:
        """While the client stays connected (closing it would cancel everything anyway)."""
        deadline = time.monotonic() + 10
        while not cancel_log.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        return cancel_log.exists() and int(cancel_log.read_text().split()[-1]) < 50

    def sync_run() -> tuple[StreamResult, bool]:
        with Client(_url(server, door)) as client:
            results = client.stream_infer("repeat_ms", [request], timeout=30)
            first = next(results)
            results.close()
            return first, seen_by_model()

    async def async_run() -> tuple[StreamResult, bool]:
        async with AsyncClient(_url(server, door)) as client:
            results = client.stream_infer("repeat_ms", [request], timeout=30)
            first = await anext(results)
            await results.aclose()
            return first, await asyncio.to_thread(seen_by_model)

    first, seen = asyncio.run(async_run()) if use_async else sync_run()
    assert first.outputs["IDX"].tolist() == [0] and not first.final
    assert seen, "the model did not see the request cancelled"
