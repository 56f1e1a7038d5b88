"""Decoupled python-backend models and gRPC ModelStreamInfer, through tritonclient's streaming
API against a real server: many responses per request, errors mid-stream, responses sent after
execute returned, cancellation seen by the model, a worker killed mid-stream, drain."""

from __future__ import annotations

import http.client
import json
import os
import queue
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from shmserve.tests.conftest import GRPC_FRONTENDS, StartServer, frontends_id, serve_models
from shmserve.tests.serverproc import ServerProcess, worker_pids

MODELS = ["repeat_ms", "square_int32", "midstream_error", "simple", "threaded_sends"]
FINAL = "triton_final_response"


@pytest.fixture(scope="module", params=GRPC_FRONTENDS, ids=frontends_id)
def server(tmp_path_factory: pytest.TempPathFactory,
           request: pytest.FixtureRequest) -> Iterator[ServerProcess]:
    yield from serve_models(tmp_path_factory, MODELS, request.param)


class Stream:
    """tritonclient's stream, with its callbacks' results in a queue."""

    def __init__(self, url: str, **options: Any) -> None:
        self.client = grpcclient.InferenceServerClient(url)
        self.results: queue.Queue[Any] = queue.Queue()
        self.client.start_stream(callback=lambda result, error: self.results.put(
            error if error is not None else result), **options)

    def get(self, timeout: float = 20.0) -> Any:
        return self.results.get(timeout=timeout)

    def close(self, cancel: bool = False) -> None:
        self.client.stop_stream(cancel_requests=cancel)
        self.client.close()


def _final(result: Any) -> bool:
    return result.get_response().parameters[FINAL].bool_param


def _repeat_inputs(values: list[int], delay_ms: int) -> list[grpcclient.InferInput]:
    data = grpcclient.InferInput("IN", [len(values)], "INT32")
    data.set_data_from_numpy(np.array(values, dtype=np.int32))
    delay = grpcclient.InferInput("DELAY_MS", [1], "INT32")
    delay.set_data_from_numpy(np.array([delay_ms], dtype=np.int32))
    return [data, delay]


def _int_input(value: int) -> list[grpcclient.InferInput]:
    tensor = grpcclient.InferInput("IN", [1], "INT32")
    tensor.set_data_from_numpy(np.array([value], dtype=np.int32))
    return [tensor]


def _collect(stream: Stream, request_id: str, finals: int = 1) -> list[Any]:
    """Results until ``finals`` final responses came (other requests' ones included)."""
    got = []
    while finals:
        result = stream.get()
        got.append(result)
        if not isinstance(result, InferenceServerException) and _final(result):
            finals -= 1
    return got


def test_repeat_model_streams_each_response_as_it_is_sent(server: ServerProcess) -> None:
    stream = Stream(server.url)
    try:
        started = time.monotonic()
        stream.client.async_stream_infer("repeat_ms", _repeat_inputs([4, 5, 6], 300),
                                         request_id="r1",
                                         enable_empty_final_response=True)
        first = stream.get()
        first_after = time.monotonic() - started
        rest = _collect(stream, "r1")
    finally:
        stream.close()
    results = [first, *rest]
    assert first_after < 0.6  # the first response did not wait for the other two
    assert [r.as_numpy("OUT").tolist() for r in results[:3]] == [[4], [5], [6]]
    assert [r.as_numpy("IDX").tolist() for r in results[:3]] == [[0], [1], [2]]
    assert all(r.get_response().id == "r1" for r in results)
    assert [_final(r) for r in results] == [False, False, False, True]
    assert results[3].get_response().outputs == []  # the empty final response


def test_without_empty_final_only_the_responses_come(server: ServerProcess) -> None:
    stream = Stream(server.url)
    try:
        stream.client.async_stream_infer("repeat_ms", _repeat_inputs([1, 2], 0),
                                         request_id="a")
        got = [stream.get(), stream.get()]
        with pytest.raises(queue.Empty):
            stream.get(timeout=0.5)
    finally:
        stream.close()
    assert [r.as_numpy("OUT").tolist() for r in got] == [[1], [2]]
    assert [_final(r) for r in got] == [False, False]


