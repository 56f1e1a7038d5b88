"""Sequence batching and implicit state (issue 20 item 1), through tritonclient's sequence API
(gRPC and HTTP) and shmserve.client's sequence helper (local channel), on one real server.

Models: tests/models/seq_accumulator (a python-backend accumulator keeping its own sums by
its CORRID control input; it reports the control values and batch size it saw) in variants
written below, and tests/models/seq_state (implicit state: the server keeps the sum).
"""

from __future__ import annotations

import asyncio
import queue
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from shmserve.client import AsyncClient, Client, ShmserveError
from shmserve.tests.serverproc import TEST_MODELS, ServerProcess

ACCUMULATOR = TEST_MODELS / "seq_accumulator"
STATE = TEST_MODELS / "seq_state"
# seq_state, decoupled: a first response echoes INPUT, the final one carries INPUT + the state,
# which becomes the new state.
DECOUPLED_STATE_PY = """
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        for request in requests:
            value = pb_utils.get_input_tensor_by_name(request, "INPUT").as_numpy()
            state = pb_utils.get_input_tensor_by_name(request, "STATE_IN").as_numpy()
            total = (value + state).astype(np.int32)
            sender = request.get_response_sender()
            sender.send(pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT", value)]))
            sender.send(pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT", total),
                                                    pb_utils.Tensor("STATE_OUT", total)]),
                        flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None
"""
START_MISSING = ("inference request for sequence {id} to model '{model}' must specify the "
                 "START flag on the first request of the sequence")


def _variant(repo: Path, source: Path, name: str, *edits: tuple[str, str]) -> None:
    """A copy of ``source`` named ``name`` with text edits to its config."""
    target = repo / name
    shutil.copytree(source, target)
    config = (source / "config.pbtxt").read_text().replace(f'name: "{source.name}"',
                                                           f'name: "{name}"')
    for old, new in edits:
        assert old in config, old
        config = config.replace(old, new)
    (target / "config.pbtxt").write_text(config)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    repo = tmp_path_factory.mktemp("sequence") / "repo"
    repo.mkdir()
    _variant(repo, ACCUMULATOR, "seq_accumulator")
    _variant(repo, ACCUMULATOR, "acc_fill")
    _variant(repo, ACCUMULATOR, "acc_crash")
    _variant(repo, ACCUMULATOR, "acc_oldest", ("direct { }",
                                               "oldest { max_candidate_sequences: 4 }"))
    _variant(repo, ACCUMULATOR, "acc_idle", ("max_batch_size: 4", "max_batch_size: 1"),
             ("max_sequence_idle_microseconds: 3000000", "max_sequence_idle_microseconds: 400000"))
    _variant(repo, ACCUMULATOR, "acc_one_slot", ("max_batch_size: 4", "max_batch_size: 1"))
    _variant(repo, STATE, "seq_state")
    _variant(repo, STATE, "state_decoupled", ("max_batch_size: 0", "max_batch_size: 0\n"
                                              "model_transaction_policy { decoupled: true }"))
    (repo / "state_decoupled" / "1" / "model.py").write_text(DECOUPLED_STATE_PY)
    shutil.copytree(TEST_MODELS / "seq_bls_caller", repo / "seq_bls_caller")
    _variant(repo, STATE, "state_zero_batched",
             ("max_batch_size: 0", "max_batch_size: 2"),
             ("oldest { max_candidate_sequences: 4 }", "direct { }"),
             ('data_file: "start_value" name: "hundred"', 'zero_data: true name: "zero"'),
             ('output [ { name: "OUTPUT", data_type: TYPE_INT32, dims: [ 1 ] } ]',
              'output [ { name: "OUTPUT", data_type: TYPE_INT32, dims: [ 1 ] },'
              ' { name: "STATE_OUT", data_type: TYPE_INT32, dims: [ 1 ] } ]'))
    _variant(repo, STATE, "state_default",
             ('      initial_state: { data_type: TYPE_INT32 dims: [ 1 ] data_file: '
              '"start_value" name: "hundred" }\n', ""))
    socket_dir = Path(tempfile.mkdtemp(prefix="shmseq", dir="/tmp"))
    server = ServerProcess(repo, "--local-socket", str(socket_dir / "s.sock"))
    server.socket = socket_dir / "s.sock"  # type: ignore[attr-defined]
    server.wait_ready()
    yield server
    assert server.stop() == 0, server.log()
    shutil.rmtree(socket_dir, ignore_errors=True)


