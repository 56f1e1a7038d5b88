"""BLS end to end: ``pb_utils.InferenceRequest(...).exec()`` / ``async_exec()`` from a real
worker into the same core (daemon/frontend/bls.py, workers/bls.py), against a real server
and ``tritonclient`` as the outside client."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tests.serverproc import ServerProcess, build_repository

MODELS = ["bls_double", "bls_pre", "bls_caller", "async_sleeper", "bls_bounce",
          "bls_decoupled", "repeat_ms", "midstream_error", "fill_stream"]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    repo = build_repository(tmp_path_factory.mktemp("bls") / "repo", MODELS)
    # bls_caller calls bls_double from initialize: load it once the others are ready.
    # Rings big enough for 16 MiB inline: the zero-copy test must catch bytes that pass
    # through the supervisor, not a ring that is too small for them.
    proc = ServerProcess(repo, "--model-control-mode", "explicit", "--load-model", "bls_double",
                         "--load-model", "bls_pre", "--load-model", "async_sleeper",
                         "--load-model", "bls_bounce", "--load-model", "bls_decoupled",
                         "--load-model", "repeat_ms", "--load-model", "midstream_error",
                         "--load-model", "fill_stream",
                         "--local-ring-bytes", str(128 << 20))
    try:
        proc.wait_ready()
        with grpcclient.InferenceServerClient(proc.url) as client:
            client.load_model("bls_caller")
        yield proc
    finally:
        code = proc.stop()
    assert code == 0, proc.log()


def _infer(server: ServerProcess, data: np.ndarray, mode: str,
           model: str = "bls_caller") -> np.ndarray:
    with grpcclient.InferenceServerClient(server.url) as client:
        tensor = grpcclient.InferInput("IN", list(data.shape), "FP32")
        tensor.set_data_from_numpy(data)
        result = client.infer(model, [tensor], parameters={"mode": mode}, client_timeout=60)
        out = result.as_numpy("OUT")
        assert out is not None
        return out


def _infer_many(server: ServerProcess, model: str, mode: str, count: int) -> float:
    """``count`` requests at once from as many threads: the seconds until all answered."""
    data = np.arange(3, dtype=np.float32)
    barrier = threading.Barrier(count)
    results: list[np.ndarray] = []

    def one() -> None:
        barrier.wait()
        results.append(_infer(server, data, mode, model))

    threads = [threading.Thread(target=one) for _ in range(count)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    assert len(results) == count
    return elapsed


def _aggregate(server: ServerProcess, values: list[int], mode: str,
               **parameters: str) -> tuple[int, int, bool]:
    """bls_decoupled's answer: (SUM, COUNT, LAST_EMPTY) of the repeat model's responses."""
    with grpcclient.InferenceServerClient(server.url) as client:
        tensor = grpcclient.InferInput("IN", [len(values)], "INT32")
        tensor.set_data_from_numpy(np.array(values, np.int32))
        result = client.infer("bls_decoupled", [tensor], parameters={"mode": mode, **parameters},
                              client_timeout=60)
    return (int(result.as_numpy("SUM")[0]), int(result.as_numpy("COUNT")[0]),
            bool(result.as_numpy("LAST_EMPTY")[0]))


@pytest.mark.parametrize("mode", ["sync", "async", "async_for"])
def test_decoupled_exec_iterates_every_response(server: ServerProcess, mode: str) -> None:
    """exec(decoupled=True) / async_exec(decoupled=True): one response per element, then
    the empty final one (the repeat model sends the final flag alone), as in Triton."""
    before = _stats(server, "repeat_ms")
    assert _aggregate(server, [3, 4, 5, 6], mode) == (18, 5, True)
    assert _stats(server, "repeat_ms") == before + 1  # through the core, counted


def test_decoupled_exec_errors_mid_stream_are_responses(server: ServerProcess) -> None:
    # midstream_error: OUT, an error, OUT, then execute raises: the error as final response.
    assert _aggregate(server, [7], "error") == (7 + 7 - 2000, 4, False)


def test_decoupled_exec_stopped_early_cancels_the_request(server: ServerProcess,
                                                         tmp_path: Path) -> None:
    log = tmp_path / "cancelled"
    values = list(range(1, 40))  # 10 ms apart: far from done when the caller stops
    assert _aggregate(server, values, "first", cancel_log=str(log)) == (1, 1, False)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not log.exists():
        time.sleep(0.05)
    assert "cancelled at" in log.read_text()


def test_decoupled_exec_responses_never_pass_through_the_supervisor(
        server: ServerProcess) -> None:
    """Three 16 MiB responses of a decoupled model to a BLS caller: written into the
    caller's response ring by the called worker, not carried by the supervisor."""
    elements = 4 << 20
    expected = (elements * (0 + 1 + 2), 4, True)  # 3 responses and the empty final one
    assert _aggregate(server, [3, elements], "fill") == expected  # warm
    moved = _io_bytes(server.pid)
    assert _aggregate(server, [3, elements], "fill") == expected
    moved = _io_bytes(server.pid) - moved
    assert moved < 2 << 20, f"the supervisor read/wrote {moved} bytes"