def test_square_model_sends_from_a_thread_after_execute_returned(server: ServerProcess
                                                                ) -> None:
    stream = Stream(server.url)
    try:
        for count in (3, 0, 2):
            stream.client.async_stream_infer("square_int32", _int_input(count),
                                             request_id=f"sq{count}",
                                             enable_empty_final_response=True)
        results = _collect(stream, "", finals=3)
    finally:
        stream.close()
    by_id: dict[str, list[Any]] = {}
    for result in results:
        by_id.setdefault(result.get_response().id, []).append(result)
    for count in (3, 0, 2):
        got = by_id[f"sq{count}"]
        assert len(got) == count + 1, got
        assert [r.as_numpy("OUT").tolist() for r in got[:count]] == [[count]] * count
        assert [_final(r) for r in got] == [False] * count + [True]


def test_model_threads_sending_at_once_deliver_every_response_whole(server: ServerProcess,
                                                                    tmp_path: Path) -> None:
    """Eight threads of one request send 80 KB responses at once, then all send a final
    response at the same moment: every response arrives intact, exactly one final, last."""
    threads, count = 8, 12
    stream = Stream(server.url)
    try:
        inputs = []
        for name, value in (("THREADS", threads), ("COUNT", count)):
            tensor = grpcclient.InferInput(name, [1], "INT32")
            tensor.set_data_from_numpy(np.array([value], dtype=np.int32))
            inputs.append(tensor)
        outcomes = tmp_path / "outcomes"
        stream.client.async_stream_infer("threaded_sends", inputs, request_id="t",
                                         parameters={"outcomes": str(outcomes)})
        results = _collect(stream, "t")
        with pytest.raises(queue.Empty):  # nothing after the final response
            stream.get(timeout=0.5)
    finally:
        stream.close()
    assert not any(isinstance(r, InferenceServerException) for r in results), results
    assert len(results) == threads * count + 1
    assert [_final(r) for r in results] == [False] * threads * count + [True]
    seen = []
    for result in results[:-1]:
        out = result.as_numpy("OUT")
        assert out.shape == (20_000,) and (out == out[0]).all()  # no torn or mixed response
        seen.append(int(out[0]))
    assert sorted(seen) == sorted(t * 1000 + i for t in range(threads) for i in range(count))
    final = results[-1].as_numpy("OUT").tolist()
    assert len(final) == 1 and -threads <= final[0] <= -1
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (
            not outcomes.exists() or len(outcomes.read_text().splitlines()) < threads):
        time.sleep(0.05)
    closed = "Unable to send response. Response sender has been closed."
    assert sorted(outcomes.read_text().splitlines()) == [closed] * (threads - 1) + ["sent"]


def test_many_requests_in_flight_on_one_stream(server: ServerProcess) -> None:
    stream = Stream(server.url)
    try:
        for index in range(6):
            stream.client.async_stream_infer("square_int32", _int_input(2),
                                             request_id=f"m{index}",
                                             enable_empty_final_response=True)
        results = _collect(stream, "", finals=6)
    finally:
        stream.close()
    ids = sorted(r.get_response().id for r in results)
    assert ids == sorted([f"m{i}" for i in range(6)] * 3)


def test_error_mid_stream_keeps_the_stream_open(server: ServerProcess) -> None:
    stream = Stream(server.url)
    try:
        stream.client.async_stream_infer("midstream_error", _int_input(7), request_id="e1",
                                         enable_empty_final_response=True)
        got = [stream.get() for _ in range(4)]
        # The stream still serves: another request on it is answered.
        stream.client.async_stream_infer("square_int32", _int_input(1), request_id="after")
        after = stream.get()
    finally:
        stream.close()
    assert got[0].as_numpy("OUT").tolist() == [7]
    assert isinstance(got[1], InferenceServerException)
    assert "midstream failure" in got[1].message()
    assert got[2].as_numpy("OUT").tolist() == [7]
    assert isinstance(got[3], InferenceServerException)
    assert "model gave up" in got[3].message()
    assert after.as_numpy("OUT").tolist() == [1]


def test_non_decoupled_model_on_the_stream_says_final(server: ServerProcess) -> None:
    stream = Stream(server.url)
    try:
        tensors = []
        for name in ("INPUT0", "INPUT1"):
            tensor = grpcclient.InferInput(name, [1, 16], "INT32")
            tensor.set_data_from_numpy(np.arange(16, dtype=np.int32).reshape(1, 16))
            tensors.append(tensor)
        stream.client.async_stream_infer("simple", tensors, request_id="s1")
        result = stream.get()
    finally:
        stream.close()
    assert result.get_response().id == "s1" and _final(result)
    assert result.as_numpy("OUTPUT0").tolist() == [list(range(0, 32, 2))]


