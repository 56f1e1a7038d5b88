"""The pytorch backend on the CPU: hooks in-process, then real servers through tritonclient.

TorchScript models are built by the tests (tests/pt_models.py) into temporary repositories;
config.pbtxt files live in tests/models/pt_*. Everything here skips when torch is missing.
"""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the pytorch backend tests need torch "
                                            "(pip install 'shmserve[torch]')")

import tritonclient.grpc as grpcclient  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from shmserve.tests import pt_models  # noqa: E402
from shmserve.tests.serverproc import ServerProcess, arena_segments  # noqa: E402
from shmserve.workers.backend import (  # noqa: E402
    BackendError,
    InstanceSpec,
    ModelSpec,
    Request,
    resolve_backend,
)
from shmserve.workers.backends.pytorch import PyTorchBackend  # noqa: E402
from shmserve.workers.sequence_state import SequenceStates, StateSpec  # noqa: E402

StartServer = Callable[..., ServerProcess]

W = np.arange(12, dtype=np.float32).reshape(4, 3) / 10
B = np.array([1.0, 2.0, 3.0], dtype=np.float32)


# --- in-process: the hooks --------------------------------------------------------------------

def tensor(name: str, data_type: str, dims: list[int]) -> dict[str, Any]:
    return {"name": name, "data_type": data_type, "dims": dims}


def fp32(*names: str, dims: list[int]) -> list[dict[str, Any]]:
    return [tensor(name, "TYPE_FP32", dims) for name in names]


def model_spec(tmp_path: Path, module: Any, inputs: list[dict[str, Any]],
               outputs: list[dict[str, Any]], max_batch_size: int = 0,
               filename: str | None = None, **extra: Any) -> ModelSpec:
    name = "m"
    version_path = tmp_path / name / "1"
    version_path.mkdir(parents=True, exist_ok=True)
    if module is not None:
        pt_models.save_scripted(module, version_path / (filename or "model.pt"))
    config: dict[str, Any] = {"name": name, "backend": "pytorch",
                              "max_batch_size": max_batch_size, "input": inputs,
                              "output": outputs, **extra}
    if filename:
        config["default_model_filename"] = filename
    return ModelSpec(name, 1, config, str(tmp_path / name), str(version_path))


CPU = InstanceSpec("m_0_0", "KIND_CPU", 0, 0)


def loaded(spec: ModelSpec, instance: InstanceSpec = CPU) -> PyTorchBackend:
    backend = PyTorchBackend()
    backend.backend_initialize({})
    backend.model_initialize(spec)
    backend.instance_initialize(spec, instance)
    return backend


def request(inputs: dict[str, Any], rid: str = "r") -> Request:
    return Request(rid, inputs, [])


def test_backend_resolves_by_entry_point_name() -> None:
    assert resolve_backend("pytorch") is PyTorchBackend


def test_positional_inputs_and_outputs(tmp_path: Path) -> None:
    spec = model_spec(tmp_path, pt_models.Linear(), [tensor("INPUT__0", "TYPE_FP32", [4])],
                      [tensor("OUTPUT__0", "TYPE_FP32", [3])], max_batch_size=8)
    backend = loaded(spec)
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    [response] = backend.execute([request({"INPUT__0": x})])
    assert response.error is None
    out = response.outputs["OUTPUT__0"]
    assert isinstance(out, torch.Tensor) and out.device.type == "cpu"
    np.testing.assert_allclose(out.numpy(), x @ W + B, rtol=1e-6)


def test_named_inputs_are_passed_by_name(tmp_path: Path) -> None:
    spec = model_spec(tmp_path, pt_models.Named(),
                      [tensor("bias", "TYPE_FP32", [-1]), tensor("x", "TYPE_FP32", [-1])],
                      [tensor("sum", "TYPE_FP32", [-1]), tensor("difference", "TYPE_FP32", [-1])])
    backend = loaded(spec)
    x = np.array([10, 20, 30], dtype=np.float32)
    bias = np.array([1, 2, 3], dtype=np.float32)
    [response] = backend.execute([request({"bias": bias, "x": x})])
    assert response.error is None
    np.testing.assert_array_equal(response.outputs["sum"].numpy(), x + bias)
    np.testing.assert_array_equal(response.outputs["difference"].numpy(), x - bias)