def _accumulate(client: grpcclient.InferenceServerClient, model: str, sequence_id: int | str,
                value: int, start: bool = False, end: bool = False) -> tuple[int, list[int]]:
    """One step: (the running sum, [START, END, READY, CORRID, batch size, pid])."""
    tensor = grpcclient.InferInput("INPUT", [1, 1], "INT32")
    tensor.set_data_from_numpy(np.array([[value]], np.int32))
    result = client.infer(model, [tensor], sequence_id=sequence_id, sequence_start=start,
                          sequence_end=end, client_timeout=20)
    return int(result.as_numpy("OUTPUT")[0, 0]), [int(v) for v in result.as_numpy("CONTROLS")[0]]


def _error(call: object, *args: object, **kwargs: object) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as caught:
        call(*args, **kwargs)  # type: ignore[operator]
    return caught.value


def test_direct_interleaved_sequences_get_their_controls_and_sums(server: ServerProcess
                                                                  ) -> None:
    client = grpcclient.InferenceServerClient(server.url)
    assert "sequence" in client.get_server_metadata().extensions
    ids = [1001, 1002, 1003]
    expected = dict.fromkeys(ids, 0)
    for step in range(4):
        for index, sequence_id in enumerate(ids):
            value = 10 * index + step + 1
            expected[sequence_id] += value
            total, (start, end, ready, corrid, _, _) = _accumulate(
                client, "seq_accumulator", sequence_id, value, start=step == 0, end=step == 3)
            assert total == expected[sequence_id]
            assert (start, end, ready, corrid) == (int(step == 0), int(step == 3), 1,
                                                   sequence_id)
    # Ended: the next request needs START again (Triton's text).
    error = _error(_accumulate, client, "seq_accumulator", 1001, 1)
    assert error.status() == "StatusCode.INVALID_ARGUMENT"
    assert START_MISSING.format(id=1001, model="seq_accumulator") in error.message()