def test_unary_infer_on_a_decoupled_model_is_refused(server: ServerProcess) -> None:
    with grpcclient.InferenceServerClient(server.url) as client:
        with pytest.raises(InferenceServerException) as info:
            client.infer("square_int32", _int_input(1))
    assert info.value.status() == "StatusCode.UNIMPLEMENTED"
    assert ("ModelInfer RPC doesn't support models with decoupled transaction policy"
            in info.value.message())


@pytest.mark.parametrize("in_thread", [False, True])
def test_cancelled_stream_is_seen_by_the_model(server: ServerProcess, tmp_path: Path,
                                               in_thread: bool) -> None:
    cancel_log = tmp_path / "cancelled.txt"
    failed_before = _failed(server)
    stream = Stream(server.url)
    inputs = _repeat_inputs(list(range(100)), 50)
    stream.client.async_stream_infer("repeat_ms", inputs, request_id="c1",
                                     parameters={"cancel_log": str(cancel_log),
                                                 "in_thread": in_thread})
    first = stream.get()
    assert first.as_numpy("IDX").tolist() == [0]
    stream.close(cancel=True)
    deadline = time.monotonic() + 10
    while not cancel_log.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    text = cancel_log.read_text()
    assert text.startswith("c1 cancelled at ")
    assert int(text.split()[-1]) < 50
    # The request was ended (and its regions released) at once, counted as failed.
    assert _failed(server) == failed_before + 1
    # The instance is free again.
    stream = Stream(server.url)
    try:
        stream.client.async_stream_infer("repeat_ms", _repeat_inputs([9], 0),
                                         request_id="next")
        assert stream.get(timeout=5).as_numpy("OUT").tolist() == [9]
    finally:
        stream.close()


def _failed(server: ServerProcess) -> int:
    with grpcclient.InferenceServerClient(server.url) as client:
        stats = client.get_inference_statistics("repeat_ms").model_stats[0]
    return int(stats.inference_stats.fail.count)


@pytest.mark.parametrize("in_thread", [False, True])
def test_worker_killed_mid_stream_ends_the_request(start_server: StartServer,
                                                   in_thread: bool) -> None:
    server = start_server(["repeat_ms"])
    stream = Stream(server.url)
    try:
        stream.client.async_stream_infer("repeat_ms", _repeat_inputs(list(range(100)), 50),
                                         request_id="k1", parameters={"in_thread": in_thread})
        assert stream.get().as_numpy("IDX").tolist() == [0]
        (pid,) = worker_pids(server.pid)
        os.kill(pid, signal.SIGKILL)
        while True:
            result = stream.get()
            if isinstance(result, InferenceServerException):
                break
    finally:
        stream.close()
    assert "repeat_ms_0_0" in result.message() and "SIGKILL" in result.message()
    # Sent from a thread, the request outlived its execute: ended as an open stream.
    assert ("while the request's responses were being sent" in result.message()) == in_thread


def test_drain_waits_for_open_streams(start_server: StartServer) -> None:
    server = start_server(["repeat_ms"])
    stream = Stream(server.url)
    try:
        stream.client.async_stream_infer("repeat_ms", _repeat_inputs(list(range(8)), 100),
                                         request_id="d1", enable_empty_final_response=True)
        assert stream.get().as_numpy("IDX").tolist() == [0]
        server.process.send_signal(signal.SIGTERM)
        got = _collect(stream, "d1")
    finally:
        stream.close()
    assert [r.as_numpy("IDX").tolist() for r in got[:-1]] == [[i] for i in range(1, 8)]
    assert _final(got[-1])
    assert server.process.wait(20) == 0