def test_config_order_when_no_name_matches(tmp_path: Path) -> None:
    # Neither forward() names nor <name>__<index>: Triton passes inputs in config order.
    spec = model_spec(tmp_path, pt_models.Named(),
                      [tensor("A", "TYPE_FP32", [-1]), tensor("B", "TYPE_FP32", [-1])],
                      [tensor("S", "TYPE_FP32", [-1]), tensor("D", "TYPE_FP32", [-1])])
    backend = loaded(spec)
    a, b = np.array([5.0], dtype=np.float32), np.array([2.0], dtype=np.float32)
    [response] = backend.execute([request({"A": a, "B": b})])
    assert response.outputs["D"].tolist() == [3.0]          # x=A, bias=B


def test_named_index_outputs_pick_tuple_elements(tmp_path: Path) -> None:
    spec = model_spec(tmp_path, pt_models.Named(),
                      fp32("INPUT__0", "INPUT__1", dims=[-1]),
                      fp32("OUTPUT__1", "OUTPUT__0", dims=[-1]))
    backend = loaded(spec)
    [response] = backend.execute([request({"INPUT__1": np.array([1.0], np.float32),
                                           "INPUT__0": np.array([4.0], np.float32)})])
    assert response.outputs["OUTPUT__0"].tolist() == [5.0]
    assert response.outputs["OUTPUT__1"].tolist() == [3.0]


def test_dict_outputs_by_name_and_traced_model(tmp_path: Path) -> None:
    spec = model_spec(tmp_path, pt_models.DictOutputs(), [tensor("x", "TYPE_FP32", [-1])],
                      [tensor("negative", "TYPE_FP32", [-1]), tensor("double", "TYPE_FP32", [-1])])
    backend = loaded(spec)
    [response] = backend.execute([request({"x": np.array([1.5], np.float32)})])
    assert response.outputs["double"].tolist() == [3.0]
    assert response.outputs["negative"].tolist() == [-1.5]

    traced_dir = tmp_path / "traced"
    spec = model_spec(traced_dir, None, [tensor("INPUT__0", "TYPE_FP32", [4])],
                      [tensor("OUTPUT__0", "TYPE_FP32", [3])], max_batch_size=4)
    pt_models.save_traced(pt_models.Linear(), torch.zeros(1, 4),
                          Path(spec.version_path) / "model.pt")
    [response] = loaded(spec).execute([request({"INPUT__0": np.ones((1, 4), np.float32)})])
    np.testing.assert_allclose(response.outputs["OUTPUT__0"].numpy(),
                               np.ones((1, 4), np.float32) @ W + B, rtol=1e-6)


def test_batch_is_concatenated_once_and_split_back(tmp_path: Path) -> None:
    spec = model_spec(tmp_path, pt_models.BatchProbe(), [tensor("INPUT__0", "TYPE_FP32", [4])],
                      [*fp32("OUTPUT__0", dims=[4]), tensor("OUTPUT__1", "TYPE_INT64", [1])],
                      max_batch_size=8)
    backend = loaded(spec)
    inputs = [np.full((rows, 4), index, dtype=np.float32)
              for index, rows in enumerate([1, 3, 2], start=1)]
    responses = backend.execute([request({"INPUT__0": x}, f"r{i}") for i, x in enumerate(inputs)])
    for x, response in zip(inputs, responses, strict=True):
        assert response.error is None
        np.testing.assert_array_equal(response.outputs["OUTPUT__0"].numpy(), x * 2)
        assert response.outputs["OUTPUT__1"].reshape(-1).tolist() == [6] * len(x)


