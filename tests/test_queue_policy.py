"""Dynamic batching's queue policy: pure tests of queue_policy.py (explicit clocks), then a real
server whose only instance a gate request holds while a backlog forms (--pipeline-depth 1, so
nothing is sent ahead); the model numbers its executions, so the order is read off the answers,
never off timings."""

from __future__ import annotations

import json
import queue as queue_module
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from shmserve.daemon.errors import ServeError
from shmserve.daemon.queue_policy import PolicyQueue, QueuePolicy, check_config
from shmserve.daemon.reply import Reply
from shmserve.daemon.request import InferRequest
from shmserve.protos import shmserve_model_config_pb2 as mc
from shmserve.tests.serverproc import ServerProcess, build_repository

MODEL = "queue_gate"
MS = 1_000_000


# --- pure ------------------------------------------------------------------------------------
def _batching(text: str) -> mc.ModelDynamicBatching:
    from google.protobuf import text_format
    return text_format.Parse(text, mc.ModelDynamicBatching())


def _request(name: str, **parameters: Any) -> InferRequest:
    return InferRequest("m", 1, name, [], [], 1, Reply(), dict(parameters))


LEVELS = """
priority_levels: 3 default_priority_level: 2
default_queue_policy { max_queue_size: 2 }
priority_queue_policy { key: 1 value: { timeout_action: REJECT default_timeout_microseconds: 1000
                                        allow_timeout_override: true } }
priority_queue_policy { key: 3 value: { timeout_action: DELAY default_timeout_microseconds: 1000 } }
"""


def _names(queue: PolicyQueue) -> list[str]:
    return [request.request_id for request in queue]


def test_priorities_order_the_queue_and_unknown_levels_take_the_default() -> None:
    policy = QueuePolicy.from_config(_batching(LEVELS))
    assert policy is not None
    queue = PolicyQueue(policy)
    for name, priority in (("c3", 3), ("b0", 0), ("a1", 1), ("b9", 9), ("a1x", 1)):
        queue.append(_request(name, priority=priority), 0)
    assert _names(queue) == ["a1", "a1x", "b0", "b9", "c3"]
    assert queue[0].request_id == "a1" and len(queue) == 5
    assert [queue.popleft().request_id for _ in range(2)] == ["a1", "a1x"]


def test_a_full_level_rejects_with_tritons_text_and_others_still_take() -> None:
    policy = QueuePolicy.from_config(_batching(LEVELS))
    assert policy is not None
    queue = PolicyQueue(policy)
    queue.append(_request("x"), 0)
    queue.append(_request("y"), 0)
    with pytest.raises(ServeError, match=r"^\[request id: z\] Exceeds maximum queue size$"):
        queue.append(_request("z"), 0)
    with pytest.raises(ServeError, match=r"\[request id: <id_unknown>\] Exceeds maximum"):
        queue.append(_request(""), 0)
    queue.append(_request("high", priority=1), 0)
    assert len(queue) == 3


def test_timeouts_reject_or_delay_and_a_request_may_only_shorten_its_own() -> None:
    policy = QueuePolicy.from_config(_batching(LEVELS))
    assert policy is not None
    queue = PolicyQueue(policy)
    queue.append(_request("r_long", priority=1, timeout=5_000), 0)   # longer: not honoured
    queue.append(_request("r_short", priority=1, timeout=100), 0)
    queue.append(_request("d_old", priority=3), 0)
    queue.append(_request("d_new", priority=3), 900_000)
    assert queue.next_deadline() == 100_000
    assert queue.expire(50_000) == []
    assert [r.request_id for r in queue.expire(200_000)] == ["r_short"]
    assert queue.next_deadline() == 1 * MS
    assert [r.request_id for r in queue.expire(1 * MS + 1)] == ["r_long"]
    assert _names(queue) == ["d_new", "d_old"]                       # d_old waits behind
    assert queue.expire(10 * MS) == [] and _names(queue) == ["d_old", "d_new"]  # both late
    assert len(queue) == 2 and queue.next_deadline() == 0


