"""Ensembles on a real server (issue 16 item 3): a pre-process -> model -> post-process
pipeline, independent steps in parallel, Triton's validation texts one by one, readiness
and explicit loading of composing models, statistics for the ensemble and its steps."""

from __future__ import annotations

import queue
import shutil
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from shmserve.tests.conftest import StartServer
from shmserve.tests.serverproc import ServerProcess

MODELS_DIR = Path(__file__).parent / "models"

ARITHMETIC_MODEL = """
    import time
    import numpy as np
    import triton_python_backend_utils as pb_utils

    class TritonPythonModel:
        def initialize(self, args):
            import json
            params = json.loads(args["model_config"]).get("parameters", {})
            self.add = float(params.get("add", {}).get("string_value", "0"))
            self.mul = float(params.get("mul", {}).get("string_value", "1"))
            self.sleep = float(params.get("sleep", {}).get("string_value", "0"))

        def execute(self, requests):
            time.sleep(self.sleep)
            return [pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(
                "OUTPUT0", ((pb_utils.get_input_tensor_by_name(r, "INPUT0").as_numpy() + self.add)
                            * self.mul).astype(np.DTYPE))]) for r in requests]
"""


def model_config(name: str, *, add: float = 0, mul: float = 1, sleep: float = 0,
                 dims: str = "-1", data_type: str = "TYPE_FP32") -> str:
    return f"""
        name: "{name}"
        backend: "python"
        max_batch_size: 0
        input [ {{ name: "INPUT0", data_type: {data_type}, dims: [ {dims} ] }} ]
        output [ {{ name: "OUTPUT0", data_type: {data_type}, dims: [ {dims} ] }} ]
        parameters {{ key: "add" value: {{ string_value: "{add}" }} }}
        parameters {{ key: "mul" value: {{ string_value: "{mul}" }} }}
        parameters {{ key: "sleep" value: {{ string_value: "{sleep}" }} }}
    """


def write(repo: Path, name: str, config: str, model_py: str | None = None) -> None:
    folder = repo / name
    (folder / "1").mkdir(parents=True)
    (folder / "config.pbtxt").write_text(textwrap.dedent(config))
    if model_py is not None:
        (folder / "1" / "model.py").write_text(textwrap.dedent(model_py))


def step(model: str, inputs: dict[str, str], outputs: dict[str, str]) -> str:
    ins = " ".join(f'input_map {{ key: "{k}" value: "{v}" }}' for k, v in inputs.items())
    outs = " ".join(f'output_map {{ key: "{k}" value: "{v}" }}' for k, v in outputs.items())
    return f'{{ model_name: "{model}" model_version: -1 {ins} {outs} }}'


def ensemble_config(name: str, steps: list[str], *, inputs: str = "IN", outputs: str = "OUT",
                    data_type: str = "TYPE_FP32", dims: str = "-1") -> str:
    ins = ", ".join(f'{{ name: "{n}", data_type: {data_type}, dims: [ {dims} ] }}'
                    for n in inputs.split(","))
    outs = ", ".join(f'{{ name: "{n}", data_type: TYPE_FP32, dims: [ -1 ] }}'
                     for n in outputs.split(","))
    return f"""
        name: "{name}"
        platform: "ensemble"
        max_batch_size: 0
        input [ {ins} ]
        output [ {outs} ]
        ensemble_scheduling {{ step [ {", ".join(steps)} ] }}
    """


def arithmetic(repo: Path, name: str, **kwargs: object) -> None:
    dtype = "int32" if kwargs.get("data_type") == "TYPE_INT32" else "float32"
    write(repo, name, model_config(name, **kwargs),  # type: ignore[arg-type]
          ARITHMETIC_MODEL.replace("DTYPE", dtype))