def test_different_shapes_run_one_by_one(tmp_path: Path) -> None:
    spec = model_spec(tmp_path, pt_models.BatchProbe(), [tensor("INPUT__0", "TYPE_FP32", [-1])],
                      [*fp32("OUTPUT__0", dims=[-1]), tensor("OUTPUT__1", "TYPE_INT64", [1])],
                      max_batch_size=8)
    backend = loaded(spec)
    small, wide = np.ones((1, 2), np.float32), np.ones((2, 5), np.float32)
    first, second = backend.execute([request({"INPUT__0": small}), request({"INPUT__0": wide})])
    assert first.outputs["OUTPUT__1"].reshape(-1).tolist() == [1]
    assert second.outputs["OUTPUT__1"].reshape(-1).tolist() == [2, 2]
    assert second.outputs["OUTPUT__0"].shape == (2, 5)


def test_read_only_inputs_are_accepted_without_warnings(tmp_path: Path) -> None:
    # Inline inputs arrive as read-only views of the control frame's bytes.
    spec = model_spec(tmp_path, pt_models.Linear(), [tensor("INPUT__0", "TYPE_FP32", [4])],
                      [tensor("OUTPUT__0", "TYPE_FP32", [3])], max_batch_size=8)
    x = np.frombuffer(np.ones((1, 4), np.float32).tobytes(), dtype=np.float32).reshape(1, 4)
    assert not x.flags.writeable
    [response] = loaded(spec).execute([request({"INPUT__0": x})])
    assert response.error is None


def test_string_inputs_and_outputs(tmp_path: Path) -> None:
    spec = model_spec(tmp_path, pt_models.Strings(), [tensor("words", "TYPE_STRING", [-1])],
                      [tensor("upper", "TYPE_STRING", [-1])])
    words = np.array([b"torch", b"script"], dtype=np.object_)
    [response] = loaded(spec).execute([request({"words": words})])
    assert response.error is None
    assert response.outputs["upper"].tolist() == [b"TORCH", b"SCRIPT"]


def test_bf16_inputs_and_outputs(tmp_path: Path) -> None:
    ml_dtypes = pytest.importorskip("ml_dtypes")
    from shmserve.protos.datatypes import bf16_dtype
    from shmserve.workers.cuda_ipc import host_array
    spec = model_spec(tmp_path, pt_models.BatchProbe(), [tensor("INPUT__0", "TYPE_BF16", [2])],
                      [tensor("OUTPUT__0", "TYPE_BF16", [2]),
                       tensor("OUTPUT__1", "TYPE_INT64", [1])], max_batch_size=4)
    x = np.array([[1.5, -2.0]], dtype=ml_dtypes.bfloat16)
    [response] = loaded(spec).execute([request({"INPUT__0": x})])
    assert response.error is None, response.error
    out = response.outputs["OUTPUT__0"]
    assert out.dtype == torch.bfloat16 and out.float().tolist() == [[3.0, -4.0]]
    assert host_array(out).dtype == bf16_dtype()


def test_default_model_filename(tmp_path: Path) -> None:
    spec = model_spec(tmp_path, pt_models.Linear(), [tensor("INPUT__0", "TYPE_FP32", [4])],
                      [tensor("OUTPUT__0", "TYPE_FP32", [3])], max_batch_size=8,
                      filename="weights.pt")
    [response] = loaded(spec).execute([request({"INPUT__0": np.zeros((1, 4), np.float32)})])
    assert response.outputs["OUTPUT__0"].tolist() == [B.tolist()]


def test_inference_mode_and_parameters(tmp_path: Path) -> None:
    params = {"INFERENCE_MODE": {"string_value": "false"},
              "DISABLE_OPTIMIZED_EXECUTION": {"string_value": "true"},
              "INTRA_OP_THREAD_COUNT": {"string_value": "1"}}
    spec = model_spec(tmp_path, pt_models.Linear(), [tensor("INPUT__0", "TYPE_FP32", [4])],
                      [tensor("OUTPUT__0", "TYPE_FP32", [3])], max_batch_size=8,
                      parameters=params)
    backend = loaded(spec)
    [response] = backend.execute([request({"INPUT__0": np.zeros((1, 4), np.float32)})])
    assert response.error is None
    assert not response.outputs["OUTPUT__0"].is_inference()
    spec.config["parameters"] = {}
    [response] = loaded(spec).execute([request({"INPUT__0": np.zeros((1, 4), np.float32)})])
    assert response.outputs["OUTPUT__0"].is_inference()

    spec.config["parameters"] = {"INTRA_OP_THREAD_COUNT": {"string_value": "zero"}}
    with pytest.raises(BackendError, match="INTRA_OP_THREAD_COUNT must be a positive integer"):
        PyTorchBackend().model_initialize(spec)


