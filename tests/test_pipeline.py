"""Instances take batches ahead (pipeline lanes) and quick models get several requests per
frame: results must stay each request's own, and Triton's one-execute-per-request semantics
for models without dynamic batching must hold."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from shmserve.client import AsyncClient
from shmserve.tests.serverproc import ServerProcess

StartServer = Callable[..., ServerProcess]


async def _many(url: str, transport: str, count: int, concurrency: int,
                make: Callable[[int], dict[str, np.ndarray]], model: str
                ) -> list[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]:
    """``count`` requests, ``concurrency`` at a time; (inputs, outputs) of each."""
    results: list[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]] = []
    async with AsyncClient(url, transport=transport) as client:
        async def worker(first: int) -> None:
            for index in range(first, count, concurrency):
                inputs = make(index)
                results.append((inputs, await client.infer(model, inputs)))

        await asyncio.gather(*(worker(first) for first in range(concurrency)))
    return results


@pytest.mark.parametrize("transport", ["shm", "grpc"])
def test_without_dynamic_batching_every_request_is_its_own_execute(
        start_server: StartServer, transport: str) -> None:
    server = start_server(["exec_probe"])

    def make(index: int) -> dict[str, np.ndarray]:
        return {"INPUT0": np.arange(4, dtype=np.int32).reshape(1, 4) + index}

    total = 400
    results = asyncio.run(_many(server.url, transport, total, 16, make, "exec_probe"))
    assert len(results) == total
    for inputs, outputs in results:
        np.testing.assert_array_equal(outputs["OUTPUT0"], inputs["INPUT0"])
        assert outputs["REQUESTS"].tolist() == [[1]]
    with grpcclient.InferenceServerClient(server.url) as triton:
        stats = triton.get_inference_statistics("exec_probe").model_stats[0]
    assert stats.inference_count == total and stats.execution_count == total
    assert [batch.batch_size for batch in stats.batch_stats] == [1]
    assert stats.inference_stats.success.count == total


@pytest.mark.parametrize("depth", ["1", "3"])
@pytest.mark.parametrize("transport", ["shm", "grpc"])
def test_concurrent_large_payloads_keep_their_own_bytes(
        start_server: StartServer, depth: str, transport: str) -> None:
    """Inputs and outputs above the inline limit go through the instance's arenas; a batch
    sent ahead has its own lane, so it never overwrites one that runs or is read back."""
    server = start_server(["identity_fp32"], "--pipeline-depth", depth)
    size = 48 * 1024  # 192 KiB of float32: staged in the arenas both ways

    def make(index: int) -> dict[str, np.ndarray]:
        return {"INPUT0": np.full(size, index, dtype=np.float32)}

    results = asyncio.run(_many(server.url, transport, 120, 8, make, "identity_fp32"))
    assert len(results) == 120
    for inputs, outputs in results:
        np.testing.assert_array_equal(outputs["OUTPUT0"], inputs["INPUT0"])