@pytest.fixture
def repository(tmp_path: Path) -> Iterator[Path]:
    repo = tmp_path / "repo"
    repo.mkdir()
    arithmetic(repo, "pre", add=1)
    arithmetic(repo, "mid", mul=2)
    arithmetic(repo, "post", add=-3)
    arithmetic(repo, "side", mul=10)
    write(repo, "pipeline", ensemble_config("pipeline", [
        step("post", {"INPUT0": "t2"}, {"OUTPUT0": "OUT"}),     # listed first, runs last
        step("pre", {"INPUT0": "IN"}, {"OUTPUT0": "t1"}),
        step("mid", {"INPUT0": "t1"}, {"OUTPUT0": "t2"}),
        step("side", {"INPUT0": "t1"}, {"OUTPUT0": "SIDE"}),
    ], outputs="OUT,SIDE"))
    yield repo


def infer(client: grpcclient.InferenceServerClient, model: str, data: np.ndarray,
          outputs: list[str]) -> dict[str, np.ndarray]:
    tensor = grpcclient.InferInput("IN", list(data.shape), "FP32")
    tensor.set_data_from_numpy(data)
    result = client.infer(model, [tensor])
    return {name: result.as_numpy(name) for name in outputs}


def explicit(start_server: StartServer, repo: Path) -> ServerProcess:
    return start_server(None, "--model-control-mode", "explicit", repository=repo)


def test_pipeline_ensemble_answers_and_loads_its_steps(start_server: StartServer,
                                                      repository: Path) -> None:
    server = explicit(start_server, repository)
    client = grpcclient.InferenceServerClient(server.url)
    client.load_model("pipeline")
    for model in ("pre", "mid", "post", "side", "pipeline"):
        assert client.is_model_ready(model), model
    data = np.array([1.0, 2.5, -4.0], dtype=np.float32)
    got = infer(client, "pipeline", data, ["OUT", "SIDE"])
    np.testing.assert_allclose(got["OUT"], (data + 1) * 2 - 3)
    np.testing.assert_allclose(got["SIDE"], (data + 1) * 10)
    big = np.arange(100_000, dtype=np.float32)  # above the inline limit: through the arenas
    np.testing.assert_allclose(infer(client, "pipeline", big, ["OUT"])["OUT"],
                               (big + 1) * 2 - 3)

    stats = client.get_inference_statistics("pipeline", as_json=True)["model_stats"][0]
    assert int(stats["inference_count"]) == 2
    assert int(stats["execution_count"]) == 2
    inference = stats["inference_stats"]
    assert int(inference["success"]["count"]) == 2
    # As Triton reports an ensemble (perf_analyzer finds the model version it measured by
    # the queue count that grew): a queue entry per request, and the composing models'
    # compute durations summed as the ensemble's own.
    summed = dict.fromkeys(("compute_input", "compute_infer", "compute_output"), 0)
    for model in ("pre", "mid", "post", "side"):
        step_stats = client.get_inference_statistics(model, as_json=True)["model_stats"][0]
        assert int(step_stats["inference_stats"]["success"]["count"]) == 2, model
        for key in summed:
            summed[key] += int(step_stats["inference_stats"][key]["ns"])
    assert int(inference["queue"]["count"]) == 2
    for key, total in summed.items():
        assert int(inference[key]["count"]) == 2, key
        assert int(inference[key]["ns"]) == total, key
    assert [int(b["batch_size"]) for b in stats["batch_stats"]] == [1]

    client.unload_model("mid")
    deadline = time.monotonic() + 10
    while client.is_model_ready("pipeline") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not client.is_model_ready("pipeline"), "ready although a composing model is gone"
    with pytest.raises(InferenceServerException) as info:
        infer(client, "pipeline", data, ["OUT"])
    assert "mid" in str(info.value.message())