def test_drain_ends_streams_past_the_exit_timeout(start_server: StartServer) -> None:
    server = start_server(["repeat_ms"], "--exit-timeout-secs", "2")
    stream = Stream(server.url)
    try:
        stream.client.async_stream_infer("repeat_ms",
                                         _repeat_inputs(list(range(1000)), 50),
                                         request_id="d2")
        assert stream.get().as_numpy("IDX").tolist() == [0]
        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        while True:
            result = stream.get()
            if isinstance(result, InferenceServerException):
                break
    finally:
        stream.close()
    assert time.monotonic() - started < 6
    assert "repeat_ms" in result.message()
    threading.Thread(target=server.process.wait, daemon=True).start()


def test_statistics_and_metrics_count_responses(start_server: StartServer) -> None:
    server = start_server(["square_int32", "midstream_error"])
    stream = Stream(server.url)
    try:
        for count in (3, 1):
            stream.client.async_stream_infer("square_int32", _int_input(count),
                                             request_id=f"n{count}")
        stream.client.async_stream_infer("midstream_error", _int_input(1), request_id="err")
        for _ in range(3 + 1 + 4):
            stream.get()
    finally:
        stream.close()
    with grpcclient.InferenceServerClient(server.url) as client:
        deadline = time.monotonic() + 5
        while True:
            square = client.get_inference_statistics("square_int32").model_stats[0]
            if square.inference_stats.success.count == 2 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        errors = client.get_inference_statistics("midstream_error").model_stats[0]
    stats = square.response_stats
    # Responses by index: the first two requests' k-th responses, then the final flags alone.
    assert stats["0"].success.count == 2 and stats["1"].empty_response.count == 1
    assert stats["1"].success.count == 1 and stats["2"].success.count == 1
    assert stats["3"].empty_response.count == 1
    assert stats["0"].success.ns > 0
    assert square.inference_stats.success.count == 2
    errors_by_index = errors.response_stats
    assert errors_by_index["0"].success.count == 1 and errors_by_index["1"].fail.count == 1
    assert errors_by_index["3"].fail.count == 1
    assert errors.inference_stats.fail.count == 1
    assert server.metric("shmserve_inference_response_count", "square_int32") == 4
    assert server.metric("shmserve_inference_response_count", "midstream_error") == 4


@pytest.mark.parametrize("flag, limit", [("--stream-max-pending-responses", "8"),
                                         ("--stream-max-pending-bytes", "200")])
def test_slow_reader_fails_the_stream_instead_of_buffering(start_server: StartServer,
                                                            tmp_path: Path, flag: str,
                                                            limit: str) -> None:
    """The client reads nothing while the model produces 5000 small responses; with a
    limit of 8 waiting responses, or of 200 bytes of them, the stream ends with
    RESOURCE_EXHAUSTED naming the limit, and the model sees its request cancelled."""
    import grpc

    from shmserve.protos import shmserve_service_pb2 as pb
    server = start_server(["repeat_ms"], flag, limit)
    cancel_log = tmp_path / "cancelled.txt"
    request = pb.ModelInferRequest(model_name="repeat_ms", id="slow")
    request.parameters["cancel_log"].string_param = str(cancel_log)
    for name, values in (("IN", list(range(5000))), ("DELAY_MS", [0])):
        tensor = request.inputs.add(name=name, datatype="INT32", shape=[len(values)])
        tensor.contents.int_contents.extend(values)
    with grpc.insecure_channel(server.url) as channel:
        call = channel.stream_stream(
            "/inference.GRPCInferenceService/ModelStreamInfer",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=pb.ModelStreamInferResponse.FromString)
        gate = threading.Event()

        def requests() -> Iterator[pb.ModelInferRequest]:
            yield request
            gate.wait(30)

        responses = call(requests())
        time.sleep(3)  # read nothing meanwhile
        with pytest.raises(grpc.RpcError) as info:
            for _ in responses:
                pass
        gate.set()
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert flag in (info.value.details() or "")
    deadline = time.monotonic() + 10
    while not cancel_log.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert cancel_log.read_text().startswith("slow cancelled at ")


def _events(server: ServerProcess, model: str, body: dict[str, Any]
            ) -> Iterator[tuple[float, dict[str, Any]]]:
    """POST generate_stream; each server-sent event as it arrives (seconds since the start,
    its JSON value)."""
    started = time.monotonic()
    connection = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=30)
    try:
        connection.request("POST", f"/v2/models/{model}/generate_stream",
                           body=json.dumps(body).encode())
        answer = connection.getresponse()
        assert answer.status == 200, answer.read()
        assert answer.getheader("Content-Type", "").startswith("text/event-stream")
        while line := answer.readline():
            if line.startswith(b"data: "):
                yield time.monotonic() - started, json.loads(line[len(b"data: "):])
    finally:
        connection.close()


