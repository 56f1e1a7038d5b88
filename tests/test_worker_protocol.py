"""The supervisor <-> worker frames: typed records, and the protocol version at the handshake
(a real worker process, started the way the scheduler starts one)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from shmserve.daemon.errors import ServeError
from shmserve.daemon.model_config import complete_config, config_to_dict, read_config
from shmserve.daemon.worker_limits import WorkerLimits
from shmserve.daemon.worker_process import WorkerProcess
from shmserve.workers import protocol
from shmserve.workers.backend import InstanceSpec, ModelSpec

IDENTITY = Path(__file__).parent / "models_pybackend" / "identity"


def _spec(owner: str, version: int = protocol.PROTOCOL_VERSION) -> protocol.WorkerSpec:
    config = read_config(IDENTITY)
    complete_config(config, IDENTITY, [])
    return protocol.WorkerSpec(
        model=ModelSpec("identity", 1, config_to_dict(config), str(IDENTITY),
                        str(IDENTITY / "1")),
        instance=InstanceSpec("identity_0_0", "KIND_CPU", 0, 0),
        backend="python", supervisor_pid=os.getpid(), arena_owner=owner,
        protocol_version=version)


def test_records_pack_to_the_arrays_they_unpack_from() -> None:
    records: list[Any] = [
               protocol.Exec(7, [], 1, True), protocol.Cancel(7, 2), protocol.Release([3, 4]),
               protocol.Attach(5, 4096, 1 << 20), protocol.Detach(5), protocol.ShareRegion(6),
               protocol.Stage("model_initialize"), protocol.EndSequences([7, "seq-a"]),
               protocol.Report(1, [["m", "d", "counter", [[[["k", "v"]], 2.0]]]]),
               protocol.Ready(protocol.PROTOCOL_VERSION, 123),
               protocol.InitFailed(protocol.PROTOCOL_VERSION, "INTERNAL", "boom"),
               protocol.Done(7, [protocol.ANSWERED], [[[0], 1, 2, 3]])]
    unpacker = protocol.new_unpacker()
    for record in records:
        unpacker.feed(protocol.encode(record.pack()))
    for record, frame in zip(records, unpacker, strict=True):
        assert frame[0] == record.KIND
        assert type(record).unpack(frame) == record
    request = protocol.ExecRequest("r1", [protocol.packed_inline("X", "FP32", [1], b"abcd")],
                                   [["Y", None]], {"k": 1}, 9, [2, 3])
    assert protocol.packed_exec_request("r1", request.inputs, request.outputs,
                                        request.parameters, 9, [2, 3]) == request.pack()
    assert protocol.ExecRequest.unpack(request.pack()) == request
    assert protocol.error_result("CANCELLED", "gone") == [protocol.RESULT_ERROR, "CANCELLED",
                                                          "gone"]


async def _run_worker(spec: protocol.WorkerSpec) -> protocol.Done | BaseException:
    worker = WorkerProcess(spec, spec.instance.name, lambda w, reason: None)
    try:
        await worker.start(WorkerLimits())
        answered: asyncio.Future[protocol.Done | BaseException] = \
            asyncio.get_running_loop().create_future()
        data = np.arange(4, dtype=np.float32).tobytes()
        request = protocol.packed_exec_request(
            "r1", [protocol.packed_inline("INPUT0", "FP32", [4], data)], [["OUTPUT0", None]],
            {}, 0, None)
        worker.execute([request], 0, False, answered.set_result)
        return await asyncio.wait_for(answered, 30)
    finally:
        await worker.stop(10.0)


def test_a_worker_answers_typed_frames() -> None:
    done = asyncio.run(_run_worker(_spec("tproto_ok")))
    assert isinstance(done, protocol.Done)
    [result] = done.results
    assert result[0] == protocol.RESULT_OK
    [output] = result[1]
    ref = protocol.TensorRef.unpack(output)
    assert (ref.name, ref.datatype, ref.shape, ref.where) == ("OUTPUT0", "FP32", [4],
                                                              protocol.INLINE)
    assert np.frombuffer(ref.location, np.float32).tolist() == [0.0, 1.0, 2.0, 3.0]
    [[indices, *timings]] = done.executions
    assert indices == [0] and all(t >= 0 for t in timings)


def test_a_protocol_mismatch_fails_the_start_naming_both_versions() -> None:
    with pytest.raises(ServeError) as caught:
        asyncio.run(_run_worker(_spec("tproto_bad", version=protocol.PROTOCOL_VERSION + 97)))
    message = caught.value.message
    assert f"protocol version {protocol.PROTOCOL_VERSION + 97}" in message
    assert f"this side {protocol.PROTOCOL_VERSION}" in message