def test_independent_steps_run_in_parallel(start_server: StartServer, tmp_path: Path) -> None:
    repo = tmp_path / "par"
    repo.mkdir()
    arithmetic(repo, "slow_a", add=1, sleep=1.0)
    arithmetic(repo, "slow_b", add=2, sleep=1.0)
    write(repo, "fan_out", ensemble_config("fan_out", [
        step("slow_a", {"INPUT0": "IN"}, {"OUTPUT0": "A"}),
        step("slow_b", {"INPUT0": "IN"}, {"OUTPUT0": "B"}),
    ], outputs="A,B"))
    server = start_server(None, repository=repo)
    client = grpcclient.InferenceServerClient(server.url)
    data = np.zeros(2, np.float32)
    started = time.monotonic()
    got = infer(client, "fan_out", data, ["A", "B"])
    elapsed = time.monotonic() - started
    np.testing.assert_allclose(got["A"], [1, 1])
    np.testing.assert_allclose(got["B"], [2, 2])
    assert elapsed < 1.8, f"two 1 s steps took {elapsed:.2f} s: not run in parallel"


BAD_ENSEMBLES = {
    "bad_unknown": (
        [step("nowhere", {"INPUT0": "IN"}, {"OUTPUT0": "OUT"})],
        {}, "ensemble 'bad_unknown' depends on 'nowhere' which has no loaded version"),
    "bad_cycle": (
        [step("pre", {"INPUT0": "t2"}, {"OUTPUT0": "t1"}),
         step("mid", {"INPUT0": "t1"}, {"OUTPUT0": "t2"}),
         step("post", {"INPUT0": "IN"}, {"OUTPUT0": "OUT"})],
        {}, "ensemble tensor t1 is redundant as no data will be written to it for ensemble "
            "bad_cycle"),
    "bad_twice": (
        [step("pre", {"INPUT0": "IN"}, {"OUTPUT0": "OUT"}),
         step("mid", {"INPUT0": "IN"}, {"OUTPUT0": "OUT"})],
        {}, "ensemble tensor OUT can appear in an output map only once for ensemble bad_twice"),
    "bad_unmapped_output": (
        [step("pre", {"INPUT0": "IN"}, {"OUTPUT0": "t1"}),
         step("mid", {"INPUT0": "t1"}, {"OUTPUT0": "OTHER"})],
        {}, "must map ensemble output OUT for ensemble bad_unmapped_output"),
    "bad_input_name": (
        [step("pre", {"INPUT9": "IN"}, {"OUTPUT0": "OUT"})],
        {}, "in ensemble bad_input_name, ensemble tensor IN is mapping to non-existing input "
            "INPUT9 in model pre"),
    "bad_dtype": (
        [step("pre", {"INPUT0": "IN"}, {"OUTPUT0": "OUT"})],
        {"data_type": "TYPE_INT32"},
        "in ensemble bad_dtype, ensemble tensor IN: inconsistent data type: TYPE_INT32 is "
        "inferred from model bad_dtype while TYPE_FP32 is inferred from model pre"),
    "bad_shape": (
        [step("fixed4", {"INPUT0": "IN"}, {"OUTPUT0": "OUT"})],
        {"dims": "3"},
        "in ensemble bad_shape, ensemble tensor IN: inconsistent shape: [3] is inferred from "
        "model bad_shape while [4] is inferred from model fixed4"),
}


def test_ensemble_validation_errors(start_server: StartServer, repository: Path) -> None:
    arithmetic(repository, "fixed4", dims="4")
    for name, (steps, options, _) in BAD_ENSEMBLES.items():
        write(repository, name, ensemble_config(name, steps, **options))  # type: ignore[arg-type]
    server = explicit(start_server, repository)
    client = grpcclient.InferenceServerClient(server.url)
    for name, (_, _, expected) in BAD_ENSEMBLES.items():
        with pytest.raises(InferenceServerException) as info:
            client.load_model(name)
        assert expected in str(info.value.message()), (name, info.value.message())
        assert not client.is_model_ready(name)
    client.load_model("pipeline")  # the good one still loads next to them
    assert client.is_model_ready("pipeline")