def test_generate_stream_sends_each_response_as_an_event(server: ServerProcess) -> None:
    events = list(_events(server, "repeat_ms",
                          {"IN": [7, 8, 9], "DELAY_MS": 300, "id": "sse1"}))
    assert [value["OUT"] for _, value in events] == [7, 8, 9]
    assert [value["IDX"] for _, value in events] == [0, 1, 2]
    assert all(value["id"] == "sse1" and value["model_name"] == "repeat_ms"
               for _, value in events)
    assert events[0][0] < 0.5 < events[2][0]  # each sent as it came, not all at the end


def test_generate_stream_errors_are_events(server: ServerProcess) -> None:
    events = [value for _, value in _events(server, "midstream_error", {"IN": 4})]
    assert events[0]["OUT"] == 4 and "midstream failure" in events[1]["error"]
    assert events[2]["OUT"] == 4 and "model gave up" in events[3]["error"]
    assert len(events) == 4
    empty = [value for _, value in _events(server, "square_int32", {"IN": 0})]
    assert empty == []


def test_decoupled_model_with_dynamic_batching(start_server: StartServer) -> None:
    server = start_server(["square_batched"])
    stream = Stream(server.url)
    try:
        for count in (1, 2, 3, 0):
            tensor = grpcclient.InferInput("IN", [1, 1], "INT32")
            tensor.set_data_from_numpy(np.array([[count]], dtype=np.int32))
            stream.client.async_stream_infer("square_batched", [tensor],
                                             request_id=f"b{count}",
                                             enable_empty_final_response=True)
        results = _collect(stream, "", finals=4)
    finally:
        stream.close()
    by_id: dict[str, list[Any]] = {}
    for result in results:
        by_id.setdefault(result.get_response().id, []).append(result)
    for count in (1, 2, 3, 0):
        got = by_id[f"b{count}"]
        assert [r.as_numpy("OUT").tolist() for r in got[:count]] == [[[count]]] * count
        assert _final(got[-1]) and len(got) == count + 1
    batches = {r.as_numpy("BATCH")[0][0] for r in results if r.as_numpy("BATCH") is not None}
    assert max(batches) > 1  # the requests were batched


def test_generate_on_a_decoupled_model_takes_exactly_one_response(server: ServerProcess
                                                                  ) -> None:
    def generate(model: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        connection = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=30)
        try:
            connection.request("POST", f"/v2/models/{model}/generate",
                               body=json.dumps(body).encode())
            answer = connection.getresponse()
            return answer.status, json.loads(answer.read())
        finally:
            connection.close()

    status, value = generate("square_int32", {"IN": 1, "id": "g"})
    assert status == 200 and value["OUT"] == 1 and value["id"] == "g"
    status, value = generate("square_int32", {"IN": 2})
    assert status == 400 and "exactly one response" in value["error"]
    status, value = generate("square_int32", {"IN": 0})
    assert status == 400 and "sent none" in value["error"]


def test_unload_drains_open_streams(start_server: StartServer) -> None:
    """Unloading waits for a decoupled request whose responses are still coming, although its
    execute (sending from a thread) returned long ago."""
    server = start_server(["repeat_ms"], "--model-control-mode", "explicit",
                          "--load-model", "*")
    stream = Stream(server.url)
    try:
        stream.client.async_stream_infer("repeat_ms", _repeat_inputs(list(range(6)), 150),
                                         request_id="u1", enable_empty_final_response=True,
                                         parameters={"in_thread": True})
        assert stream.get().as_numpy("IDX").tolist() == [0]
        with grpcclient.InferenceServerClient(server.url) as control:
            unloading = threading.Thread(target=control.unload_model, args=("repeat_ms",))
            unloading.start()
            got = _collect(stream, "u1")
            finished = time.monotonic()
            unloading.join(20)
            assert time.monotonic() - finished < 3  # not held until the exit timeout
    finally:
        stream.close()
    assert [r.as_numpy("IDX").tolist() for r in got[:-1]] == [[i] for i in range(1, 6)]
    assert _final(got[-1])
