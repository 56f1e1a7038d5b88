"""Streamed outputs written straight into the client's region (issue 15 item 3):
``stream_infer(..., ring=ResponseRing(region, slots, slot_bytes))`` through gRPC and
``local://``, sync and async, against a real server. The bytes land in the ring (the
supervisor's syscalls move far less than the outputs), and a slot is never reused before the
caller moved past its response (a slow reader pauses the model instead of losing data)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from shmserve.client import AsyncClient, Client, ResponseRing, StreamResult
from shmserve.tests.serverproc import ServerProcess, build_repository

ELEMENTS = 100_000  # 400 KB per response, far above the inline limit
COUNT = 8


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, str]]:
    base = tmp_path_factory.mktemp("ring")
    repo = build_repository(base / "repo", ["fill_stream", "repeat_ms"])
    proc = ServerProcess(repo, "--local-socket", str(base / "shmserve.sock"))
    proc.wait_ready()
    yield proc, f"local://{base / 'shmserve.sock'}"
    assert proc.stop() == 0, proc.log()


@pytest.fixture(scope="module")
def two_frontends(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """gRPC served by two frontend processes: the ring's parameters cross a process."""
    repo = build_repository(tmp_path_factory.mktemp("ring2") / "repo", ["fill_stream"])
    proc = ServerProcess(repo, "--grpc-frontends", "2")
    proc.wait_ready()
    yield proc
    assert proc.stop() == 0, proc.log()


def _url(server: tuple[ServerProcess, str], door: str) -> str:
    return server[1] if door == "local" else server[0].url


def _io_bytes(pid: int) -> int:
    """Bytes the process moved through read/write-like syscalls (sockets included)."""
    fields = dict(line.split(": ") for line in
                  Path(f"/proc/{pid}/io").read_text().splitlines())
    return int(fields["rchar"]) + int(fields["wchar"])


def _request(count: int = COUNT, elements: int = ELEMENTS) -> dict[str, np.ndarray]:
    return {"COUNT": np.array([count], np.int32), "ELEMENTS": np.array([elements], np.int32)}


def _check(result: StreamResult, ring: ResponseRing, index: int) -> None:
    """Response ``index`` is in its slot, intact."""
    assert result.error is None, result.error
    assert result.ring_slot == index % ring.slots
    out = result.outputs["OUT"]
    assert out.shape == (ELEMENTS,) and (out == index).all(), (index, out[:4])
    assert np.shares_memory(out, ring.memory)  # a view of the ring, not of a message
    assert int(result.outputs["IDX"][0]) == index
    # BYTES outputs cannot be placed (size unknown from the shape): they come in the response.
    assert result.outputs["TEXT"].tolist() == [f"response {index}".encode()]
    assert not np.shares_memory(result.outputs["TEXT"], ring.memory)


@pytest.mark.parametrize("door", ["grpc", "local"])
def test_stream_outputs_land_in_the_ring_sync(server: tuple[ServerProcess, str],
                                              door: str) -> None:
    slot_bytes = ELEMENTS * 4 + 64 * 2
    with Client(_url(server, door)) as client, \
            client.shared_memory(64 + 3 * slot_bytes + 4096) as region:
        ring = ResponseRing(region, slots=3, slot_bytes=slot_bytes)
        list(client.stream_infer("fill_stream", [_request(1)], ring=ring))  # warm
        moved = _io_bytes(server[0].pid)
        results = []
        for index, result in enumerate(client.stream_infer("fill_stream", [_request()],
                                                           ring=ring)):
            _check(result, ring, index)
            if index % 3 == 0:
                time.sleep(0.15)  # a slow reader: the model waits for the slot ...
            _check(result, ring, index)  # ... so what we hold is never overwritten
            results.append(result)
        moved = _io_bytes(server[0].pid) - moved
    assert len(results) == COUNT
    # 8 x 400 KB of outputs; the supervisor moved only the responses' metadata.
    assert moved < (COUNT * ELEMENTS * 4) // 8, f"the supervisor moved {moved} bytes"


@pytest.mark.parametrize("door", ["grpc", "local"])
def test_stream_outputs_land_in_the_ring_async(server: tuple[ServerProcess, str],
                                               door: str) -> None:
    slot_bytes = ELEMENTS * 4 + 64 * 2

    async def run() -> int:
        async with AsyncClient(_url(server, door)) as client:
            async with client.shared_memory(64 + 2 * slot_bytes + 4096) as region:
                ring = ResponseRing(region, slots=2, slot_bytes=slot_bytes)
                seen = 0
                # Two requests take turns on the ring, each from slot 0.
                async for result in client.stream_infer(
                        "fill_stream", [_request(3), _request(COUNT)], ring=ring):
                    index = int(result.outputs["IDX"][0])
                    _check(result, ring, index)
                    await asyncio.sleep(0.05)
                    _check(result, ring, index)
                    seen += 1
                return seen

    assert asyncio.run(run()) == 3 + COUNT


