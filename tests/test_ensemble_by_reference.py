"""Ensemble intermediates pass by reference (issue 16, "tensors pass by reference").

A step whose model returns its input (or a contiguous part of it) as an output that another
step reads is answered by its worker as a reference to that input's memory (a client region
or another intermediate region) instead of being copied into the intermediate region the
ensemble gave it. Measured as the pages the ensemble's intermediate memfds hold: a copied
16 MiB intermediate fills 4,096 pages of one, a referenced one none.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.utils.shared_memory as shm

from shmserve.tests.conftest import StartServer
from shmserve.tests.test_ensemble import ensemble_config, model_config, step, write

MIB = 1 << 20
PASS_THROUGH = """
    import triton_python_backend_utils as pb_utils

    class TritonPythonModel:
        def execute(self, requests):
            return [pb_utils.InferenceResponse([pb_utils.Tensor(
                "OUTPUT0", pb_utils.get_input_tensor_by_name(r, "INPUT0").as_numpy()[SLICE])])
                for r in requests]
"""
DOUBLE = """
    import triton_python_backend_utils as pb_utils

    class TritonPythonModel:
        def execute(self, requests):
            return [pb_utils.InferenceResponse([pb_utils.Tensor(
                "OUTPUT0", pb_utils.get_input_tensor_by_name(r, "INPUT0").as_numpy() * 2)])
                for r in requests]
"""


def _intermediate_bytes(pid: int) -> int:
    """Bytes of memory the ensemble's intermediate regions hold (pages written)."""
    total = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        path = f"/proc/{pid}/fd/{fd}"
        try:
            if "shmserve_ensemble_" in os.readlink(path):
                total += os.stat(path).st_blocks * 512
        except OSError:
            continue
    return total


def _repository(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    repo.mkdir()
    write(repo, "identity", model_config("identity"), PASS_THROUGH.replace("[SLICE]", ""))
    write(repo, "tail", model_config("tail"), PASS_THROUGH.replace("SLICE", "1:"))
    write(repo, "double", model_config("double"), DOUBLE)
    write(repo, "identity3", ensemble_config("identity3", [
        step("identity", {"INPUT0": "IN"}, {"OUTPUT0": "t1"}),
        step("tail", {"INPUT0": "t1"}, {"OUTPUT0": "t2"}),
        step("identity", {"INPUT0": "t2"}, {"OUTPUT0": "OUT"}),
    ]))
    write(repo, "computed", ensemble_config("computed", [
        step("double", {"INPUT0": "IN"}, {"OUTPUT0": "t1"}),
        step("identity", {"INPUT0": "t1"}, {"OUTPUT0": "t2"}),
        step("tail", {"INPUT0": "t2"}, {"OUTPUT0": "OUT"}),
    ]))
    return repo


def test_passed_through_intermediates_are_not_copied(start_server: StartServer,
                                                     tmp_path: Path) -> None:
    server = start_server(None, repository=_repository(tmp_path))
    data = np.random.default_rng(3).random(4 * MIB, dtype=np.float32)  # 16 MiB
    size = data.nbytes
    key = f"/shmserve_byref_{server.pid}"
    handle = shm.create_shared_memory_region("byref", key, 2 * size, create_only=True)
    client = grpcclient.InferenceServerClient(server.url)
    try:
        shm.set_shared_memory_region(handle, [data])
        client.register_system_shared_memory("byref", key, 2 * size)
        tensor = grpcclient.InferInput("IN", [data.size], "FP32")
        tensor.set_shared_memory("byref", size)
        out = grpcclient.InferRequestedOutput("OUT")
        out.set_shared_memory("byref", size, offset=size)
        for _ in range(2):
            client.infer("identity3", [tensor], outputs=[out])
            got = shm.get_contents_as_numpy(handle, np.float32, [data.size - 1], offset=size)
            np.testing.assert_array_equal(got, data[1:])
        # Inputs and outputs in the client's region: both intermediates referenced it.
        assert _intermediate_bytes(server.pid) < MIB

        # As gRPC payload: the first step's input is in an arena slot, which is reused once
        # its request ends, so t1 is copied into an intermediate region once; t2 refers to it.
        # With frontend processes the payload arrives in the frontend's private region, which
        # the ensemble request holds to its end: both intermediates refer to it, no copy.
        payload = grpcclient.InferInput("IN", [data.size], "FP32")
        payload.set_data_from_numpy(data)
        answer = client.infer("identity3", [payload]).as_numpy("OUT")
        np.testing.assert_array_equal(answer, data[1:])
        held = _intermediate_bytes(server.pid)
        if os.environ.get("SHMSERVE_GRPC_FRONTENDS", "1") == "1":
            assert size <= held < size + MIB, held
        else:
            assert held < MIB, held

        # A step that computes its output (double) writes it; its readers refer to it.
        answer = client.infer("computed", [payload]).as_numpy("OUT")
        np.testing.assert_array_equal(answer, data[1:] * 2)
        assert _intermediate_bytes(server.pid) < held + size + MIB
        client.unregister_system_shared_memory("byref")
    finally:
        client.close()
        shm.destroy_shared_memory_region(handle)


def test_a_large_payload_through_a_frontend_process(start_server: StartServer,
                                                     tmp_path: Path) -> None:
    """With --grpc-frontends 2 a large payload reaches the core in the frontend's private
    region, unregistered by name once the request is accepted: the ensemble's steps still
    read it (they were refused with "Unable to find shared memory region" before)."""
    server = start_server(None, "--grpc-frontends", "2", repository=_repository(tmp_path))
    data = np.random.default_rng(5).random(4 * MIB, dtype=np.float32)  # 16 MiB
    with grpcclient.InferenceServerClient(server.url) as client:
        payload = grpcclient.InferInput("IN", [data.size], "FP32")
        payload.set_data_from_numpy(data)
        for model, factor in (("identity3", 1), ("computed", 2)):
            answer = client.infer(model, [payload]).as_numpy("OUT")
            np.testing.assert_array_equal(answer, data[1:] * factor)
