"""Hardening (issue 21) beyond the security items: big BYTES requests do not stall the event
loop, error texts stay bounded. Real servers, tritonclient as the client."""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from shmserve.daemon.errors import MAX_MESSAGE_CHARS
from shmserve.protos import shmserve_service_pb2 as pb
from shmserve.protos.datatypes import MAX_BYTES_ELEMENTS
from shmserve.tests.serverproc import (
    ServerProcess,
    arena_segments,
    build_repository,
    is_frontend,
)
from shmserve.workers.lineage import SUPERVISOR_ENV

StartServer = Callable[..., ServerProcess]


def _zero_length_bytes_request(elements: int, shape_elements: int) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="string_upper")
    request.inputs.add(name="TEXT", datatype="BYTES", shape=[1, shape_elements])
    request.raw_input_contents.append(struct.pack("<I", 0) * elements)
    return request


def _infer(server: ServerProcess, request: pb.ModelInferRequest) -> grpc.RpcError | None:
    with grpc.insecure_channel(server.url, options=[
            ("grpc.max_send_message_length", -1),
            ("grpc.max_receive_message_length", -1)]) as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                                   request_serializer=lambda m: m.SerializeToString(),
                                   response_deserializer=pb.ModelInferResponse.FromString)
        try:
            call(request, timeout=120)
        except grpc.RpcError as exc:
            return exc
    return None


def test_a_huge_bytes_request_does_not_stall_other_rpcs(start_server: StartServer) -> None:
    """8M zero-length elements (32 MiB), one too many for the shape: the supervisor parsed
    them on its loop for seconds; now the worker does, and other RPCs answer meanwhile."""
    server = start_server(["simple", "string_upper"])
    elements = 8 << 20
    request = _zero_length_bytes_request(elements, elements - 1)
    outcome: list[grpc.RpcError | None] = []
    big = threading.Thread(target=lambda: outcome.append(_infer(server, request)))
    client = grpcclient.InferenceServerClient(server.url)
    slowest = 0.0
    try:
        big.start()
        while big.is_alive():
            started = time.monotonic()
            assert client.is_server_live()
            slowest = max(slowest, time.monotonic() - started)
            time.sleep(0.01)
    finally:
        big.join(120)
        client.close()
    error = outcome[0]
    assert error is not None and error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
    assert "malformed BYTES data for inference input 'TEXT'" in error.details()
    # A liveness probe is a few ms; the old on-loop parse held every RPC for ~4 s.
    assert slowest < 1.5, f"a ServerLive call took {slowest:.2f} s during the big request"


def test_bytes_elements_per_tensor_are_capped(start_server: StartServer) -> None:
    server = start_server(["string_upper"])
    count = MAX_BYTES_ELEMENTS + 1
    error = _infer(server, _zero_length_bytes_request(count, count))
    assert error is not None and error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
    assert error.details() == (f"BYTES input 'TEXT' for model 'string_upper' has {count} "
                               f"elements, more than the {MAX_BYTES_ELEMENTS} allowed per tensor")


def test_error_texts_are_bounded(start_server: StartServer) -> None:
    """A 10,000-character model name, or 10,000 inputs listed in an error, used to pass the
    client's metadata limit: the client saw RESOURCE_EXHAUSTED instead of the error."""
    server = start_server(["simple"])
    client = grpcclient.InferenceServerClient(server.url)
    try:
        with pytest.raises(InferenceServerException) as info:
            client.get_model_metadata("m" * 10_000)
        assert info.value.status() == "StatusCode.NOT_FOUND"
        assert len(info.value.message()) <= MAX_MESSAGE_CHARS + 40
        assert "characters cut" in info.value.message()

        inputs = []
        for _ in range(10_000):  # INPUT1 missing: the error lists the inputs it got
            tensor = grpcclient.InferInput("INPUT0", [1, 16], "INT32")
            tensor.set_data_from_numpy(np.zeros((1, 16), np.int32))
            inputs.append(tensor)
        with pytest.raises(InferenceServerException) as info:
            client.infer("simple", inputs)
        assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert info.value.message().startswith("expected")
        assert len(info.value.message()) <= MAX_MESSAGE_CHARS + 40
    finally:
        client.close()


# --- 6. nothing outlives a SIGKILLed supervisor ----------------------------------------------
def descendants(pid: int) -> set[int]:
    found: set[int] = set()
    pending = [pid]
    while pending:
        parent = pending.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                children = Path(f"/proc/{parent}/task/{task}/children").read_text().split()
            except OSError:
                continue
            for child in map(int, children):
                if child not in found:
                    found.add(child)
                    pending.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_a_sigkilled_supervisor_leaves_no_process_behind(start_server: StartServer,
                                                          tmp_path: Path) -> None:
    """A worker busy in execute and a SIGSTOPped one used to stay alive (reparented to pid 1)
    with the fork server and the resource tracker."""
    repository = build_repository(tmp_path / "repo", ["simple", "sleeper"])
    server = start_server(repository=repository)
    children = descendants(server.pid)
    fork_server = next(pid for pid in children if descendants(pid))
    workers = [pid for pid in descendants(fork_server) if not is_frontend(pid)]
    assert len(workers) == 2 and len(children) >= 4, children  # + tracker, fork server
    busy = threading.Thread(target=_sleep_request, args=(server, 60.0), daemon=True)
    busy.start()
    time.sleep(1.0)  # the sleeper is now inside execute
    stopped = min(workers)
    os.kill(stopped, signal.SIGSTOP)
    os.kill(server.pid, signal.SIGKILL)
    server.process.wait(10)
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in children) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [pid for pid in children if alive(pid)] == []
    # the next start removes the dead server's arenas
    again = start_server(repository=repository)
    assert arena_segments(server.pid) == []
    assert again.process.poll() is None


def _sleep_request(server: ServerProcess, seconds: float) -> None:
    client = grpcclient.InferenceServerClient(server.url)
    tensor = grpcclient.InferInput("SECONDS", [1], "FP32")
    tensor.set_data_from_numpy(np.array([seconds], np.float32))
    try:
        client.infer("sleeper", [tensor], client_timeout=seconds + 30)
    except InferenceServerException:
        pass
    finally:
        client.close()


def test_a_new_start_ends_what_a_dead_server_left(start_server: StartServer) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    leftover = subprocess.Popen(["sleep", "300"],
                                env=dict(os.environ, **{SUPERVISOR_ENV: str(dead.pid)}))
    bystander = subprocess.Popen(["sleep", "300"])  # not marked: not ours to end
    try:
        server = start_server(["simple"])
        assert leftover.wait(10) == -signal.SIGKILL
        assert bystander.poll() is None
        # Any server starting meanwhile (a parallel test run) may be the one that ended it.
        line = f"ended 1 process(es) left by dead shmserve server(s): {leftover.pid}"
        assert line in server.log() or _another_server_running(server.pid)
    finally:
        for process in (leftover, bystander):
            process.kill()
            process.wait()


def _another_server_running(own: int) -> bool:
    """Whether another shmserve supervisor runs on this host (it may have ended the leftover)."""
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != own:
            try:
                command = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if b"shmserve" in command and b"serve\x00--model-repository" in command:
                return True
    return False