PICKY_MODEL = """
    import triton_python_backend_utils as pb_utils

    class TritonPythonModel:
        def execute(self, requests):
            responses = []
            for r in requests:
                data = pb_utils.get_input_tensor_by_name(r, "INPUT0").as_numpy()
                if (data < 0).any():
                    responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(
                        "negative values are not allowed")))
                else:
                    responses.append(pb_utils.InferenceResponse(
                        output_tensors=[pb_utils.Tensor("OUTPUT0", data)]))
            return responses
"""


def test_step_errors_and_bad_requests_get_tritons_texts(start_server: StartServer,
                                                        repository: Path) -> None:
    write(repository, "picky", model_config("picky"), PICKY_MODEL)
    write(repository, "guarded", ensemble_config("guarded", [
        step("pre", {"INPUT0": "IN"}, {"OUTPUT0": "t1"}),
        step("picky", {"INPUT0": "t1"}, {"OUTPUT0": "OUT"}),
    ]))
    server = start_server(None, repository=repository)
    client = grpcclient.InferenceServerClient(server.url)
    np.testing.assert_allclose(infer(client, "guarded", np.array([1.0], np.float32),
                                     ["OUT"])["OUT"], [2.0])
    with pytest.raises(InferenceServerException) as info:
        infer(client, "guarded", np.array([-5.0], np.float32), ["OUT"])
    assert "negative values are not allowed" in str(info.value.message())
    wrong = grpcclient.InferInput("IN", [1], "INT32")
    wrong.set_data_from_numpy(np.array([1], np.int32))
    with pytest.raises(InferenceServerException) as info:
        client.infer("guarded", [wrong])
    assert str(info.value.message()) == ("inference input 'IN' data-type is 'INT32', but model "
                                         "'guarded' expects 'FP32'")
    stats = client.get_inference_statistics("guarded", as_json=True)["model_stats"][0]
    assert int(stats["inference_stats"]["success"]["count"]) == 1
    assert int(stats["inference_stats"]["fail"]["count"]) == 1
    # The ensemble keeps serving after a failed step.
    np.testing.assert_allclose(infer(client, "guarded", np.array([3.0], np.float32),
                                     ["OUT"])["OUT"], [4.0])


def test_ensemble_inputs_and_outputs_in_client_shared_memory(start_server: StartServer,
                                                            repository: Path) -> None:
    import tritonclient.utils.shared_memory as shm
    server = start_server(None, repository=repository)
    client = grpcclient.InferenceServerClient(server.url)
    data = np.arange(50_000, dtype=np.float32)
    size = data.nbytes
    key = f"/shmserve_ens_test_{server.pid}"
    handle = shm.create_shared_memory_region("ens", key, 3 * size, create_only=True)
    try:
        shm.set_shared_memory_region(handle, [data])
        client.register_system_shared_memory("ens_region", key, 3 * size)
        tensor = grpcclient.InferInput("IN", [data.size], "FP32")
        tensor.set_shared_memory("ens_region", size)
        out = grpcclient.InferRequestedOutput("OUT")
        out.set_shared_memory("ens_region", size, offset=size)
        side = grpcclient.InferRequestedOutput("SIDE")
        side.set_shared_memory("ens_region", size, offset=2 * size)
        client.infer("pipeline", [tensor], outputs=[out, side])
        got = shm.get_contents_as_numpy(handle, np.float32, [data.size], offset=size)
        np.testing.assert_allclose(got, (data + 1) * 2 - 3)
        got_side = shm.get_contents_as_numpy(handle, np.float32, [data.size], offset=2 * size)
        np.testing.assert_allclose(got_side, (data + 1) * 10)
        client.unregister_system_shared_memory("ens_region")
    finally:
        shm.destroy_shared_memory_region(handle)