def _stats(server: ServerProcess, model: str) -> int:
    with grpcclient.InferenceServerClient(server.url) as client:
        stats = client.get_inference_statistics(model, as_json=True)
    return int(stats["model_stats"][0]["inference_stats"]["success"].get("count", 0))


def test_sync_exec_goes_through_the_core(server: ServerProcess) -> None:
    before = _stats(server, "bls_double")
    data = np.arange(5, dtype=np.float32)
    np.testing.assert_array_equal(_infer(server, data, "sync"), data * 2)
    # Counted as any request of bls_double.
    assert _stats(server, "bls_double") == before + 1


def test_preferred_memory_and_trace_are_accepted(server: ServerProcess) -> None:
    """``pb_utils.PreferredMemory``, ``request.trace()`` and ``set_flags`` as the
    python_backend's BLS examples use them."""
    data = np.arange(4, dtype=np.float32)
    np.testing.assert_array_equal(_infer(server, data, "preferred"), data * 2)


def test_async_exec_awaits_two_calls(server: ServerProcess) -> None:
    data = np.arange(4, dtype=np.float32)
    np.testing.assert_array_equal(_infer(server, data, "async"), data * 2 + (data + 1) * 2)


def test_exec_from_initialize(server: ServerProcess) -> None:
    np.testing.assert_array_equal(_infer(server, np.zeros(1, np.float32), "init"),
                                  np.full(2, 2, np.float32))


def test_unknown_model_is_a_response_error(server: ServerProcess) -> None:
    with pytest.raises(InferenceServerException) as caught:
        _infer(server, np.ones(2, np.float32), "unknown")
    assert caught.value.status() == "StatusCode.NOT_FOUND"
    assert "BLS failed: Request for unknown model: 'no_such_model' is not found" \
        in caught.value.message()


def test_bad_input_is_a_response_error_with_tritons_text(server: ServerProcess) -> None:
    with pytest.raises(InferenceServerException) as caught:
        _infer(server, np.ones(2, np.float32), "bad_input")
    assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "BLS failed: inference input 'IN' data-type is " \
           "'INT32', but model 'bls_double' expects 'FP32'" in caught.value.message()


def test_call_to_own_single_instance_fails_instead_of_deadlocking(server: ServerProcess) -> None:
    started = time.monotonic()
    with pytest.raises(InferenceServerException) as caught:
        _infer(server, np.ones(2, np.float32), "self")
    assert time.monotonic() - started < 10
    assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "BLS request to model 'bls_caller' from its own only instance would deadlock" \
        in caught.value.message()


def test_cycle_through_another_model_fails_instead_of_deadlocking(
        server: ServerProcess) -> None:
    started = time.monotonic()
    with pytest.raises(InferenceServerException) as caught:
        _infer(server, np.ones(2, np.float32), "cycle")
    assert time.monotonic() - started < 10
    assert caught.value.status() == "StatusCode.UNAVAILABLE"
    assert "BLS request to model 'bls_caller' would deadlock: all 1 instance(s) of it wait " \
           "for this chain of BLS calls (bls_caller -> bls_bounce -> bls_caller)" \
        in caught.value.message()


def test_chain_without_a_cycle_is_served(server: ServerProcess) -> None:
    data = np.arange(3, dtype=np.float32)
    np.testing.assert_array_equal(_infer(server, data, "via_bounce"), data * 2)