def test_cancelled_requests_are_dropped_and_malformed_parameters_refused() -> None:
    policy = QueuePolicy.from_config(_batching(LEVELS))
    assert policy is not None
    queue = PolicyQueue(policy)
    gone = _request("gone", priority=1)
    queue.append(gone, 0)
    queue.append(_request("kept", priority=1), 0)
    gone.cancelled = True
    assert queue.drop_cancelled() == [gone] and _names(queue) == ["kept"]
    assert [r.request_id for r in queue.expire(10 * MS)] == ["kept"]  # not the dropped one
    assert len(queue) == 0
    with pytest.raises(ServeError, match="invalid value type for 'priority' parameter"):
        queue.append(_request("bad", priority="high"), 0)
    with pytest.raises(ServeError, match="invalid value type for 'timeout' parameter"):
        queue.append(_request("bad", priority=1, timeout=1.5), 0)


def test_the_default_policy_keeps_the_plain_queue_and_levels_are_checked() -> None:
    assert QueuePolicy.from_config(_batching("max_queue_delay_microseconds: 5")) is None
    assert QueuePolicy.from_config(_batching("default_queue_policy { max_queue_size: 3 }")) \
        is None
    assert check_config(_batching("priority_levels: 2 default_priority_level: 3"), "m") == \
        "default priority level must be in range [1, 2] for m"
    assert check_config(_batching("""priority_levels: 2 default_priority_level: 1
        priority_queue_policy { key: 5 value: {} }"""), "m") == \
        "priority queue policy must have priority level in range [1, 2] for m"


# --- a real server ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    repo = build_repository(tmp_path_factory.mktemp("queue") / "models", [MODEL])
    proc = ServerProcess(repo, "--pipeline-depth", "1")
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


class _Backlog:
    """Requests sent asynchronously behind a gate request; their answers by name."""

    def __init__(self, server: ServerProcess, gate: Path) -> None:
        self.server = server
        self.client = grpcclient.InferenceServerClient(server.url)
        self.gate = gate
        self.answers: queue_module.Queue[tuple[str, Any]] = queue_module.Queue()
        self.sent = 0

    def send(self, name: str, wait: str = "", queued: int | None = None,
             **options: Any) -> None:
        """Send ``name``; with ``queued``, return once that many requests wait (gRPC does
        not keep concurrent calls in order: the backlog is built one arrival at a time)."""
        tensor = grpcclient.InferInput("WAIT", [1, 1], "BYTES")
        tensor.set_data_from_numpy(np.array([[wait.encode()]], dtype=np.object_))
        def callback(result: Any, error: Any) -> None:
            self.answers.put((name, error or result))

        self.client.async_infer(MODEL, [tensor], callback, request_id=name, **options)
        self.sent += 1
        if queued is not None:
            self.wait_queued(queued)

    def hold(self) -> None:
        """Occupy the instance until ``release``."""
        self.send("gate", str(self.gate))
        held = Path(f"{self.gate}.held")
        deadline = time.monotonic() + 30
        while not held.exists():
            assert time.monotonic() < deadline, "the gate request did not start"
            time.sleep(0.02)

    def wait_queued(self, count: int) -> None:
        deadline = time.monotonic() + 30
        while self.server.metric("nv_inference_pending_request_count", MODEL) != count:
            assert time.monotonic() < deadline, "the backlog did not form"
            time.sleep(0.05)

    def release(self) -> dict[str, Any]:
        self.gate.write_text("go")
        results = dict(self.answers.get(timeout=60) for _ in range(self.sent))
        self.client.close()
        return results


def _order(results: dict[str, Any]) -> list[str]:
    done = {name: int(result.as_numpy("ORDER")[0][0]) for name, result in results.items()
            if not isinstance(result, InferenceServerException)}
    return sorted(done, key=done.__getitem__)