@pytest.mark.parametrize("model", ["seq_accumulator", "acc_oldest"])
def test_concurrent_sequences_batch_together_and_stay_apart(server: ServerProcess,
                                                            model: str) -> None:
    """8 sequences stepping at once from 8 threads on 4 slots (half wait in the backlog for a
    slot): every sum right, and with the direct strategy (one batch at a time per instance)
    some executions held several sequences."""
    batch_sizes: list[int] = []
    failures: list[BaseException] = []

    def run(sequence_id: int) -> None:
        try:
            client = grpcclient.InferenceServerClient(server.url)
            total = 0
            for step in range(15):
                total += sequence_id + step
                got, controls = _accumulate(client, model, sequence_id,
                                            sequence_id + step, start=step == 0, end=step == 14)
                assert got == total
                assert controls[3] == sequence_id
                batch_sizes.append(controls[4])
        except BaseException as exc:
            failures.append(exc)

    base = 2000 if model == "seq_accumulator" else 3000
    threads = [threading.Thread(target=run, args=(base + i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not failures, failures
    assert len(batch_sizes) == 8 * 15
    assert max(batch_sizes) <= 4
    if model == "seq_accumulator":
        assert max(batch_sizes) > 1


def test_direct_fills_an_empty_slot_below_a_ready_one(server: ServerProcess) -> None:
    """Sequence A holds slot 0, B slot 1: B stepping alone runs in a batch of 2 whose first
    entry is a not-ready filler (Triton's null request), which leaves A's sum alone."""
    client = grpcclient.InferenceServerClient(server.url)
    assert _accumulate(client, "acc_fill", 31, 5, start=True)[1][4] == 1
    total, controls = _accumulate(client, "acc_fill", 32, 7, start=True)
    assert (total, controls[4]) == (7, 2)
    total, controls = _accumulate(client, "acc_fill", 32, 1)
    assert (total, controls[4]) == (8, 2)
    assert _accumulate(client, "acc_fill", 31, 1, end=True)[0] == 6
    assert _accumulate(client, "acc_fill", 32, 1, end=True)[0] == 9


def test_oldest_strategy_runs_ready_sequences_without_fillers(server: ServerProcess) -> None:
    client = grpcclient.InferenceServerClient(server.url)
    _accumulate(client, "acc_oldest", 41, 1, start=True)
    total, controls = _accumulate(client, "acc_oldest", 42, 2, start=True)
    assert (total, controls[4]) == (2, 1)
    assert _accumulate(client, "acc_oldest", 41, 10)[0] == 11
    assert _accumulate(client, "acc_oldest", 42, 20, end=True)[0] == 22
    assert _accumulate(client, "acc_oldest", 41, 100, end=True)[0] == 111


def test_requests_that_cannot_join_a_sequence_are_refused(server: ServerProcess) -> None:
    client = grpcclient.InferenceServerClient(server.url)
    error = _error(_accumulate, client, "seq_accumulator", 777, 1)
    assert START_MISSING.format(id=777, model="seq_accumulator") in error.message()
    error = _error(_accumulate, client, "seq_accumulator", 0, 1, start=True)
    assert error.status() == "StatusCode.INVALID_ARGUMENT"
    assert "must specify a non-zero or non-empty correlation ID" in error.message()
    error = _error(_accumulate, client, "seq_accumulator", "text-id", 1, start=True)
    assert ("sequence batching control 'CORRID' data-type is 'BYTES', but model "
            "'seq_accumulator' expects 'UINT64'") in error.message()
    tensor = grpcclient.InferInput("INPUT", [2, 1], "INT32")
    tensor.set_data_from_numpy(np.array([[1], [2]], np.int32))
    error = _error(client.infer, "seq_accumulator", [tensor], sequence_id=5,
                   sequence_start=True)
    assert ("inference request to model 'seq_accumulator' must specify batch-size 1 due to "
            "requirements of sequence batcher") in error.message()


def test_a_sequence_survives_other_sequences_errors(server: ServerProcess) -> None:
    client = grpcclient.InferenceServerClient(server.url)
    _accumulate(client, "seq_accumulator", 51, 1, start=True)
    _accumulate(client, "seq_accumulator", 52, 100, start=True)
    error = _error(_accumulate, client, "seq_accumulator", 51, -5)  # the model's error
    assert "negative input -5" in error.message()
    _error(_accumulate, client, "seq_accumulator", 53, 1)  # no START: refused
    assert _accumulate(client, "seq_accumulator", 52, 1)[0] == 101
    assert _accumulate(client, "seq_accumulator", 51, 2)[0] == 3  # its own error left it as is
    assert _accumulate(client, "seq_accumulator", 52, 1, end=True)[0] == 102
    assert _accumulate(client, "seq_accumulator", 51, 2, end=True)[0] == 5


def test_idle_sequence_loses_its_slot_to_the_backlog(server: ServerProcess) -> None:
    """One slot (max_batch_size 1), 0.4 s idle limit: B waits in the backlog until A idles
    out; A's next request then needs START again."""
    client = grpcclient.InferenceServerClient(server.url)
    _accumulate(client, "acc_idle", 61, 5, start=True)
    began = time.monotonic()
    assert _accumulate(client, "acc_idle", 62, 7, start=True)[0] == 7  # waited for the slot
    assert time.monotonic() - began >= 0.3
    error = _error(_accumulate, client, "acc_idle", 61, 1)
    assert START_MISSING.format(id=61, model="acc_idle") in error.message()
    assert _accumulate(client, "acc_idle", 62, 1, end=True)[0] == 8


def test_a_decoupled_model_keeps_implicit_state(server: ServerProcess) -> None:
    """Each request streams two responses; the state output of the last one is what the
    sequence's next request gets (and the client never sees STATE_OUT)."""
    answers: queue.Queue[Any] = queue.Queue()
    client = grpcclient.InferenceServerClient(server.url)
    client.start_stream(callback=lambda result, error: answers.put(error or result))
    steps = [(95, 1, True, False), (96, 10, True, False), (95, 2, False, False),
             (96, 20, False, True), (95, 3, False, True)]
    seen: list[tuple[int, ...]] = []
    try:
        for sequence_id, value, start, end in steps:
            tensor = grpcclient.InferInput("INPUT", [1], "INT32")
            tensor.set_data_from_numpy(np.array([value], np.int32))
            client.async_stream_infer("state_decoupled", [tensor], sequence_id=sequence_id,
                                      sequence_start=start, sequence_end=end)
            pair = []
            for _ in range(2):
                item = answers.get(timeout=20)
                assert not isinstance(item, InferenceServerException), item
                assert [o.name for o in item.get_response().outputs] == ["OUTPUT"]
                pair.append(int(item.as_numpy("OUTPUT")[0]))
            seen.append((sequence_id, *pair))
    finally:
        client.stop_stream()
    assert seen == [(95, 1, 101), (96, 10, 110), (95, 2, 103), (96, 20, 130), (95, 3, 106)]


def test_backlogged_sequence_expires_at_its_request_timeout(server: ServerProcess) -> None:
    """One slot held by A: B waits in the backlog, and its request's 0.2 s timeout passes
    first. B fails with Triton's text and must START again; A goes on."""
    client = grpcclient.InferenceServerClient(server.url)
    _accumulate(client, "acc_one_slot", 91, 5, start=True)
    tensor = grpcclient.InferInput("INPUT", [1, 1], "INT32")
    tensor.set_data_from_numpy(np.array([[7]], np.int32))
    error = _error(client.infer, "acc_one_slot", [tensor], sequence_id=92, sequence_start=True,
                   timeout=200_000, client_timeout=20)
    assert error.status() == "StatusCode.UNAVAILABLE"
    assert "timeout of the corresponding sequence has been expired" in error.message()
    error = _error(_accumulate, client, "acc_one_slot", 92, 1)
    assert START_MISSING.format(id=92, model="acc_one_slot") in error.message()
    assert _accumulate(client, "acc_one_slot", 91, 1, end=True)[0] == 6
    assert _accumulate(client, "acc_one_slot", 92, 3, start=True, end=True)[0] == 3


def test_worker_crash_ends_its_live_sequences(server: ServerProcess) -> None:
    client = grpcclient.InferenceServerClient(server.url)
    _accumulate(client, "acc_crash", 71, 1, start=True)
    _accumulate(client, "acc_crash", 72, 2, start=True)
    error = _error(_accumulate, client, "acc_crash", 71, -999)  # the worker kills itself
    assert error.status() == "StatusCode.UNAVAILABLE"
    for sequence_id in (72, 71):
        error = _error(_accumulate, client, "acc_crash", sequence_id, 1)
        assert error.status() == "StatusCode.UNAVAILABLE"
        assert (f"inference request for sequence {sequence_id} to model 'acc_crash' failed: "
                f"the sequence was lost when the worker of model instance") in error.message()
        assert "start the sequence again with the START flag" in error.message()
    deadline = time.monotonic() + 30
    while not client.is_model_ready("acc_crash") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _accumulate(client, "acc_crash", 72, 4, start=True)[0] == 4  # starts afresh
    assert _accumulate(client, "acc_crash", 72, 4, end=True)[0] == 8


def _state_step(client: grpcclient.InferenceServerClient, model: str, sequence_id: int | str,
                value: int, start: bool = False, end: bool = False, batched: bool = False,
                outputs: list[str] | None = None) -> dict[str, int]:
    tensor = grpcclient.InferInput("INPUT", [1, 1] if batched else [1], "INT32")
    tensor.set_data_from_numpy(np.array([[value]] if batched else [value], np.int32))
    requested = [grpcclient.InferRequestedOutput(name) for name in outputs or []] or None
    result = client.infer(model, [tensor], outputs=requested, sequence_id=sequence_id,
                          sequence_start=start, sequence_end=end, client_timeout=20)
    response = result.get_response()
    return {out.name: int(result.as_numpy(out.name).reshape(-1)[0]) for out in response.outputs}


def test_implicit_state_is_kept_per_sequence_in_the_server(server: ServerProcess) -> None:
    """seq_state: the model returns INPUT + STATE_IN as OUTPUT and STATE_OUT; the server keeps
    STATE_OUT for the sequence's next request, starting from initial_state/start_value."""
    client = grpcclient.InferenceServerClient(server.url)
    assert _state_step(client, "seq_state", 81, 1, start=True) == {"OUTPUT": 101}
    assert _state_step(client, "seq_state", "eighty-two", 5, start=True) == {"OUTPUT": 105}
    assert _state_step(client, "seq_state", 81, 2) == {"OUTPUT": 103}
    assert _state_step(client, "seq_state", "eighty-two", 5) == {"OUTPUT": 110}
    assert _state_step(client, "seq_state", 81, 3, start=True) == {"OUTPUT": 103}  # reset
    assert _state_step(client, "seq_state", 81, 1, end=True) == {"OUTPUT": 104}
    error = _error(_state_step, client, "seq_state", 81, 1)
    assert START_MISSING.format(id=81, model="seq_state") in error.message()
    assert _state_step(client, "seq_state", "eighty-two", 5, end=True) == {"OUTPUT": 115}


def test_implicit_state_zero_data_batched_and_requestable(server: ServerProcess) -> None:
    """zero_data initial state on a batching model (state [1, 1] per request); the config
    lists STATE_OUT as an output, so a client may ask for it."""
    client = grpcclient.InferenceServerClient(server.url)
    model = "state_zero_batched"
    assert _state_step(client, model, 91, 4, start=True, batched=True) == {
        "OUTPUT": 4, "STATE_OUT": 4}
    assert _state_step(client, model, 92, 1, start=True, batched=True,
                       outputs=["OUTPUT"]) == {"OUTPUT": 1}
    assert _state_step(client, model, 91, 4, batched=True, outputs=["STATE_OUT"]) == {
        "STATE_OUT": 8}
    assert _state_step(client, model, 92, 1, end=True, batched=True)["OUTPUT"] == 2
    assert _state_step(client, model, 91, 4, end=True, batched=True)["OUTPUT"] == 12


def test_implicit_state_without_initial_state_starts_at_zero_over_http(server: ServerProcess
                                                                       ) -> None:
    client = httpclient.InferenceServerClient(server.http_url)

    def step(sequence_id: int | str, value: int, start: bool = False,
             end: bool = False) -> int:
        tensor = httpclient.InferInput("INPUT", [1], "INT32")
        tensor.set_data_from_numpy(np.array([value], np.int32))
        result = client.infer("state_default", [tensor], sequence_id=sequence_id,
                              sequence_start=start, sequence_end=end)
        return int(result.as_numpy("OUTPUT")[0])

    assert step("alpha", 3, start=True) == 3
    assert step(12345678901234, 4, start=True) == 4
    assert step("alpha", 3) == 6
    assert step(12345678901234, 4, end=True) == 8
    assert step("alpha", 3, end=True) == 9
    with pytest.raises(InferenceServerException) as caught:
        step("alpha", 1)
    assert START_MISSING.format(id="alpha", model="state_default") in caught.value.message()


def test_client_sequence_helper_over_the_local_channel(server: ServerProcess) -> None:
    socket_path = server.socket  # type: ignore[attr-defined]
    with Client(f"local://{socket_path}") as client:
        with client.sequence("seq_state") as first, client.sequence("seq_state", "named") as second:
            assert isinstance(first.sequence_id, int) and first.sequence_id > 0
            one = np.array([1], np.int32)
            assert first.infer({"INPUT": one})["OUTPUT"][0] == 101
            assert second.infer({"INPUT": one * 2})["OUTPUT"][0] == 102
            assert first.infer({"INPUT": one})["OUTPUT"][0] == 102
            assert second.infer({"INPUT": one}, end=True)["OUTPUT"][0] == 103
            assert first.infer({"INPUT": one}, end=True)["OUTPUT"][0] == 103
            with pytest.raises(ValueError, match="already ended"):
                first.infer({"INPUT": one})
            stats = client.model_statistics("seq_state")
    assert stats[0].inference_stats.success.count >= 5


def test_a_bls_call_joins_a_sequence_with_its_flags(server: ServerProcess) -> None:
    client = grpcclient.InferenceServerClient(server.url)

    def call(value: int, flags: int) -> int:
        tensors = []
        for name, datatype, array in (("INPUT", "INT32", np.array([value], np.int32)),
                                      ("SEQ", "UINT64", np.array([4242], np.uint64)),
                                      ("FLAGS", "INT32", np.array([flags], np.int32))):
            tensor = grpcclient.InferInput(name, [1], datatype)
            tensor.set_data_from_numpy(array)
            tensors.append(tensor)
        return int(client.infer("seq_bls_caller", tensors).as_numpy("OUTPUT")[0])

    assert call(1, 1) == 101  # START
    assert call(2, 0) == 103
    assert call(3, 2) == 106  # END
    with pytest.raises(InferenceServerException, match="must specify the START flag"):
        call(1, 0)


def test_async_client_sequence_helper_over_grpc(server: ServerProcess) -> None:
    one = np.array([1], np.int32)

    async def run() -> list[int]:
        async with AsyncClient(server.url) as client:
            async with client.sequence("seq_state", 123456) as sequence:
                got = [int((await sequence.infer({"INPUT": one}))["OUTPUT"][0])]
                got.append(int((await sequence.infer({"INPUT": one}, end=True))["OUTPUT"][0]))
            with pytest.raises(ShmserveError, match="must specify the START flag"):
                await client.infer("seq_state", {"INPUT": one},
                                   parameters={"sequence_id": 123456})
        return got

    assert asyncio.run(run()) == [101, 102]