def test_awaited_call_to_own_concurrent_instance_is_served(server: ServerProcess) -> None:
    """async_exec in an async def execute holds no instance: calling itself is fine."""
    data = np.arange(3, dtype=np.float32)
    np.testing.assert_array_equal(_infer(server, data, "self_async"), data * 2)


def test_timeout_bounds_the_wait(server: ServerProcess) -> None:
    started = time.monotonic()
    with pytest.raises(InferenceServerException) as caught:
        _infer(server, np.ones(2, np.float32), "timeout")
    assert time.monotonic() - started < 5
    # TritonError has no deadline code: the response's error is INTERNAL with the text.
    assert "BLS failed: Deadline Exceeded" in caught.value.message()


def test_pipeline_pre_model_post(server: ServerProcess) -> None:
    data = np.arange(6, dtype=np.float32)
    # pre: +1; model: *2; post: -1.
    np.testing.assert_array_equal(_infer(server, data, "pipeline"), (data + 1) * 2 - 1)


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(field)


def _io_bytes(pid: int) -> int:
    """Bytes the process moved through read/write-like syscalls (pread/pwrite included)."""
    fields = dict(line.split(": ") for line in
                  Path(f"/proc/{pid}/io").read_text().splitlines())
    return int(fields["rchar"]) + int(fields["wchar"])


def test_large_intermediate_tensors_never_pass_through_the_supervisor(
        server: ServerProcess) -> None:
    data = np.arange(4, dtype=np.float32)   # 16 B in, 16 MiB between the steps
    _infer(server, data, "big_pipeline")    # warm: channels open, regions mapped once
    Path(f"/proc/{server.pid}/clear_refs").write_text("5")  # VmHWM := VmRSS
    rss = _status_kib(server.pid, "VmRSS")
    moved = _io_bytes(server.pid)
    np.testing.assert_allclose(_infer(server, data, "big_pipeline"), (data + 1) * 2 - 1)
    moved = _io_bytes(server.pid) - moved
    peak = _status_kib(server.pid, "VmHWM") - rss
    # Three 16 MiB tensors cross between workers (pre's output, double's input and output).
    assert moved < 2 << 20, f"the supervisor read/wrote {moved} bytes"
    assert peak < 8 << 10, f"the supervisor's resident set grew by {peak} KiB"


def test_outputs_kept_by_the_caller_survive_later_calls(server: ServerProcess) -> None:
    """A BLS caller's output regions are reused from call to call: never one whose output
    the model still holds."""
    data = np.arange(5, dtype=np.float32)
    for _ in range(3):
        out = _infer(server, data, "keep")
        sizes = (5, 5, 300_000, 5)
        expected = np.concatenate([np.resize(data + k, size) * 2
                                   for k, size in enumerate(sizes)])
        np.testing.assert_array_equal(out, expected)


def test_async_execute_runs_requests_of_one_instance_concurrently(
        server: ServerProcess) -> None:
    one = 0.4   # each execute awaits this long
    _infer_many(server, "async_sleeper", "", 1)  # warm
    elapsed = _infer_many(server, "async_sleeper", "", 8)
    # One after the other: 3.2 s. Concurrently: about 0.4 s; the bound is generous.
    assert elapsed < 4 * one, f"8 requests took {elapsed:.2f}s on one instance"


def test_chain_rule_counts_held_instances() -> None:
    """The deadlock rule itself (pure logic, no server): a call fails only when every
    instance of its target waits in the chain; entries that are not ours are ignored."""
    import socket

    from shmserve.workers import bls

    left, right = socket.socketpair()
    try:
        client = bls.BlsClient(left, "b", "b_0", 1)
        token = bls.current_chain.set("a|a_0|2,junk,x|y|z")
        try:
            assert client.chain("a", blocking=True) == "a|a_0|2,junk,x|y|z,b|b_0|1"
            bls.current_chain.set("a|a_0|2,a|a_1|2")
            with pytest.raises(bls.BlsError, match=r"all 2 instance\(s\) of it wait .*"
                                                   r"\(a -> a -> b -> a\)"):
                client.chain("a", blocking=True)
            client.concurrent = True
            bls.current_chain.set("")
            assert client.chain("b", blocking=False) == ""  # an awaited call holds nothing
        finally:
            bls.current_chain.reset(token)
    finally:
        left.close()
        right.close()