def test_priorities_reorder_a_backlog(server: ServerProcess, tmp_path: Path) -> None:
    backlog = _Backlog(server, tmp_path / "gate")
    backlog.hold()
    for queued, (name, priority) in enumerate(
            (("low1", 2), ("low2", 0), ("high1", 1), ("low3", 2), ("high2", 1)), 1):
        backlog.send(name, queued=queued, priority=priority)
    assert _order(backlog.release()) == ["gate", "high1", "high2", "low1", "low2", "low3"]


def test_a_full_queue_rejects_with_tritons_text(server: ServerProcess, tmp_path: Path) -> None:
    backlog = _Backlog(server, tmp_path / "gate")
    backlog.hold()
    for index in range(4):  # the default level holds 4
        backlog.send(f"low{index}", queued=index + 1)
    backlog.send("low4")
    name, error = backlog.answers.get(timeout=30)  # refused at once, while the gate holds
    assert name == "low4"
    backlog.sent -= 1
    backlog.send("high", queued=5, priority=1)  # another level, its own queue
    results = backlog.release()
    assert isinstance(error, InferenceServerException)
    assert error.status() == "StatusCode.UNAVAILABLE"
    assert error.message() == "[request id: low4] Exceeds maximum queue size"
    assert _order(results) == ["gate", "high", "low0", "low1", "low2", "low3"]


def test_timeout_reject_answers_while_the_backlog_waits(server: ServerProcess,
                                                        tmp_path: Path) -> None:
    backlog = _Backlog(server, tmp_path / "gate")
    backlog.hold()
    backlog.send("patient", queued=1, priority=1)
    backlog.send("hasty", priority=1, timeout=50_000)  # 50 ms, shorter than the default
    name, error = backlog.answers.get(timeout=30)      # while the gate still holds
    assert name == "hasty" and isinstance(error, InferenceServerException)
    assert error.status() == "StatusCode.UNAVAILABLE"
    assert error.message() == "Request timeout expired"
    backlog.sent -= 1
    assert _order(backlog.release()) == ["gate", "patient"]


def test_timeout_delay_moves_a_request_behind_its_level(server: ServerProcess,
                                                        tmp_path: Path) -> None:
    backlog = _Backlog(server, tmp_path / "gate")
    backlog.hold()
    backlog.send("late", queued=1, timeout=50_000)
    time.sleep(0.3)  # its 50 ms (from when it was queued) are over before the next arrive
    backlog.send("first", queued=2)
    backlog.send("second", queued=3)
    assert _order(backlog.release()) == ["gate", "first", "second", "late"]


def _http_infer(server: ServerProcess, name: str, **parameters: Any) -> dict[str, Any]:
    """One HTTP/JSON inference (urllib: tritonclient.http's async calls only move while
    gevent runs, and this test waits in plain threads)."""
    body = json.dumps({"id": name, "parameters": parameters, "inputs": [
        {"name": "WAIT", "shape": [1, 1], "datatype": "BYTES", "data": [""]}]}).encode()
    request = urllib.request.Request(f"http://{server.http_url}/v2/models/{MODEL}/infer",
                                     body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return dict(json.loads(answer.read()))
    except urllib.error.HTTPError as error:
        return {"error": json.loads(error.read())["error"]}


def test_http_requests_carry_priority_and_timeout(server: ServerProcess, tmp_path: Path) -> None:
    backlog = _Backlog(server, tmp_path / "gate")
    backlog.hold()
    with ThreadPoolExecutor(3) as pool:
        low = pool.submit(_http_infer, server, "low", priority=2)
        backlog.wait_queued(1)
        hasty = _http_infer(server, "hasty", priority=1, timeout=50_000)  # while the gate holds
        assert hasty == {"error": "Request timeout expired"}
        high = pool.submit(_http_infer, server, "high", priority=1)
        backlog.wait_queued(2)
        backlog.release()
        order = {name: future.result()["outputs"][0]["data"][0]
                 for name, future in (("low", low), ("high", high))}
    assert order["high"] < order["low"]