def test_outputs_larger_than_a_slot_are_an_error_response(
        server: tuple[ServerProcess, str]) -> None:
    with Client(_url(server, "local")) as client, client.shared_memory(1 << 16) as region:
        ring = ResponseRing(region, slots=2, slot_bytes=1024)
        results = list(client.stream_infer("fill_stream", [_request(1, 1000)], ring=ring))
    assert len(results) == 1 and results[0].error is not None
    assert "more than the response ring's slots of 1024 bytes" in results[0].error.message


def test_cancelling_a_stream_stops_a_model_waiting_for_a_slot(
        server: tuple[ServerProcess, str]) -> None:
    """The model is blocked on a full ring; closing the stream cancels it, and the
    instance serves the next request at once."""
    slot_bytes = ELEMENTS * 4 + 128
    with Client(_url(server, "local")) as client, \
            client.shared_memory(64 + 2 * slot_bytes + 4096) as region:
        ring = ResponseRing(region, slots=2, slot_bytes=slot_bytes)
        stream = client.stream_infer("fill_stream", [_request(1000)], ring=ring)
        next(stream)
        time.sleep(0.2)  # the model filled the ring and waits
        stream.close()
        started = time.monotonic()
        results = list(client.stream_infer("fill_stream", [_request(2)], ring=ring))
        assert time.monotonic() - started < 5
    assert [int(r.outputs["IDX"][0]) for r in results] == [0, 1]


@pytest.mark.parametrize("frontends", [1, 2])
def test_tritonclient_reads_ring_responses_by_their_shm_parameters(
        request: pytest.FixtureRequest, frontends: int) -> None:
    """An independent client: tritonclient names the ring with the request parameters and
    finds each response's tensors by the output's shm parameters, in its own system region
    (also when a frontend process took the call and the core placed the outputs)."""
    import queue

    url = request.getfixturevalue("server")[0].url if frontends == 1 else \
        request.getfixturevalue("two_frontends").url

    import tritonclient.grpc as grpcclient
    import tritonclient.utils.shared_memory as shm

    slots, slot_bytes, elements = 2, 4096, 8
    handle = shm.create_shared_memory_region("ring", "/shmserve_test_ring_tc",
                                             64 + slots * slot_bytes)
    results: queue.Queue[object] = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    try:
        client.register_system_shared_memory("ring", "/shmserve_test_ring_tc",
                                             64 + slots * slot_bytes)
        inputs = [grpcclient.InferInput("COUNT", [1], "INT32"),
                  grpcclient.InferInput("ELEMENTS", [1], "INT32")]
        inputs[0].set_data_from_numpy(np.array([2], np.int32))
        inputs[1].set_data_from_numpy(np.array([elements], np.int32))
        client.start_stream(callback=lambda result, error: results.put(
            error if error is not None else result))
        client.async_stream_infer("fill_stream", inputs, parameters={
            "shmserve_response_ring_region": "ring", "shmserve_response_ring_offset": 0,
            "shmserve_response_ring_slot_bytes": slot_bytes,
            "shmserve_response_ring_slots": slots})
        seen = []
        for index in range(2):
            result = results.get(timeout=20)
            response = result.get_response()  # type: ignore[attr-defined]
            names = [o.name for o in response.outputs]
            out = next(o for o in response.outputs if o.name == "OUT")
            assert not response.raw_output_contents[names.index("OUT")]  # not in the message
            assert out.parameters["shared_memory_region"].string_param == "ring"
            offset = out.parameters["shared_memory_offset"].int64_param
            assert offset == 64 + index * slot_bytes
            assert out.parameters["shared_memory_byte_size"].int64_param == elements * 4
            seen.append(shm.get_contents_as_numpy(handle, np.int32, [elements], offset).copy())
            # Done with it: the header's count lets the model reuse the slot.
            shm.set_shared_memory_region(handle, [np.array([index + 1], np.uint64)])
        client.stop_stream()
        client.unregister_system_shared_memory("ring")
    finally:
        client.close()
        shm.destroy_shared_memory_region(handle)
    assert [s.tolist() for s in seen] == [[0] * elements, [1] * elements]