# --- in-process: errors -------------------------------------------------------------------------

def test_missing_model_file(tmp_path: Path) -> None:
    spec = model_spec(tmp_path, None, [tensor("INPUT__0", "TYPE_FP32", [4])],
                      [tensor("OUTPUT__0", "TYPE_FP32", [3])])
    with pytest.raises(BackendError) as caught:
        PyTorchBackend().model_initialize(spec)
    assert caught.value.code == "NOT_FOUND"
    assert f"unable to find '{spec.version_path}/model.pt' for model 'm'" in caught.value.message


def test_unloadable_file(tmp_path: Path) -> None:
    spec = model_spec(tmp_path, None, [tensor("INPUT__0", "TYPE_FP32", [4])],
                      [tensor("OUTPUT__0", "TYPE_FP32", [3])])
    (Path(spec.version_path) / "model.pt").write_bytes(b"not a zip archive")
    backend = PyTorchBackend()
    backend.model_initialize(spec)
    with pytest.raises(BackendError, match=r"failed to load model 'm' from '.*model\.pt': "):
        backend.instance_initialize(spec, CPU)


@pytest.mark.parametrize(("inputs", "message"), [
    (["x", "offset"], "input 'offset' is not an argument of forward(x, bias)"),
    (["x"], "forward(x, bias) needs argument 'bias', which is not an input"),
    (["A"], "configuration expects 1 inputs, model provides 2 (forward(x, bias))"),
    (["INPUT__0", "INPUT__2"], "input indices [0, 2] must be 0..1, each once"),
])
def test_wrong_input_names_fail_the_load(tmp_path: Path, inputs: list[str], message: str) -> None:
    spec = model_spec(tmp_path, pt_models.Named(),
                      [tensor(name, "TYPE_FP32", [-1]) for name in inputs],
                      [tensor("sum", "TYPE_FP32", [-1])])
    backend = PyTorchBackend()
    backend.model_initialize(spec)
    with pytest.raises(BackendError) as caught:
        backend.instance_initialize(spec, CPU)
    assert caught.value.code == "INVALID_ARGUMENT"
    assert message in caught.value.message


