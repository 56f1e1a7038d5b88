"""One copy per direction for payload tensors in the supervisor (issue 18 item 4).

Measured as the pages the supervisor touches: a fresh copy of a 64 MiB tensor faults in its
16,384 pages (large buffers are fresh mmaps), while the arenas are read and written with
preadv/pwrite and fault in nothing here. Answering a 64 MiB output over gRPC takes two
copies' worth: ours, from the worker's output arena straight into the response message, and
gRPC's own copy of the message. Receiving a 64 MiB input takes what gRPC's receive path
costs (three copies' worth in grpcio 1.85) and nothing of ours: it is written from gRPC's
buffer into the input arena.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from shmserve.tests.serverproc import (
    ServerProcess,
    frontend_pids,
    thread_io,
    wait_heap_given_back,
)

MIB = 1 << 20
PAYLOAD = 64 * MIB
PAGES = PAYLOAD // 4096
CHANNEL_ARGS = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]

MODEL_PY = '''
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            data = pb_utils.get_input_tensor_by_name(request, "IN").as_numpy()
            size = int(pb_utils.get_input_tensor_by_name(request, "SIZE").as_numpy()[0])
            out = np.full(size, 7, dtype=np.uint8)
            responses.append(pb_utils.InferenceResponse([
                pb_utils.Tensor("OUT", out),
                pb_utils.Tensor("LEN", np.array([data.size], dtype=np.int64))]))
        return responses
'''

CONFIG = '''
name: "sized"
backend: "python"
max_batch_size: 0
input [ { name: "IN", data_type: TYPE_UINT8, dims: [ -1 ] },
        { name: "SIZE", data_type: TYPE_INT32, dims: [ 1 ] } ]
output [ { name: "OUT", data_type: TYPE_UINT8, dims: [ -1 ] },
         { name: "LEN", data_type: TYPE_INT64, dims: [ 1 ] } ]
instance_group [ { count: 1, kind: KIND_CPU } ]
'''


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    tmp_path = tmp_path_factory.mktemp("copies")
    model = tmp_path / "repo" / "sized"
    (model / "1").mkdir(parents=True)
    (model / "config.pbtxt").write_text(CONFIG)
    (model / "1" / "model.py").write_text(MODEL_PY)
    with ServerProcess(tmp_path / "repo", "--arena-idle-secs", "0") as process:
        process.wait_ready()
        yield process


def _minor_faults(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as stat:
        return int(stat.read().rsplit(")", 1)[1].split()[7])


def _infer(client: grpcclient.InferenceServerClient, input_bytes: int, output_bytes: int
           ) -> None:
    data = grpcclient.InferInput("IN", [input_bytes], "UINT8")
    data.set_data_from_numpy(np.ones(input_bytes, dtype=np.uint8))
    size = grpcclient.InferInput("SIZE", [1], "INT32")
    size.set_data_from_numpy(np.array([output_bytes], dtype=np.int32))
    result = client.infer("sized", [data, size], client_timeout=120)
    out, length = result.as_numpy("OUT"), result.as_numpy("LEN")
    assert out is not None and length is not None
    assert out.size == output_bytes and length[0] == input_bytes
    if output_bytes:
        assert out[0] == 7 and out[-1] == 7


def _pages_touched(server: ServerProcess, client: grpcclient.InferenceServerClient,
                   input_bytes: int, output_bytes: int) -> int:
    _infer(client, input_bytes, output_bytes)  # arenas grown, code paths warm
    # Freed buffers are kept for the next request until idle (daemon/heap.py): from given
    # back pages, each buffer of the next request is counted.
    wait_heap_given_back(server.pid, PAYLOAD // MIB // 2)
    before = _minor_faults(server.pid)
    _infer(client, input_bytes, output_bytes)
    return _minor_faults(server.pid) - before


def test_a_large_output_is_copied_once_by_the_supervisor(server: ServerProcess) -> None:
    with grpcclient.InferenceServerClient(server.url, channel_args=CHANNEL_ARGS) as client:
        touched = _pages_touched(server, client, 16, PAYLOAD)
    # Ours + gRPC's: 2 x 16,384 pages; a copy more would be 3 x.
    assert touched < 2.5 * PAGES, f"{touched} pages touched for a {PAGES}-page output"


def test_a_large_input_is_not_copied_by_the_supervisor(server: ServerProcess) -> None:
    with grpcclient.InferenceServerClient(server.url, channel_args=CHANNEL_ARGS) as client:
        touched = _pages_touched(server, client, PAYLOAD, 16)
    # gRPC's receive path only: grpcio 1.85 holds its slices, a bytes per slice and their
    # join (3 x, docs/performance.md); a copy of ours would add 16,384 pages more.
    assert touched < 3.5 * PAGES, f"{touched} pages touched for a {PAGES}-page input"


def test_large_copies_run_off_the_event_loop(server: ServerProcess) -> None:
    """The supervisor's loop runs on its main thread; the copies of a large input into the
    arena (pwrite) and of a large output out of it (preadv) are made by other threads."""
    with grpcclient.InferenceServerClient(server.url, channel_args=CHANNEL_ARGS) as client:
        _infer(client, PAYLOAD, PAYLOAD)  # threads started, arenas grown
        before = thread_io(server.pid)
        _infer(client, PAYLOAD, PAYLOAD)
        after = thread_io(server.pid)
    moved = {tid: (read - before.get(tid, (0, 0))[0], written - before.get(tid, (0, 0))[1])
             for tid, (read, written) in after.items()}
    loop_read, loop_written = moved.pop(server.pid)
    assert loop_written < PAYLOAD // 2, f"the loop thread wrote {loop_written} bytes"
    assert loop_read < PAYLOAD // 2, f"the loop thread read {loop_read} bytes"
    if not frontend_pids(server.pid):  # (else a frontend wrote the input into a memfd)
        assert max(written for _, written in moved.values()) >= PAYLOAD, moved
    assert max(read for read, _ in moved.values()) >= PAYLOAD, moved


def test_a_large_binary_http_input_is_copied_once(server: ServerProcess) -> None:
    """Over HTTP the body stays in the chunks aiohttp received it in (aiohttp's copy of
    the socket's bytes); the tensor goes from them into the arena, never through a joined
    buffer of ours."""
    import tritonclient.http as httpclient

    def infer(client: httpclient.InferenceServerClient) -> None:
        data = httpclient.InferInput("IN", [PAYLOAD], "UINT8")
        data.set_data_from_numpy(np.ones(PAYLOAD, dtype=np.uint8), binary_data=True)
        size = httpclient.InferInput("SIZE", [1], "INT32")
        size.set_data_from_numpy(np.array([16], dtype=np.int32), binary_data=True)
        result = client.infer("sized", [data, size])
        length = result.as_numpy("LEN")
        assert length is not None and length[0] == PAYLOAD

    with httpclient.InferenceServerClient(server.http_url, network_timeout=120) as client:
        infer(client)
        wait_heap_given_back(server.pid, PAYLOAD // MIB // 2)
        before = _minor_faults(server.pid)
        infer(client)
        touched = _minor_faults(server.pid) - before
    # aiohttp's chunks: 1 x; a joined body of ours would be 2 x.
    assert touched < 1.5 * PAGES, f"{touched} pages touched for a {PAGES}-page HTTP input"


def test_pieces_slice_and_write_like_their_join() -> None:
    from shmserve.workers.shm import Arena, Pieces

    chunks = [bytes([n]) * size for n, size in enumerate((3, 1, 5000, 7, 2 * MIB + 5))]
    joined = b"".join(chunks)
    pieces = Pieces([memoryview(chunk) for chunk in chunks])
    assert len(pieces) == len(joined) and bytes(pieces) == joined
    for start, stop in ((0, 3), (1, 2), (2, 4), (3, 5004), (0, len(joined)), (5010, 5011),
                        (4, 2 * MIB)):
        part = pieces.slice(start, stop)
        assert bytes(part) == joined[start:stop], (start, stop)
        assert isinstance(part, memoryview) == ((start, stop) in ((0, 3), (1, 2), (5010, 5011)))
    arena = Arena(os.getpid(), "piecestest")
    try:
        segment = arena.ensure(len(joined) + 64)
        segment.write(64, pieces)  # pwritev through the descriptor
        assert segment.read(64, len(joined)) == joined
    finally:
        arena.close()


def test_answers_prepared_off_the_loop_arrive_whole(server: ServerProcess) -> None:
    """Outputs large enough to be copied by a thread: unary and streamed, next to small ones."""
    import queue

    size = 8 * MIB
    with grpcclient.InferenceServerClient(server.url, channel_args=CHANNEL_ARGS) as client:
        results: queue.Queue[Any] = queue.Queue()
        client.start_stream(callback=lambda result, error: results.put(error or result))
        try:
            for output_bytes in (size, 16, size + 1):
                data = grpcclient.InferInput("IN", [3], "UINT8")
                data.set_data_from_numpy(np.ones(3, dtype=np.uint8))
                count = grpcclient.InferInput("SIZE", [1], "INT32")
                count.set_data_from_numpy(np.array([output_bytes], dtype=np.int32))
                client.async_stream_infer("sized", [data, count])
                answer = results.get(timeout=60)
                assert not isinstance(answer, Exception), answer
                out = answer.as_numpy("OUT")
                assert out.size == output_bytes and (out == 7).all()
                _infer(client, 3, output_bytes)
        finally:
            client.stop_stream()