BLS_PIPELINE_MODEL = """
    import triton_python_backend_utils as pb_utils


    class TritonPythonModel:
        def execute(self, requests):
            responses = []
            for request in requests:
                tensor = pb_utils.Tensor("INPUT0", pb_utils.get_input_tensor_by_name(
                    request, "IN").as_numpy())
                for model in ("pre", "mid", "post"):
                    answer = pb_utils.InferenceRequest(
                        model_name=model, inputs=[tensor],
                        requested_output_names=["OUTPUT0"]).exec()
                    if answer.has_error():
                        raise pb_utils.TritonModelException(answer.error().message())
                    tensor = pb_utils.Tensor("INPUT0", pb_utils.get_output_tensor_by_name(
                        answer, "OUTPUT0").as_numpy())
                responses.append(pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor("OUT", tensor.as_numpy())]))
            return responses
"""


def test_the_same_pipeline_as_an_ensemble_and_as_bls_answers_alike(
        start_server: StartServer, repository: Path) -> None:
    """pre -> mid -> post, once as ensemble steps in the core, once as BLS calls from a
    model: the same answers, small and above the inline limit."""
    write(repository, "bls_pipeline", """
        name: "bls_pipeline"
        backend: "python"
        max_batch_size: 0
        input [ { name: "IN", data_type: TYPE_FP32, dims: [ -1 ] } ]
        output [ { name: "OUT", data_type: TYPE_FP32, dims: [ -1 ] } ]
    """, BLS_PIPELINE_MODEL)
    server = start_server(None, repository=repository)
    client = grpcclient.InferenceServerClient(server.url)
    try:
        for data in (np.array([1.0, 2.5, -4.0], dtype=np.float32),
                     np.linspace(-1, 1, 100_000, dtype=np.float32)):
            ensemble = infer(client, "pipeline", data, ["OUT"])["OUT"]
            bls = infer(client, "bls_pipeline", data, ["OUT"])["OUT"]
            np.testing.assert_array_equal(ensemble, bls)
            np.testing.assert_allclose(bls, (data + 1) * 2 - 3)
    finally:
        client.close()


GROW_MODEL = """
    import numpy as np
    import triton_python_backend_utils as pb_utils

    class TritonPythonModel:
        def execute(self, requests):
            # 4 values in, 16 MiB out: each value repeated 1 Mi times.
            return [pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(
                "OUTPUT0", np.repeat(pb_utils.get_input_tensor_by_name(r, "INPUT0").as_numpy(),
                                     1 << 20))]) for r in requests]
"""

SHRINK_MODEL = """
    import numpy as np
    import triton_python_backend_utils as pb_utils

    class TritonPythonModel:
        def execute(self, requests):
            # 16 MiB in, 4 values out: the sum of each quarter.
            return [pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(
                "OUTPUT0", pb_utils.get_input_tensor_by_name(r, "INPUT0").as_numpy()
                .reshape(4, -1).sum(axis=1, dtype=np.float32))]) for r in requests]
"""


def _io_bytes(pid: int) -> int:
    """Bytes the process moved through read/write-like syscalls (pread/pwrite included)."""
    fields = dict(line.split(": ") for line in
                  Path(f"/proc/{pid}/io").read_text().splitlines())
    return int(fields["rchar"]) + int(fields["wchar"])