def test_kind_gpu_without_cuda_is_a_clear_load_error(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this host has CUDA")
    spec = model_spec(tmp_path, pt_models.Linear(), [tensor("INPUT__0", "TYPE_FP32", [4])],
                      [tensor("OUTPUT__0", "TYPE_FP32", [3])], max_batch_size=8)
    backend = PyTorchBackend()
    backend.model_initialize(spec)
    with pytest.raises(BackendError, match="is KIND_GPU but PyTorch sees no CUDA device"):
        backend.instance_initialize(spec, InstanceSpec("m_0_0", "KIND_GPU", 0, 0))


def test_execute_errors_are_per_request(tmp_path: Path) -> None:
    spec = model_spec(tmp_path, pt_models.Fails(), [tensor("x", "TYPE_FP32", [-1])],
                      [tensor("y", "TYPE_FP32", [-1])])
    backend = loaded(spec)
    good, bad = backend.execute([request({"x": np.ones(2, np.float32)}),
                                 request({"x": -np.ones(2, np.float32)})])
    assert good.error is None and good.outputs["y"].tolist() == [1.0, 1.0]
    assert bad.error is not None
    assert bad.error.message.startswith("PyTorch execute failure for model 'm_0_0': ")
    assert "negative input" in bad.error.message


def test_output_datatype_mismatch(tmp_path: Path) -> None:
    spec = model_spec(tmp_path, pt_models.WrongDtype(), [tensor("x", "TYPE_FP32", [-1])],
                      [tensor("y", "TYPE_FP32", [-1])])
    [response] = loaded(spec).execute([request({"x": np.ones(2, np.float32)})])
    assert response.error is not None
    assert response.error.message == ("unexpected datatype TYPE_FP64 for inference output 'y', "
                                      "expecting TYPE_FP32")


def test_too_few_outputs(tmp_path: Path) -> None:
    spec = model_spec(tmp_path, pt_models.Linear(), [tensor("INPUT__0", "TYPE_FP32", [4])],
                      fp32("OUTPUT__0", "OUTPUT__1", dims=[3]),
                      max_batch_size=8)
    [response] = loaded(spec).execute([request({"INPUT__0": np.ones((1, 4), np.float32)})])
    assert response.error is not None
    assert "returned 1 output(s); output 'OUTPUT__1' needs position 1" in response.error.message


def test_batch_output_without_batch_dimension(tmp_path: Path) -> None:
    spec = model_spec(tmp_path, pt_models.SumRows(), [tensor("INPUT__0", "TYPE_FP32", [4])],
                      [tensor("OUTPUT__0", "TYPE_FP32", [4])], max_batch_size=8)
    responses = loaded(spec).execute([request({"INPUT__0": np.ones((1, 4), np.float32)}),
                                      request({"INPUT__0": np.ones((2, 4), np.float32)})])
    for response in responses:
        assert response.error is not None
        assert "expected a batch dimension of 3 (the 2 requests of the batch)" in \
            response.error.message



# --- sequence models: control inputs and implicit state ----------------------------------------

def sequence_batching(controls: dict[str, str] | None = None,
                      states: list[tuple[str, str]] | None = None) -> dict[str, Any]:
    """A config's sequence_batching as Triton's JSON: START controls by name, states as
    (input_name, output_name) of INT64 [1]."""
    return {"direct": {}, "control_input": [
        {"name": name, "control": [{"kind": kind, "int32_false_true": [0, 1]}]}
        for name, kind in (controls or {}).items()],
        "state": [{"input_name": state_in, "output_name": state_out,
                   "data_type": "TYPE_INT64", "dims": [1]} for state_in, state_out in states or []]}


SEQUENCE_INPUTS = [tensor("INPUT__0", "TYPE_INT64", [1])]
SEQUENCE_OUTPUTS = [tensor("OUTPUT__0", "TYPE_INT64", [1]), tensor("STARTED__1", "TYPE_INT32", [1]),
                    tensor("CORRID_SEEN__3", "TYPE_INT64", [1])]


def sequence_spec(tmp_path: Path, **extra: Any) -> ModelSpec:
    batching = sequence_batching({"START__1": "CONTROL_SEQUENCE_START"},
                                 [("STATE_IN__2", "STATE_OUT__2")])
    batching["control_input"].append({"name": "CORRID__3", "control": [
        {"kind": "CONTROL_SEQUENCE_CORRID", "data_type": "TYPE_INT64"}]})
    return model_spec(tmp_path, pt_models.SequenceAccumulator(), SEQUENCE_INPUTS,
                      SEQUENCE_OUTPUTS, max_batch_size=4,
                      sequence_batching=batching, **extra)


def test_control_and_state_inputs_go_to_their_named_positions(tmp_path: Path) -> None:
    """forward(INPUT__0, START__1, STATE_IN__2, CORRID__3): the controls and the state are
    passed at the positions their names give; the state's new value is returned under its
    output name (the tuple element STATE_OUT__2 names), next to the config's outputs."""
    backend = loaded(sequence_spec(tmp_path))
    one = {"INPUT__0": np.array([[5]], np.int64), "START__1": np.array([[1]], np.int32),
           "STATE_IN__2": np.array([[10]], np.int64), "CORRID__3": np.array([[7]], np.int64)}
    two = {"INPUT__0": np.array([[1]], np.int64), "START__1": np.array([[0]], np.int32),
           "STATE_IN__2": torch.tensor([[100]]), "CORRID__3": np.array([[8]], np.int64)}
    first, second = backend.execute([request(one), request(two)])   # one batch of two
    assert {name: value.tolist() for name, value in first.outputs.items()} == {
        "OUTPUT__0": [[15]], "STARTED__1": [[1]], "STATE_OUT__2": [[15]],
        "CORRID_SEEN__3": [[7]]}
    assert {name: value.tolist() for name, value in second.outputs.items()} == {
        "OUTPUT__0": [[101]], "STARTED__1": [[0]], "STATE_OUT__2": [[101]],
        "CORRID_SEEN__3": [[8]]}


def test_a_torch_state_is_kept_as_a_copy_on_its_device() -> None:
    """The kept state of a pytorch model stays a tensor (on a GPU instance: on the GPU, not
    moved to the host between requests) and is a copy of the output (a view of a batch)."""
    states = SequenceStates([StateSpec("STATE_IN__2", "STATE_OUT__2", np.zeros((1, 1), np.int64))],
                            [])
    states.add_inputs(5, {"sequence_start": True}, {})
    batch_output = torch.tensor([[3], [4]])
    states.take_outputs(5, {}, [], {"STATE_OUT__2": batch_output[:1]})
    batch_output.zero_()
    inputs: dict[str, Any] = {}
    states.add_inputs(5, {}, inputs)
    kept = inputs["STATE_IN__2"]
    assert isinstance(kept, torch.Tensor) and kept.tolist() == [[3]]


@pytest.mark.parametrize(("inputs", "controls", "states", "message"), [
    (["INPUT__0"], {"START": "CONTROL_SEQUENCE_START"}, [],
     "input 'START' does not follow <name>__<index> naming convention."),
    (["x"], {}, [("STATE_IN__1", "STATE_OUT__1")],
     "PyTorch model 'm' is using sequence batching with state but not all inputs and outputs "
     "follow the <name>__<index> naming convention. "),
    (["INPUT__0"], {}, [("STATE_IN", "STATE_OUT__1")],
     "PyTorch model 'm' is using sequence batching with state but state 'STATE_IN' does not "
     "follow the <name>__<index> naming convention. "),
])
def test_sequence_tensors_must_be_named_by_index(tmp_path: Path, inputs: list[str],
                                                 controls: dict[str, str],
                                                 states: list[tuple[str, str]],
                                                 message: str) -> None:
    spec = model_spec(tmp_path, pt_models.Named(), [tensor(n, "TYPE_INT64", [1]) for n in inputs],
                      [tensor("OUTPUT__0", "TYPE_INT64", [1])],
                      sequence_batching=sequence_batching(controls, states))
    with pytest.raises(BackendError) as caught:
        PyTorchBackend().model_initialize(spec)
    assert caught.value.code == "INVALID_ARGUMENT"
    assert message in caught.value.message


def test_a_control_input_must_have_a_free_position(tmp_path: Path) -> None:
    spec = model_spec(tmp_path, pt_models.Named(),
                      [tensor("x__0", "TYPE_FP32", [-1]), tensor("bias__1", "TYPE_FP32", [-1])],
                      [tensor("sum", "TYPE_FP32", [-1])],
                      sequence_batching=sequence_batching({"START__1": "CONTROL_SEQUENCE_START"}))
    backend = PyTorchBackend()
    backend.model_initialize(spec)
    with pytest.raises(BackendError) as caught:
        backend.instance_initialize(spec, CPU)
    assert "configuration expects 3 inputs, model provides 2" in caught.value.message


# --- real servers -------------------------------------------------------------------------------

SERVED = ["pt_linear", "pt_named", "pt_batching", "pt_sequence"]


@pytest.fixture(scope="module")
def pt_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("pt")
    repo = pt_models.build_pt_repository(
        root / "repo", [*SERVED, "pt_missing_file", "pt_bad_inputs", "pt_gpu_kind"])
    flags = ["--model-control-mode", "explicit"]
    for name in SERVED:
        flags += ["--load-model", name]
    server = ServerProcess(repo, *flags)
    server.wait_ready()
    yield server
    code = server.stop()
    assert code == 0, server.log()
    deadline = time.monotonic() + 5.0
    while arena_segments(server.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert arena_segments(server.pid) == [], "server left arena segments in /dev/shm"


@pytest.fixture
def client(pt_server: ServerProcess) -> Iterator[grpcclient.InferenceServerClient]:
    triton = grpcclient.InferenceServerClient(pt_server.url)
    yield triton
    triton.close()


def infer_input(name: str, array: np.ndarray, datatype: str) -> grpcclient.InferInput:
    item = grpcclient.InferInput(name, list(array.shape), datatype)
    item.set_data_from_numpy(array)
    return item


def test_server_linear_model(client: grpcclient.InferenceServerClient) -> None:
    assert client.is_model_ready("pt_linear")
    metadata = client.get_model_metadata("pt_linear")
    assert metadata.platform == "pytorch_libtorch"
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == \
        [("INPUT__0", "FP32", [-1, 4])]
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    result = client.infer("pt_linear", [infer_input("INPUT__0", x, "FP32")])
    np.testing.assert_allclose(result.as_numpy("OUTPUT__0"), x @ W + B, rtol=1e-5, atol=1e-6)


def test_server_large_payload_goes_through_the_arena(client: grpcclient.InferenceServerClient
                                                     ) -> None:
    x = np.ones((8, 4), np.float32)
    result = client.infer("pt_linear", [infer_input("INPUT__0", x, "FP32")])
    np.testing.assert_allclose(result.as_numpy("OUTPUT__0"), x @ W + B, rtol=1e-6)
    big = np.arange(1 << 16, dtype=np.float32)        # 256 KiB: staged through the input arena
    named = client.infer("pt_named", [infer_input("x", big, "FP32"),
                                      infer_input("bias", np.ones_like(big), "FP32")])
    np.testing.assert_array_equal(named.as_numpy("sum"), big + 1)
    np.testing.assert_array_equal(named.as_numpy("difference"), big - 1)


def test_server_named_inputs(client: grpcclient.InferenceServerClient) -> None:
    x = np.array([1.0, 2.0], np.float32)
    bias = np.array([0.5, 0.25], np.float32)
    result = client.infer("pt_named", [infer_input("x", x, "FP32"),
                                       infer_input("bias", bias, "FP32")],
                          outputs=[grpcclient.InferRequestedOutput("difference")])
    np.testing.assert_array_equal(result.as_numpy("difference"), x - bias)
    assert result.as_numpy("sum") is None


def test_server_wrong_input_name_in_a_request(client: grpcclient.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException) as caught:
        client.infer("pt_named", [infer_input("x", np.ones(2, np.float32), "FP32"),
                                  infer_input("offset", np.ones(2, np.float32), "FP32")])
    assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "unexpected inference input 'offset' for model 'pt_named'" in caught.value.message()
    assert client.is_server_live()


def test_server_batches_concurrent_requests(client: grpcclient.InferenceServerClient,
                                            pt_server: ServerProcess) -> None:
    before = client.get_inference_statistics("pt_batching").model_stats[0]
    inputs = [np.full((1, 4), i, np.float32) for i in range(4)]

    def call(x: np.ndarray) -> Any:
        own = grpcclient.InferenceServerClient(pt_server.url)
        try:
            return own.infer("pt_batching", [infer_input("INPUT__0", x, "FP32")])
        finally:
            own.close()

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(call, inputs))
    for x, result in zip(inputs, results, strict=True):
        np.testing.assert_array_equal(result.as_numpy("OUTPUT__0"), x * 2)
    seen = [int(result.as_numpy("OUTPUT__1")[0, 0]) for result in results]
    assert seen == [4, 4, 4, 4], "the four requests should have run as one batch of 4"
    after = client.get_inference_statistics("pt_batching").model_stats[0]
    assert after.inference_count - before.inference_count == 4
    assert after.execution_count - before.execution_count == 1


def test_server_load_errors_are_clear(client: grpcclient.InferenceServerClient,
                                      pt_server: ServerProcess) -> None:
    repo = pt_server.repository
    cases = {
        "pt_missing_file": f"unable to find '{repo}/pt_missing_file/1/model.pt' for model "
                           f"'pt_missing_file'",
        "pt_bad_inputs": "input 'offset' is not an argument of forward(x, bias)",
        "pt_gpu_kind": "has kind KIND_GPU but no GPUs are available on this host",
    }
    if torch.cuda.is_available():
        del cases["pt_gpu_kind"]
    for name, text in cases.items():
        with pytest.raises(InferenceServerException) as caught:
            client.load_model(name)
        assert text in caught.value.message(), caught.value.message()
        assert not client.is_model_ready(name)
    # The server and the other models are unaffected.
    result = client.infer("pt_linear", [infer_input("INPUT__0", np.zeros((1, 4), np.float32),
                                                    "FP32")])
    np.testing.assert_allclose(result.as_numpy("OUTPUT__0"), B[None, :])


def test_server_kind_auto_is_cpu_without_gpus(start_server: StartServer, tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this host has CUDA: KIND_AUTO picks the GPU")
    repo = pt_models.build_pt_repository(tmp_path / "auto", ["pt_linear"])
    config = repo / "pt_linear" / "config.pbtxt"
    config.write_text(config.read_text().replace("kind: KIND_CPU", "kind: KIND_AUTO"))
    server = start_server(repository=repo)
    triton = grpcclient.InferenceServerClient(server.url)
    try:
        config_message = triton.get_model_config("pt_linear").config
        assert [group.kind for group in config_message.instance_group] == [2]   # KIND_CPU
        result = triton.infer("pt_linear", [infer_input("INPUT__0", np.ones((2, 4), np.float32),
                                                        "FP32")])
        np.testing.assert_allclose(result.as_numpy("OUTPUT__0"), np.ones((2, 4)) @ W + B,
                                   rtol=1e-6)
    finally:
        triton.close()


def _sequence_step(client: grpcclient.InferenceServerClient, sequence_id: int, value: int,
                   start: bool = False, end: bool = False) -> dict[str, int]:
    result = client.infer("pt_sequence",
                          [infer_input("INPUT__0", np.array([[value]], np.int64), "INT64")],
                          sequence_id=sequence_id, sequence_start=start, sequence_end=end,
                          client_timeout=20)
    return {out.name: int(result.as_numpy(out.name).reshape(-1)[0])
            for out in result.get_response().outputs}


def test_server_sequence_model_with_implicit_state(client: grpcclient.InferenceServerClient
                                                   ) -> None:
    """tritonclient's sequence API against the TorchScript accumulator: the server fills START
    and CORRID, keeps STATE_OUT__2 per sequence (not sent to the client, who did not declare
    it), resets it at START and drops it at END."""
    assert _sequence_step(client, 11, 5, start=True) == {
        "OUTPUT__0": 5, "STARTED__1": 1, "CORRID_SEEN__3": 11}
    assert _sequence_step(client, 12, 7, start=True)["OUTPUT__0"] == 7
    assert _sequence_step(client, 11, 1) == {"OUTPUT__0": 6, "STARTED__1": 0, "CORRID_SEEN__3": 11}
    assert _sequence_step(client, 12, 1, end=True)["OUTPUT__0"] == 8
    assert _sequence_step(client, 11, 10, start=True)["OUTPUT__0"] == 10   # START resets it
    assert _sequence_step(client, 11, 1, end=True)["OUTPUT__0"] == 11
    with pytest.raises(InferenceServerException) as caught:
        _sequence_step(client, 11, 1)
    assert "must specify the START flag on the first request of the sequence" in \
        caught.value.message()


def test_server_concurrent_sequences_keep_their_own_state(
        client: grpcclient.InferenceServerClient, pt_server: ServerProcess) -> None:
    """Four sequences stepped at once share executions (batches of the direct strategy's
    slots, with fillers for empty slots), yet each sums only its own inputs."""
    def run(sequence_id: int) -> list[int]:
        own = grpcclient.InferenceServerClient(pt_server.url)
        try:
            return [_sequence_step(own, sequence_id, sequence_id, start=step == 0,
                                   end=step == 19)["OUTPUT__0"] for step in range(20)]
        finally:
            own.close()

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        sums = dict(zip(range(21, 25), pool.map(run, range(21, 25)), strict=True))
    for sequence_id, seen in sums.items():
        assert seen == [sequence_id * (step + 1) for step in range(20)], sequence_id