def test_large_intermediate_tensors_go_from_worker_to_worker_by_reference(
        start_server: StartServer, tmp_path: Path) -> None:
    """16 B in, 16 MiB between grow -> mid -> shrink (two intermediates), 16 B out: the
    supervisor moves none of the intermediate bytes (it used to pread and pwrite each)."""
    repo = tmp_path / "repo"
    repo.mkdir()
    write(repo, "grow", model_config("grow"), GROW_MODEL)
    arithmetic(repo, "mid", mul=2)
    write(repo, "shrink", model_config("shrink"), SHRINK_MODEL)
    write(repo, "big_pipeline", ensemble_config("big_pipeline", [
        step("grow", {"INPUT0": "IN"}, {"OUTPUT0": "wide"}),
        step("mid", {"INPUT0": "wide"}, {"OUTPUT0": "doubled"}),
        step("shrink", {"INPUT0": "doubled"}, {"OUTPUT0": "OUT"}),
    ]))
    server = start_server(None, repository=repo)
    data = np.array([1.0, 2.0, 3.0, 4.0], dtype=np.float32)
    with grpcclient.InferenceServerClient(server.url) as client:
        infer(client, "big_pipeline", data, ["OUT"])  # warm: regions mapped once per worker
        moved = _io_bytes(server.pid)
        got = infer(client, "big_pipeline", data, ["OUT"])["OUT"]
        moved = _io_bytes(server.pid) - moved
        np.testing.assert_allclose(got, data * 2 * (1 << 20))
        assert moved < 2 << 20, f"the supervisor read/wrote {moved} bytes"
        # Several runs at once each get their own regions.
        results = []
        threads = [threading.Thread(target=lambda k=k: results.append(
            (k, infer(client, "big_pipeline", data + k, ["OUT"])["OUT"]))) for k in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(results) == 4
        for k, out in results:
            np.testing.assert_allclose(out, (data + k) * 2 * (1 << 20))


def test_ensemble_with_a_decoupled_step_streams_its_responses(
        start_server: StartServer, tmp_path: Path) -> None:
    """pre (+1) -> repeat_ms (decoupled: one response per element) -> post (*10): every
    response of the decoupled step flows through post and out of the ensemble as its own
    response on the stream; the final flag comes once the step sent its own."""
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copytree(MODELS_DIR / "repeat_ms", repo / "repeat_ms")
    arithmetic(repo, "pre", add=1, data_type="TYPE_INT32")
    arithmetic(repo, "post", mul=10, data_type="TYPE_INT32")
    write(repo, "streaming", """
        name: "streaming"
        platform: "ensemble"
        max_batch_size: 0
        input [ { name: "IN", data_type: TYPE_INT32, dims: [ -1 ] },
                { name: "DELAY", data_type: TYPE_INT32, dims: [ 1 ] } ]
        output [ { name: "OUT", data_type: TYPE_INT32, dims: [ -1 ] },
                 { name: "IDX", data_type: TYPE_INT32, dims: [ 1 ] } ]
        ensemble_scheduling { step [ """ + ", ".join([
        step("pre", {"INPUT0": "IN"}, {"OUTPUT0": "t1"}),
        step("repeat_ms", {"IN": "t1", "DELAY_MS": "DELAY"}, {"OUT": "each", "IDX": "IDX"}),
        step("post", {"INPUT0": "each"}, {"OUTPUT0": "OUT"})]) + " ] }\n")
    server = start_server(None, repository=repo)
    values = np.array([3, 4, 5], dtype=np.int32)
    inputs = [grpcclient.InferInput("IN", [3], "INT32"), grpcclient.InferInput("DELAY", [1],
                                                                              "INT32")]
    inputs[0].set_data_from_numpy(values)
    inputs[1].set_data_from_numpy(np.array([50], dtype=np.int32))
    results: queue.Queue[object] = queue.Queue()
    client = grpcclient.InferenceServerClient(server.url)
    try:
        assert client.get_model_config("streaming").config.model_transaction_policy.decoupled
        with pytest.raises(InferenceServerException) as refused:  # unary: Triton's text
            client.infer("streaming", inputs)
        assert "doesn't support models with decoupled transaction policy" \
            in str(refused.value.message())
        client.start_stream(callback=lambda result, error: results.put(
            error if error is not None else result))
        client.async_stream_infer("streaming", inputs, request_id="s1",
                                  enable_empty_final_response=True)
        got = []
        while True:
            result = results.get(timeout=20)
            assert not isinstance(result, InferenceServerException), result
            got.append(result)
            response = result.get_response()  # type: ignore[attr-defined]
            if response.parameters["triton_final_response"].bool_param:
                break
        client.stop_stream()
    finally:
        client.close()
    assert len(got) == 4
    streamed = sorted((int(r.as_numpy("IDX")[0]),  # type: ignore[attr-defined]
                       r.as_numpy("OUT").tolist()) for r in got[:3])  # type: ignore[attr-defined]
    assert streamed == [(0, [40]), (1, [50]), (2, [60])]
    assert got[3].get_response().outputs == []  # type: ignore[attr-defined]
    with grpcclient.InferenceServerClient(server.url) as stats:
        post = stats.get_inference_statistics("post", as_json=True)["model_stats"][0]
        assert int(post["inference_stats"]["success"]["count"]) == 3  # once per response
        ensemble = stats.get_inference_statistics("streaming").model_stats[0]
    by_index = ensemble.response_stats  # the ensemble's own responses, as a decoupled model's
    assert [by_index[str(i)].success.count for i in range(3)] == [1, 1, 1]
    assert by_index["3"].empty_response.count == 1
    assert ensemble.inference_stats.success.count == 1


COMBINE_MODEL = """
    import numpy as np
    import triton_python_backend_utils as pb_utils

    class TritonPythonModel:
        def execute(self, requests):
            return [pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(
                "OUTPUT0", (pb_utils.get_input_tensor_by_name(r, "INPUT0").as_numpy()
                            + pb_utils.get_input_tensor_by_name(r, "INPUT1").as_numpy().sum())
                .astype(np.int32))]) for r in requests]
"""


def test_decoupled_branches_wait_for_a_parallel_step(start_server: StartServer,
                                                     tmp_path: Path) -> None:
    """repeat_ms's responses come before the slow parallel step 'side' is done; each
    branch's 'combine' step waits for side's output, then runs."""
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copytree(MODELS_DIR / "repeat_ms", repo / "repeat_ms")
    arithmetic(repo, "side", mul=100, sleep=0.5, data_type="TYPE_INT32")
    write(repo, "combine", """
        name: "combine"
        backend: "python"
        max_batch_size: 0
        input [ { name: "INPUT0", data_type: TYPE_INT32, dims: [ -1 ] },
                { name: "INPUT1", data_type: TYPE_INT32, dims: [ -1 ] } ]
        output [ { name: "OUTPUT0", data_type: TYPE_INT32, dims: [ -1 ] } ]
    """, COMBINE_MODEL)
    write(repo, "fan", """
        name: "fan"
        platform: "ensemble"
        max_batch_size: 0
        input [ { name: "IN", data_type: TYPE_INT32, dims: [ -1 ] },
                { name: "DELAY", data_type: TYPE_INT32, dims: [ 1 ] } ]
        output [ { name: "OUT", data_type: TYPE_INT32, dims: [ -1 ] } ]
        ensemble_scheduling { step [ """ + ", ".join([
        step("repeat_ms", {"IN": "IN", "DELAY_MS": "DELAY"}, {"OUT": "each"}),
        step("side", {"INPUT0": "IN"}, {"OUTPUT0": "scaled"}),
        step("combine", {"INPUT0": "each", "INPUT1": "scaled"}, {"OUTPUT0": "OUT"})]) + " ] }\n")
    server = start_server(None, repository=repo)
    inputs = [grpcclient.InferInput("IN", [3], "INT32"), grpcclient.InferInput("DELAY", [1],
                                                                              "INT32")]
    inputs[0].set_data_from_numpy(np.array([1, 2, 3], dtype=np.int32))
    inputs[1].set_data_from_numpy(np.array([0], dtype=np.int32))
    results: queue.Queue[object] = queue.Queue()
    with grpcclient.InferenceServerClient(server.url) as client:
        client.start_stream(callback=lambda result, error: results.put(
            error if error is not None else result))
        client.async_stream_infer("fan", inputs, enable_empty_final_response=True)
        got = []
        while True:
            result = results.get(timeout=20)
            assert not isinstance(result, InferenceServerException), result.message()
            if result.get_response().parameters[  # type: ignore[attr-defined]
                    "triton_final_response"].bool_param:
                break
            got.append(result.as_numpy("OUT").tolist())  # type: ignore[attr-defined]
        client.stop_stream()
    assert sorted(got) == [[601], [602], [603]]


def test_cached_ensemble_answers_a_repeat_without_running_its_steps(
        start_server: StartServer, repository: Path) -> None:
    """``response_cache`` on an ensemble (Triton caches the ensemble's own response): a
    repeated request is a hit of the ensemble and none of its steps runs again."""
    cached = ensemble_config("cached_pipe", [
        step("pre", {"INPUT0": "IN"}, {"OUTPUT0": "t1"}),
        step("mid", {"INPUT0": "t1"}, {"OUTPUT0": "OUT"}),
    ]).rstrip() + "\n        response_cache { enable: true }\n"
    write(repository, "cached_pipe", cached)
    server = start_server(None, "--cache-config", "local,size=1048576", repository=repository)
    client = grpcclient.InferenceServerClient(server.url)

    def stats(model: str) -> tuple[int, int, int]:
        inference = client.get_inference_statistics(model).model_stats[0].inference_stats
        return inference.success.count, inference.cache_hit.count, inference.cache_miss.count

    data = np.array([1.0, 2.0, 3.0], dtype=np.float32)
    first = infer(client, "cached_pipe", data, ["OUT"])["OUT"]
    np.testing.assert_array_equal(first, (data + 1) * 2)
    steps_before = stats("pre")[0], stats("mid")[0]
    again = infer(client, "cached_pipe", data, ["OUT"])["OUT"]
    np.testing.assert_array_equal(again, first)
    assert (stats("pre")[0], stats("mid")[0]) == steps_before, "a step ran for the hit"
    assert stats("cached_pipe") == (2, 1, 1)

    other = infer(client, "cached_pipe", data + 1, ["OUT"])["OUT"]  # a miss runs the steps
    np.testing.assert_array_equal(other, (data + 2) * 2)
    assert stats("pre")[0] == steps_before[0] + 1
    assert stats("cached_pipe") == (3, 1, 2)


def test_unload_dependents_unloads_the_composing_models_nothing_else_needs(
        start_server: StartServer, repository: Path) -> None:
    """Triton's unload_dependents: an ensemble's composing models go with it, unless they
    were loaded by name or another loaded ensemble still uses them; over gRPC and HTTP."""
    write(repository, "pre_only", ensemble_config("pre_only", [
        step("pre", {"INPUT0": "IN"}, {"OUTPUT0": "OUT"})]))
    server = explicit(start_server, repository)
    client = grpcclient.InferenceServerClient(server.url)
    extensions = client.get_server_metadata().extensions
    assert "model_repository(unload_dependents)" in extensions

    def ready() -> set[str]:
        return {model for model in ("pre", "mid", "post", "side", "pipeline", "pre_only")
                if client.is_model_ready(model)}

    client.load_model("pipeline")
    client.unload_model("pipeline")  # without the parameter: its steps stay
    assert ready() == {"pre", "mid", "post", "side"}

    client.unload_model("pre")
    client.load_model("side")         # by name: stays whatever ensembles do
    client.load_model("pipeline")     # loads pre again, as a composing model
    client.load_model("pre_only")     # uses pre too
    client.unload_model("pipeline", unload_dependents=True)
    assert ready() == {"pre", "side", "pre_only"}  # mid and post went with it

    with httpclient.InferenceServerClient(server.http_url) as http:
        http.unload_model("pre_only", unload_dependents=True)
    assert ready() == {"side"}
