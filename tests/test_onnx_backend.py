"""The onnxruntime backend: hooks in-process, then real servers through tritonclient.

ONNX models are built by the tests (tests/onnx_models.py) and checked against onnxruntime run
directly on the same inputs. CI installs onnxruntime and onnx (the ``test`` extra), so these run
there; elsewhere they skip without the ``onnx`` extra.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import mmap
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime", reason="the onnxruntime backend tests need "
                                                "onnxruntime (pip install 'shmserve[onnx]')")
pytest.importorskip("onnx", reason="the onnxruntime backend tests build models with onnx")

import tritonclient.grpc as grpcclient  # noqa: E402
import tritonclient.utils.shared_memory as shm  # noqa: E402
from google.protobuf import json_format, text_format  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from shmserve.protos import shmserve_model_config_pb2 as mc  # noqa: E402
from shmserve.tests import onnx_models  # noqa: E402
from shmserve.tests.serverproc import (  # noqa: E402
    ServerProcess,
    arena_segments,
    build_repository,
    worker_pids,
)
from shmserve.workers.backend import (  # noqa: E402
    BackendError,
    InstanceSpec,
    ModelSpec,
    Request,
    resolve_backend,
)
from shmserve.workers.backends.onnxruntime import OnnxRuntimeBackend  # noqa: E402
from shmserve.workers.backends.onnxruntime.session import session_options  # noqa: E402
from shmserve.workers.backends.onnxruntime.signature import (  # noqa: E402
    SignatureError,
    TensorInfo,
    auto_complete,
)

CPU = InstanceSpec("m_0_0", "KIND_CPU", 0, 0)


def io(name: str, data_type: str, dims: list[int], **extra: Any) -> dict[str, Any]:
    return {"name": name, "data_type": data_type, "dims": dims, **extra}


def mlp_config(**changes: Any) -> dict[str, Any]:
    config: dict[str, Any] = {"name": "m", "backend": "onnxruntime", "max_batch_size": 8,
                              "input": [io("X", "TYPE_FP32", [4])],
                              "output": [io("Y", "TYPE_FP32", [3])]}
    config.update(changes)
    return config


def spec(tmp_path: Path, model: Any, config: dict[str, Any]) -> ModelSpec:
    model_dir = onnx_models.write_model(tmp_path, "m", model)
    return ModelSpec("m", 1, config, str(model_dir), str(model_dir / "1"))


def loaded(model_spec: ModelSpec) -> OnnxRuntimeBackend:
    backend = OnnxRuntimeBackend()
    backend.backend_initialize({})
    backend.model_initialize(model_spec)
    backend.instance_initialize(model_spec, CPU)
    return backend


def direct(model: Any, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    """onnxruntime itself on the same model and inputs: the reference."""
    session = ort.InferenceSession(model.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    return list(session.run(None, inputs))


def ok(response: Any) -> dict[str, Any]:
    assert response.error is None, response.error and response.error.message
    return dict(response.outputs)


# --- in-process: the hooks --------------------------------------------------------------------

def test_registered_as_an_entry_point() -> None:
    assert resolve_backend("onnxruntime") is OnnxRuntimeBackend


def test_mlp_matches_onnxruntime_run_directly(tmp_path: Path) -> None:
    backend = loaded(spec(tmp_path, onnx_models.mlp(), mlp_config()))
    x = np.random.default_rng(1).standard_normal((5, 4)).astype(np.float32)
    (response,) = backend.execute([Request("r", {"X": x}, [])])
    (expected,) = direct(onnx_models.mlp(), {"X": x})
    np.testing.assert_array_equal(ok(response)["Y"], expected)
    np.testing.assert_allclose(expected, onnx_models.mlp_reference(x), rtol=1e-5, atol=1e-5)


def test_several_inputs_and_outputs_and_requested_subset(tmp_path: Path) -> None:
    config = {"name": "m", "backend": "onnxruntime", "max_batch_size": 4,
              "input": [io("A", "TYPE_FP32", [4]), io("B", "TYPE_FP32", [4]),
                        io("C", "TYPE_INT32", [2])],
              "output": [io("SUM", "TYPE_FP32", [4]), io("DIFF", "TYPE_FP32", [4]),
                         io("TWICE", "TYPE_INT32", [2])]}
    backend = loaded(spec(tmp_path, onnx_models.multi_io(), config))
    rng = np.random.default_rng(2)
    inputs = {"A": rng.standard_normal((2, 4)).astype(np.float32),
              "B": rng.standard_normal((2, 4)).astype(np.float32),
              "C": np.array([[1, 2], [3, 4]], np.int32)}
    expected = dict(zip(["SUM", "DIFF", "TWICE"], direct(onnx_models.multi_io(), inputs),
                        strict=True))
    outputs = ok(backend.execute([Request("r", inputs, [])])[0])
    assert sorted(outputs) == ["DIFF", "SUM", "TWICE"]
    for name, value in expected.items():
        np.testing.assert_array_equal(outputs[name], value)
    only = ok(backend.execute([Request("r", inputs, ["TWICE"])])[0])
    assert list(only) == ["TWICE"]
    np.testing.assert_array_equal(only["TWICE"], inputs["C"] * 2)


def test_string_tensors(tmp_path: Path) -> None:
    config = {"name": "m", "backend": "onnxruntime", "max_batch_size": 0,
              "input": [io("S", "TYPE_STRING", [-1])], "output": [io("T", "TYPE_STRING", [-1])]}
    backend = loaded(spec(tmp_path, onnx_models.strings(), config))
    words = np.array([b"hello", "gr\u00fc\u00df".encode(), b""], dtype=np.object_)
    outputs = ok(backend.execute([Request("r", {"S": words}, [])])[0])
    assert outputs["T"].tolist() == words.tolist()


def test_batch_is_concatenated_once_and_split_back(tmp_path: Path) -> None:
    backend = loaded(spec(tmp_path, onnx_models.mlp(), mlp_config()))
    xs = [np.full((rows, 4), rows, np.float32) for rows in (1, 3, 2)]
    responses = backend.execute([Request(str(i), {"X": x}, []) for i, x in enumerate(xs)])
    for x, response in zip(xs, responses, strict=True):
        np.testing.assert_allclose(ok(response)["Y"], onnx_models.mlp_reference(x), rtol=1e-5)
    # One run for the three: their outputs are views of one batch output.
    bases = {id(ok(r)["Y"].base) for r in responses}
    assert len(bases) == 1
    # Larger requests go through the IO binding: the batch output is bound before the run.
    xs = [np.random.default_rng(rows).standard_normal((rows, 4)).astype(np.float32)
          for rows in (4096, 1, 2048)]
    responses = backend.execute([Request(str(i), {"X": x}, []) for i, x in enumerate(xs)])
    for x, response in zip(xs, responses, strict=True):
        np.testing.assert_allclose(ok(response)["Y"], direct(onnx_models.mlp(), {"X": x})[0],
                                   rtol=1e-5, atol=1e-5)
    assert list(backend.last_run.outputs) == ["Y"] and backend.last_run.in_place == []


MISMATCHES = [
    (mlp_config(input=[io("X", "TYPE_FP32", [4]), io("Z", "TYPE_FP32", [4])]),
     "unable to load model 'm', configuration expects 2 inputs, model provides 1"),
    (mlp_config(input=[io("INPUT", "TYPE_FP32", [4])]),
     "unexpected inference input 'INPUT', allowed inputs are: X"),
    (mlp_config(output=[io("OUT", "TYPE_FP32", [3])]),
     "unexpected inference output 'OUT', allowed outputs are: Y"),
    (mlp_config(input=[io("X", "TYPE_FP64", [4])]),
     "unable to load model 'm', configuration expects datatype TYPE_FP64 for input 'X', model "
     "provides TYPE_FP32"),
    (mlp_config(output=[io("Y", "TYPE_INT32", [3])]),
     "unable to load model 'm', configuration expects datatype TYPE_INT32 for output 'Y', "
     "model provides TYPE_FP32"),
    (mlp_config(input=[io("X", "TYPE_FP32", [5])]),
     "model 'm', tensor 'X': the model expects 2 dimensions (shape [-1,4]) but the model "
     "configuration specifies 2 dimensions (an initial batch dimension because max_batch_size "
     "> 0 followed by the explicit tensor shape, making complete shape [-1,5])"),
    (mlp_config(output=[io("Y", "TYPE_FP32", [-1])]),   # outputs compare exactly
     "model 'm', tensor 'Y': the model expects 2 dimensions (shape [-1,3]) but the model "
     "configuration specifies 2 dimensions (an initial batch dimension because max_batch_size "
     "> 0 followed by the explicit tensor shape, making complete shape [-1,-1])"),
    (mlp_config(max_batch_size=0),
     "model 'm', tensor 'X': the model expects 2 dimensions (shape [-1,4]) but the model "
     "configuration specifies 1 dimensions (shape [4])"),
    (mlp_config(input=[io("X", "TYPE_FP32", [4], optional=True)]),
     "unable to load model 'm', optional input 'X' is not supported for models that support "
     "batching"),
]


@pytest.mark.parametrize(("config", "message"), MISMATCHES,
                         ids=["input-count", "input-name", "output-name", "input-type",
                              "output-type", "input-dims", "output-dims", "no-batch-dim",
                              "optional-batching"])
def test_config_model_mismatch(tmp_path: Path, config: dict[str, Any], message: str) -> None:
    with pytest.raises(BackendError) as caught:
        loaded(spec(tmp_path, onnx_models.mlp(), config))
    assert caught.value.message == message
    assert caught.value.code == "INVALID_ARGUMENT"


def test_batching_config_on_a_model_with_a_fixed_first_dim(tmp_path: Path) -> None:
    with pytest.raises(BackendError) as caught:
        loaded(spec(tmp_path, onnx_models.mlp(batch=2), mlp_config()))
    assert caught.value.message == (
        "model 'm', tensor 'X': for the model to support batching the shape should have at "
        "least 1 dimension and the first dimension must be -1; but shape expected by the model "
        "is [2,4]")
    # Without batching the fixed dims match.
    fixed = mlp_config(max_batch_size=0, input=[io("X", "TYPE_FP32", [2, 4])],
                       output=[io("Y", "TYPE_FP32", [2, 3])])
    backend = loaded(spec(tmp_path, onnx_models.mlp(batch=2), fixed))
    x = np.ones((2, 4), np.float32)
    np.testing.assert_allclose(ok(backend.execute([Request("r", {"X": x}, [])])[0])["Y"],
                               onnx_models.mlp_reference(x), rtol=1e-5)


def test_missing_model_file(tmp_path: Path) -> None:
    model_spec = spec(tmp_path, onnx_models.mlp(), mlp_config(default_model_filename="x.onnx"))
    with pytest.raises(BackendError) as caught:
        loaded(model_spec)
    assert caught.value.code == "NOT_FOUND"
    assert f"unable to find '{model_spec.version_path}/x.onnx' for model 'm'" \
        in caught.value.message


def infos(model: Any) -> tuple[list[TensorInfo], list[TensorInfo]]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return ([TensorInfo.from_ort(n) for n in session.get_inputs()],
            [TensorInfo.from_ort(n) for n in session.get_outputs()])


def test_auto_complete_from_the_model() -> None:
    inputs, outputs = infos(onnx_models.mlp())
    assert auto_complete("m", {"name": "m"}, inputs, outputs) == {
        "name": "m", "max_batch_size": 4, "dynamic_batching": {},
        "input": [io("X", "TYPE_FP32", [4])], "output": [io("Y", "TYPE_FP32", [3])]}
    # A given max_batch_size stays; given inputs stay; only the outputs are filled in.
    partial = {"name": "m", "max_batch_size": 16, "input": [io("X", "TYPE_FP32", [4])]}
    assert auto_complete("m", partial, inputs, outputs) == {
        **partial, "dynamic_batching": {}, "output": [io("Y", "TYPE_FP32", [3])]}
    fixed_in, fixed_out = infos(onnx_models.mlp(batch=2))
    assert auto_complete("m", {}, fixed_in, fixed_out) == {
        "input": [io("X", "TYPE_FP32", [2, 4])], "output": [io("Y", "TYPE_FP32", [2, 3])]}
    with pytest.raises(SignatureError) as caught:
        auto_complete("m", {"max_batch_size": 8}, fixed_in, fixed_out)
    assert caught.value.message == ("autofill failed for model 'm': model does not support "
                                    "batching while non-zero max_batch_size is specified")


def test_session_options_from_the_config() -> None:
    options = session_options(ort, {
        "optimization": {"graph": {"level": 1}},
        "parameters": {"execution_mode": {"string_value": "1"},
                       "intra_op_thread_count": {"string_value": "2"},
                       "inter_op_thread_count": {"string_value": "3"}}})
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    assert options.execution_mode == ort.ExecutionMode.ORT_PARALLEL
    assert (options.intra_op_num_threads, options.inter_op_num_threads) == (2, 3)
    for level, expected in ((-1, "ORT_ENABLE_BASIC"), (2, "ORT_DISABLE_ALL"),
                            (0, "ORT_ENABLE_ALL")):
        options = session_options(ort, {"optimization": {"graph": {"level": level}}})
        assert options.graph_optimization_level == getattr(ort.GraphOptimizationLevel, expected)
    with pytest.raises(BackendError) as caught:
        session_options(ort, {"parameters": {"execution_mode": {"string_value": "2"}}})
    assert caught.value.message == ("Invalid configuration value provided. Expected values for "
                                    " execution_mode are 0 or 1 but got 2 .")


SPIN_KEYS = ("session.force_spinning_stop", "session.intra_op.allow_spinning",
             "session.inter_op.allow_spinning")


def test_thread_pools_stop_spinning_when_a_run_returns() -> None:
    """Idle ORT threads spinning for work would take the cores the answer's round trip needs
    (issue 17): they stop when a run returns, unless the config says otherwise (ORT's own
    key names)."""
    options = session_options(ort, {})
    assert [options.get_session_config_entry(key) for key in SPIN_KEYS] == ["1", "1", "1"]
    options = session_options(ort, {"parameters": {
        key: {"string_value": "0"} for key in SPIN_KEYS}})
    assert [options.get_session_config_entry(key) for key in SPIN_KEYS] == ["0", "0", "0"]
    with pytest.raises(BackendError) as caught:
        session_options(ort, {"parameters": {SPIN_KEYS[0]: {"string_value": "2"}}})
    assert caught.value.message == f"parameter '{SPIN_KEYS[0]}' must be 0 or 1, got 2"


def test_inputs_bound_in_place_and_outputs_written_into_the_destination(tmp_path: Path) -> None:
    """What the worker hands over for a request in client regions: views of the input region
    and the output region's memory. ORT reads the one and writes the other, no copy between."""
    model = onnx_models.identity_like()
    config = {"name": "m", "backend": "onnxruntime", "max_batch_size": 0,
              "input": [io("X", "TYPE_FP32", [-1, -1])],
              "output": [io("Y", "TYPE_FP32", [-1, -1])]}
    backend = loaded(spec(tmp_path, model, config))
    region_in, region_out = mmap.mmap(-1, 1 << 16), mmap.mmap(-1, 1 << 16)
    x = np.ndarray((16, 64), np.float32, region_in, offset=4096)
    x[:] = np.arange(x.size, dtype=np.float32).reshape(x.shape)
    destination = memoryview(region_out)[8192:8192 + 16 * 64 * 4 + 100]   # room to spare
    request = Request("r", {"X": x}, ["Y"], output_buffers={"Y": destination})
    y = ok(backend.execute([request])[0])["Y"]
    run = backend.last_run
    assert run.inputs["X"] == x.ctypes.data                       # ORT read the region itself
    address = np.frombuffer(destination, np.uint8).ctypes.data
    assert run.outputs["Y"] == address and run.in_place == ["Y"]  # ORT wrote the destination
    assert y.ctypes.data == address
    written = np.frombuffer(region_out, np.float32, count=x.size, offset=8192)
    np.testing.assert_array_equal(written.reshape(x.shape), x)
    # Too small a destination: ORT writes its own buffer and the worker copies once.
    small = Request("r", {"X": x}, ["Y"], output_buffers={"Y": destination[:100]})
    y = ok(backend.execute([small])[0])["Y"]
    assert backend.last_run.in_place == [] and y.ctypes.data != address
    np.testing.assert_array_equal(y, x)


def test_outputs_computed_in_memory_the_worker_lends(tmp_path: Path) -> None:
    """``allocate_output`` (the worker's output arena): a batch's output is computed there
    once, and each request's part is a view of it."""
    config = {"name": "m", "backend": "onnxruntime", "max_batch_size": 8,
              "input": [io("X", "TYPE_FP32", [-1])], "output": [io("Y", "TYPE_FP32", [-1])]}
    backend = loaded(spec(tmp_path, onnx_models.identity_like(), config))
    arena = mmap.mmap(-1, 1 << 22)
    lent: list[tuple[int, int]] = []

    def allocate(nbytes: int) -> memoryview:
        offset = sum(size for _, size in lent)
        lent.append((offset, nbytes))
        return memoryview(arena)[offset:offset + nbytes]

    xs = [np.full((1, 65536), i, np.float32) for i in range(3)]
    requests = [Request(str(i), {"X": x}, [], allocate_output=allocate)
                for i, x in enumerate(xs)]
    responses = backend.execute(requests)
    assert lent == [(0, 3 * 65536 * 4)] and backend.last_run.in_arena == ["Y"]
    base = np.frombuffer(arena, np.uint8).ctypes.data
    for i, (x, response) in enumerate(zip(xs, responses, strict=True)):
        y = ok(response)["Y"]
        np.testing.assert_array_equal(y, x)
        assert y.ctypes.data == base + i * 65536 * 4


def test_output_of_unknown_shape_is_allocated_by_onnxruntime(tmp_path: Path) -> None:
    config = {"name": "m", "backend": "onnxruntime", "max_batch_size": 0,
              "input": [io("X", "TYPE_FP32", [-1, 4])], "output": [io("Y", "TYPE_FP32", [-1])]}
    backend = loaded(spec(tmp_path, onnx_models.flatten_unknown(), config))
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    region = mmap.mmap(-1, 4096)
    request = Request("r", {"X": x}, ["Y"], output_buffers={"Y": memoryview(region)})
    y = ok(backend.execute([request])[0])["Y"]
    np.testing.assert_array_equal(y, x.reshape(-1))
    assert backend.last_run.in_place == []
    del y, request       # the array kept ORT's buffer alive; nothing dangles after


def test_gpu_instance_without_the_cuda_provider_fails_clearly(tmp_path: Path) -> None:
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider")
    with pytest.raises(BackendError) as caught:
        backend = OnnxRuntimeBackend()
        model_spec = spec(tmp_path, onnx_models.mlp(), mlp_config())
        backend.model_initialize(model_spec)
        backend.instance_initialize(model_spec, InstanceSpec("m_0_0", "KIND_GPU", 0, 0))
    assert caught.value.code == "UNAVAILABLE"
    assert "CUDAExecutionProvider (pip install onnxruntime-gpu)" in caught.value.message


@pytest.mark.gpu
def test_gpu_instance_runs_on_the_cuda_provider(tmp_path: Path) -> None:
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime without the CUDA provider (pip install onnxruntime-gpu)")
    backend = OnnxRuntimeBackend()
    model_spec = spec(tmp_path, onnx_models.mlp(), mlp_config())
    backend.model_initialize(model_spec)
    backend.instance_initialize(model_spec, InstanceSpec("m_0_0", "KIND_GPU", 0, 0))
    assert backend._session.get_providers()[0] == "CUDAExecutionProvider"
    x = np.random.default_rng(6).standard_normal((4, 4)).astype(np.float32)
    y = ok(backend.execute([Request("r", {"X": x}, [])])[0])["Y"]
    np.testing.assert_allclose(y, onnx_models.mlp_reference(x), rtol=1e-4, atol=1e-4)


# --- real servers -----------------------------------------------------------------------------

MLP_CONFIG = """
platform: "onnxruntime_onnx"
max_batch_size: 8
input [ { name: "X" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "Y" data_type: TYPE_FP32 dims: [ 3 ] } ]
"""
BATCHING_CONFIG = MLP_CONFIG.replace("platform", "backend").replace(
    '"onnxruntime_onnx"', '"onnxruntime"') + """
dynamic_batching { preferred_batch_size: [ 4 ] max_queue_delay_microseconds: 2000000 }
"""
STRINGS_CONFIG = """
backend: "onnxruntime"
input [ { name: "S" data_type: TYPE_STRING dims: [ -1 ] } ]
output [ { name: "T" data_type: TYPE_STRING dims: [ -1 ] } ]
"""
IDENTITY_CONFIG = """
backend: "onnxruntime"
input [ { name: "X" data_type: TYPE_FP32 dims: [ -1, -1 ] } ]
output [ { name: "Y" data_type: TYPE_FP32 dims: [ -1, -1 ] } ]
parameters { key: "intra_op_thread_count" value: { string_value: "1" } }
optimization { graph { level: 1 } }
"""
# Two intra-op threads: ORT's pool has a thread of its own (spinning or not).
THREADED_IDENTITY_CONFIG = IDENTITY_CONFIG.replace('string_value: "1"', 'string_value: "2"')
FLATTEN_CONFIG = """
backend: "onnxruntime"
input [ { name: "X" data_type: TYPE_FP32 dims: [ -1, 4 ] } ]
output [ { name: "Y" data_type: TYPE_FP32 dims: [ -1 ] } ]
"""
IDENTITY_BATCHING_CONFIG = """
backend: "onnxruntime"
max_batch_size: 8
input [ { name: "X" data_type: TYPE_FP32 dims: [ -1 ] } ]
output [ { name: "Y" data_type: TYPE_FP32 dims: [ -1 ] } ]
dynamic_batching { preferred_batch_size: [ 4 ] max_queue_delay_microseconds: 2000000 }
"""
SEQUENCE_CONFIG = """
backend: "onnxruntime"
max_batch_size: 4
sequence_batching {
  oldest { max_candidate_sequences: 4 }
  control_input [
    { name: "START" control [ { kind: CONTROL_SEQUENCE_START int32_false_true: [ 0, 1 ] } ] },
    { name: "READY" control [ { kind: CONTROL_SEQUENCE_READY int32_false_true: [ 0, 1 ] } ] },
    { name: "CORRID" control [ { kind: CONTROL_SEQUENCE_CORRID data_type: TYPE_UINT64 } ] }
  ]
}
input [ { name: "INPUT" data_type: TYPE_INT32 dims: [ 1 ] } ]
output [
  { name: "OUTPUT" data_type: TYPE_INT32 dims: [ 1 ] },
  { name: "CORRID_SEEN" data_type: TYPE_UINT64 dims: [ 1 ] }
]
"""
STATE_CONFIG = """
backend: "onnxruntime"
max_batch_size: 4
sequence_batching {
  direct { }
  state [ { input_name: "STATE_IN" output_name: "STATE_OUT" data_type: TYPE_INT32 dims: [ 1 ]
            initial_state: { data_type: TYPE_INT32 dims: [ 1 ] zero_data: true name: "zero" } } ]
}
input [ { name: "INPUT" data_type: TYPE_INT32 dims: [ 1 ] } ]
output [ { name: "OUTPUT" data_type: TYPE_INT32 dims: [ 1 ] } ]
"""
SERVED = ["onnx_mlp", "onnx_auto", "onnx_multi", "onnx_strings", "onnx_batching",
          "onnx_identity", "onnx_flatten", "onnx_identity_batching", "onnx_identity_threads",
          "onnx_sequence", "onnx_state"]


def build_onnx_repository(repo: Path) -> Path:
    onnx_models.write_model(repo, "onnx_mlp", onnx_models.mlp(), MLP_CONFIG)
    onnx_models.write_model(repo, "onnx_auto", onnx_models.mlp())          # no config at all
    onnx_models.write_model(repo, "onnx_multi", onnx_models.multi_io(),    # inputs completed
                            'backend: "onnxruntime"\nmax_batch_size: 2\n')
    onnx_models.write_model(repo, "onnx_strings", onnx_models.strings(), STRINGS_CONFIG)
    onnx_models.write_model(repo, "onnx_batching", onnx_models.mlp(), BATCHING_CONFIG)
    onnx_models.write_model(repo, "onnx_identity", onnx_models.identity_like(), IDENTITY_CONFIG)
    onnx_models.write_model(repo, "onnx_identity_batching", onnx_models.identity_like(),
                            IDENTITY_BATCHING_CONFIG)
    onnx_models.write_model(repo, "onnx_flatten", onnx_models.flatten_unknown(), FLATTEN_CONFIG)
    onnx_models.write_model(repo, "onnx_identity_threads", onnx_models.identity_like(),
                            THREADED_IDENTITY_CONFIG)
    onnx_models.write_model(repo, "onnx_bad_input", onnx_models.mlp(),
                            MLP_CONFIG.replace('name: "X"', 'name: "INPUT0"'))
    onnx_models.write_model(repo, "onnx_no_batch", onnx_models.mlp(batch=2), MLP_CONFIG)
    onnx_models.write_model(repo, "onnx_sequence", onnx_models.sequence_controls(),
                            SEQUENCE_CONFIG)
    onnx_models.write_model(repo, "onnx_state", onnx_models.accumulator_state(), STATE_CONFIG)
    return repo


@pytest.fixture(scope="module")
def onnx_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("onnx")
    repo = build_onnx_repository(root / "repo")
    flags = ["--model-control-mode", "explicit", "--local-socket", str(root / "local.sock"),
             "--arena-idle-secs", "0"]     # arenas keep their size: peak memory is comparable
    for name in SERVED:
        flags += ["--load-model", name]
    server = ServerProcess(repo, *flags)
    server.wait_ready()
    yield server
    assert server.stop() == 0, server.log()
    assert arena_segments(server.pid) == []


@pytest.fixture
def client(onnx_server: ServerProcess) -> Iterator[grpcclient.InferenceServerClient]:
    triton = grpcclient.InferenceServerClient(onnx_server.url)
    yield triton
    triton.close()


def infer_input(name: str, array: np.ndarray, datatype: str) -> grpcclient.InferInput:
    item = grpcclient.InferInput(name, list(array.shape), datatype)
    item.set_data_from_numpy(array)
    return item


def test_server_mlp_with_and_without_a_config(client: grpcclient.InferenceServerClient) -> None:
    x = np.random.default_rng(3).standard_normal((3, 4)).astype(np.float32)
    (expected,) = direct(onnx_models.mlp(), {"X": x})
    for name in ("onnx_mlp", "onnx_auto"):
        result = client.infer(name, [infer_input("X", x, "FP32")])
        np.testing.assert_array_equal(result.as_numpy("Y"), expected)
    # No config.pbtxt: the backend from model.onnx, the rest from the model (Triton's
    # auto-complete: max_batch_size 4 and dynamic batching for a dynamic first dim).
    config = client.get_model_config("onnx_auto").config
    assert config.backend == "onnxruntime"
    assert config.max_batch_size == 4
    assert config.HasField("dynamic_batching")
    assert [(t.name, t.data_type, list(t.dims)) for t in config.input] == [("X", 11, [4])]
    assert [(t.name, t.data_type, list(t.dims)) for t in config.output] == [("Y", 11, [3])]
    metadata = client.get_model_metadata("onnx_mlp")
    assert metadata.platform == "onnxruntime_onnx"
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == \
        [("X", "FP32", [-1, 4])]


def test_server_several_inputs_outputs_and_strings(client: grpcclient.InferenceServerClient
                                                   ) -> None:
    config = client.get_model_config("onnx_multi").config
    assert [t.name for t in config.input] == ["A", "B", "C"]
    assert config.max_batch_size == 2
    rng = np.random.default_rng(4)
    inputs = {"A": rng.standard_normal((2, 4)).astype(np.float32),
              "B": rng.standard_normal((2, 4)).astype(np.float32),
              "C": rng.integers(-50, 50, (2, 2)).astype(np.int32)}
    result = client.infer("onnx_multi", [infer_input("A", inputs["A"], "FP32"),
                                         infer_input("B", inputs["B"], "FP32"),
                                         infer_input("C", inputs["C"], "INT32")])
    for name, expected in zip(["SUM", "DIFF", "TWICE"],
                              direct(onnx_models.multi_io(), inputs), strict=True):
        np.testing.assert_array_equal(result.as_numpy(name), expected)
    # An output whose shape only the run decides (ORT's own buffer, read in place), large
    # enough for the IO binding and the output arena.
    x = np.arange(64 << 10, dtype=np.float32).reshape(-1, 4)
    result = client.infer("onnx_flatten", [infer_input("X", x, "FP32")])
    np.testing.assert_array_equal(result.as_numpy("Y"), x.reshape(-1))
    words = np.array([b"one", b"two", "dr\u00eei".encode()], dtype=np.object_)
    result = client.infer("onnx_strings", [infer_input("S", words, "BYTES")])
    assert result.as_numpy("T").tolist() == words.tolist()


@pytest.mark.parametrize(("model", "builder", "columns"), [
    ("onnx_batching", onnx_models.mlp, 4),
    # 256 KiB a request: the batch's output is computed in the output arena and each
    # request's part is sent from there
    ("onnx_identity_batching", onnx_models.identity_like, 65536)])
def test_server_dynamic_batching_forms_real_batches(onnx_server: ServerProcess,
                                                    client: grpcclient.InferenceServerClient,
                                                    model: str, builder: Any,
                                                    columns: int) -> None:
    before = client.get_inference_statistics(model).model_stats[0]
    xs = [np.random.default_rng(i).standard_normal((1, columns)).astype(np.float32)
          for i in range(4)]

    def call(x: np.ndarray) -> np.ndarray:
        own = grpcclient.InferenceServerClient(onnx_server.url)
        try:
            return np.asarray(own.infer(model, [infer_input("X", x, "FP32")]).as_numpy("Y"))
        finally:
            own.close()

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(call, xs))
    for x, y in zip(xs, results, strict=True):
        np.testing.assert_allclose(y, direct(builder(), {"X": x})[0], rtol=1e-5, atol=1e-5)
    after = client.get_inference_statistics(model).model_stats[0]
    assert after.inference_count - before.inference_count == 4
    assert after.execution_count - before.execution_count == 1, "one batch of 4 expected"


def _worker_of(server: ServerProcess, model: str) -> int:
    for pid in worker_pids(server.pid):
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        if f"worker {model} ".encode() in cmdline:
            return pid
    raise AssertionError(f"no worker for {model}")


def _peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_server_zero_copy_between_client_regions(onnx_server: ServerProcess,
                                                 client: grpcclient.InferenceServerClient
                                                 ) -> None:
    """32 MiB in a client region, 32 MiB out into another: ORT reads the one and writes the
    other, so the worker's peak memory does not grow by a buffer of that size (one copy of
    either tensor would add 32 MiB)."""
    rows, cols = 2048, 4096
    nbytes = rows * cols * 4
    x = np.arange(rows * cols, dtype=np.float32).reshape(rows, cols)
    key = f"/onnx_zc_{onnx_server.pid}"
    region_in = shm.create_shared_memory_region("onnx_in", key + "_in", nbytes)
    region_out = shm.create_shared_memory_region("onnx_out", key + "_out", nbytes)
    try:
        shm.set_shared_memory_region(region_in, [x])
        client.register_system_shared_memory("onnx_in", key + "_in", nbytes)
        client.register_system_shared_memory("onnx_out", key + "_out", nbytes)
        inputs = [grpcclient.InferInput("X", [rows, cols], "FP32")]
        inputs[0].set_shared_memory("onnx_in", nbytes)
        output = grpcclient.InferRequestedOutput("Y")
        output.set_shared_memory("onnx_out", nbytes)
        client.infer("onnx_identity", inputs, outputs=[output])     # maps both regions
        worker = _worker_of(onnx_server, "onnx_identity")
        Path(f"/proc/{worker}/clear_refs").write_text("5")          # reset the peak RSS
        baseline = _peak_rss_kib(worker)
        shm.set_shared_memory_region(region_out, [np.zeros_like(x)])
        result = client.infer("onnx_identity", inputs, outputs=[output])
        grown_mib = (_peak_rss_kib(worker) - baseline) / 1024
        assert list(result.get_response().raw_output_contents) == [b""]   # no bytes on the wire
        np.testing.assert_array_equal(
            shm.get_contents_as_numpy(region_out, np.float32, [rows, cols]), x)
        assert grown_mib < 12, f"the worker's peak RSS grew by {grown_mib:.0f} MiB"
    finally:
        client.unregister_system_shared_memory()
        shm.destroy_shared_memory_region(region_in)
        shm.destroy_shared_memory_region(region_out)


def test_server_outputs_are_computed_in_the_output_arena(
        onnx_server: ServerProcess, client: grpcclient.InferenceServerClient) -> None:
    """32 MiB in and out as gRPC payload: ORT writes the output into the worker's output
    arena, where the supervisor reads it, instead of a buffer of its own copied there after
    (which would add 32 MiB to the worker's peak memory)."""
    rows, cols = 2048, 4096
    x = np.random.default_rng(8).standard_normal((rows, cols)).astype(np.float32)
    worker = _worker_of(onnx_server, "onnx_identity")
    growth = []
    for _ in range(2):      # the first grows the arenas to size
        Path(f"/proc/{worker}/clear_refs").write_text("5")
        baseline = _peak_rss_kib(worker)
        result = client.infer("onnx_identity", [infer_input("X", x, "FP32")])
        growth.append((_peak_rss_kib(worker) - baseline) / 1024)
        np.testing.assert_array_equal(result.as_numpy("Y"), x)
    # With frontend processes the 32 MiB input reaches the worker in the frontend's spill
    # memfd, a new mapping per request whose pages count in the worker's RSS once read; the
    # output must still add nothing.
    limit = 12 if os.environ.get("SHMSERVE_GRPC_FRONTENDS", "1") == "1" else 12 + 32
    assert growth[1] < limit, f"the worker's peak RSS grew by {growth[1]:.0f} MiB"


def _cpu_ns(pid: int) -> int:
    """CPU time of all of ``pid``'s threads so far (schedstat: nanoseconds, not ticks)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            total += int((task / "schedstat").read_text().split()[0])
    return total


def test_server_worker_idles_without_spinning(onnx_server: ServerProcess,
                                              client: grpcclient.InferenceServerClient
                                              ) -> None:
    """After a run large enough for ORT's thread pool, the worker's threads sleep: spinning
    ones burn up to about 30 ms of CPU per run while the answer travels back (issue 17).
    Measured over five idle spells after five runs, since a run does not always wake the
    pool (threads left spinning: 20-45 ms in all; stopped: under 0.5 ms)."""
    x = np.ones((16, 1 << 18), dtype=np.float32)    # 16 MiB: split over the pool's threads
    worker = _worker_of(onnx_server, "onnx_identity_threads")
    client.infer("onnx_identity_threads", [infer_input("X", x, "FP32")])
    idle_cpu_ms = []
    for _ in range(5):
        client.infer("onnx_identity_threads", [infer_input("X", x, "FP32")])
        before = _cpu_ns(worker)
        time.sleep(0.2)
        idle_cpu_ms.append((_cpu_ns(worker) - before) / 1e6)
    assert sum(idle_cpu_ms) < 5, f"the idle worker used {idle_cpu_ms} ms of CPU"


def test_local_channel_region_in_and_out(onnx_server: ServerProcess) -> None:
    """shmserve's own client on the local channel: tensors allocated in its region go in and
    come back in place (the array the client passed for the output is the answer)."""
    from shmserve.client import Client
    with Client(onnx_server.url, transport="shm",
                local_socket=str(onnx_server.repository.parent / "local.sock")) as client:
        assert client.transport != "grpc"
        with client.shared_memory(4 << 20) as region:
            x = region.ndarray((256, 1024), np.float32)
            y = region.ndarray((256, 1024), np.float32)
            x[:] = np.random.default_rng(7).standard_normal(x.shape)
            out = client.infer("onnx_identity", {"X": x}, outputs={"Y": y})
            assert out["Y"] is y
            np.testing.assert_array_equal(y, x)


def test_supervisor_never_loads_onnxruntime(onnx_server: ServerProcess) -> None:
    def maps(pid: int) -> str:
        return Path(f"/proc/{pid}/maps").read_text()

    assert "onnxruntime" in maps(_worker_of(onnx_server, "onnx_mlp"))    # the check can see it
    assert "onnxruntime" not in maps(onnx_server.pid)


def test_server_load_errors(onnx_server: ServerProcess,
                            client: grpcclient.InferenceServerClient) -> None:
    cases = {
        "onnx_bad_input": "unexpected inference input 'INPUT0', allowed inputs are: X",
        "onnx_no_batch": "model 'onnx_no_batch', tensor 'X': for the model to support batching "
                         "the shape should have at least 1 dimension and the first dimension "
                         "must be -1; but shape expected by the model is [2,4]",
    }
    for name, text in cases.items():
        with pytest.raises(InferenceServerException) as caught:
            client.load_model(name)
        assert text in caught.value.message(), caught.value.message()
        assert not client.is_model_ready(name)
    assert client.is_model_ready("onnx_mlp")


def test_missing_onnxruntime_fails_only_its_models(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker whose interpreter cannot import onnxruntime (a package folder that raises the
    ImportError of an absent module shadows the installed one) fails the ONNX model's load with
    the extra to install; the python model beside it serves."""
    shadow = tmp_path / "shadow" / "onnxruntime"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text(
        'raise ModuleNotFoundError("No module named \'onnxruntime\'", name="onnxruntime")\n')
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "shadow"))
    repo = build_repository(tmp_path / "repo", ["simple"])
    onnx_models.write_model(repo, "onnx_mlp", onnx_models.mlp(), MLP_CONFIG)
    onnx_models.write_model(repo, "onnx_auto", onnx_models.mlp())
    with ServerProcess(repo, "--exit-on-error", "false") as server:
        server.wait_started()
        triton = grpcclient.InferenceServerClient(server.url)
        try:
            assert triton.is_model_ready("simple")
            data = np.arange(16, dtype=np.int32).reshape(1, 16)
            result = triton.infer("simple", [infer_input("INPUT0", data, "INT32"),
                                             infer_input("INPUT1", data, "INT32")])
            np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), data * 2)
            for name in ("onnx_mlp", "onnx_auto"):     # the worker; the auto-complete child
                assert not triton.is_model_ready(name)
                index = {m.name: m for m in triton.get_model_repository_index().models}
                assert "pip install 'shmserve[onnx]'" in index[name].reason, index[name].reason
        finally:
            triton.close()


def test_worker_skips_the_copy_only_for_an_output_already_in_place() -> None:
    from shmserve.workers.main import _same_memory
    region = mmap.mmap(-1, 8192)
    target = memoryview(region)[1024:2048]
    in_place = np.ndarray((256,), np.float32, target)
    assert _same_memory(target, in_place.data.cast("B"))
    assert not _same_memory(target, in_place.copy().data.cast("B"))
    assert not _same_memory(target, bytes(1024))


def test_encrypted_onnx_model_serves_through_the_decrypt_agent(tmp_path: Path) -> None:
    """``shmserve encrypt-model`` on an ONNX model whose config names neither the backend nor
    the tensors: the decrypt agent's location is where the backend is inferred, the config
    completed and the session opened."""
    import subprocess
    import sys
    plain = tmp_path / "plain"
    onnx_models.write_model(plain, "onnx_secret", onnx_models.mlp(), "max_batch_size: 2\n")
    repo = tmp_path / "repo"
    repo.mkdir()
    key = tmp_path / "model.key"
    done = subprocess.run([sys.executable, "-m", "shmserve.daemon", "encrypt-model",
                           str(plain / "onnx_secret"), str(repo / "onnx_secret"),
                           "--generate-key", str(key)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert not (repo / "onnx_secret" / "1" / "model.onnx").exists()
    assert (repo / "onnx_secret" / "1" / "model.onnx.enc").exists()
    with ServerProcess(repo) as server:
        server.wait_ready()
        triton = grpcclient.InferenceServerClient(server.url)
        try:
            x = np.random.default_rng(5).standard_normal((2, 4)).astype(np.float32)
            result = triton.infer("onnx_secret", [infer_input("X", x, "FP32")])
            np.testing.assert_array_equal(result.as_numpy("Y"),
                                          direct(onnx_models.mlp(), {"X": x})[0])
            config = triton.get_model_config("onnx_secret").config
            assert (config.backend, config.max_batch_size) == ("onnxruntime", 2)
        finally:
            triton.close()


@pytest.mark.parametrize(("setting", "expected"), [("default-max-batch-size=0", 0),
                                                   ("default-max-batch-size=8", 8)])
def test_backend_config_default_max_batch_size(tmp_path: Path, setting: str,
                                               expected: int) -> None:
    """tritonserver's --backend-config default-max-batch-size: what a batching ONNX model's
    auto-completed config gets (0: no batching); other backend settings are accepted."""
    repo = tmp_path / "repo"
    onnx_models.write_model(repo, "onnx_auto", onnx_models.mlp())
    with ServerProcess(repo, f"--backend-config={setting}",
                       "--backend-config=onnxruntime,enable-global-threadpool=1") as server:
        server.wait_ready()
        config = grpcclient.InferenceServerClient(server.url).get_model_config(
            "onnx_auto").config
        assert config.max_batch_size == expected
        assert config.HasField("dynamic_batching") == (expected > 1)
        assert "--backend-config=onnxruntime,enable-global-threadpool=1" in server.log()


# --- sequence models: control inputs and implicit state --------------------------------------

def _sequence_step(client: grpcclient.InferenceServerClient, model: str, sequence_id: int,
                   value: int, start: bool = False, end: bool = False) -> dict[str, int]:
    result = client.infer(model, [infer_input("INPUT", np.array([[value]], np.int32), "INT32")],
                          sequence_id=sequence_id, sequence_start=start, sequence_end=end,
                          client_timeout=20)
    return {out.name: int(result.as_numpy(out.name).reshape(-1)[0])
            for out in result.get_response().outputs}


def test_server_sequence_controls_reach_the_onnx_model(client: grpcclient.InferenceServerClient
                                                      ) -> None:
    """START, READY and CORRID are model inputs the server fills (Triton's simple_sequence
    and simple_dyna_sequence examples are such ONNX models)."""
    assert _sequence_step(client, "onnx_sequence", 41, 5, start=True) == {
        "OUTPUT": 5 + 1000 + 10, "CORRID_SEEN": 41}
    assert _sequence_step(client, "onnx_sequence", 42, 7, start=True)["OUTPUT"] == 1017
    assert _sequence_step(client, "onnx_sequence", 41, 6, end=True) == {
        "OUTPUT": 6 + 10, "CORRID_SEEN": 41}
    assert _sequence_step(client, "onnx_sequence", 42, 8, end=True) == {
        "OUTPUT": 18, "CORRID_SEEN": 42}


def test_server_onnx_implicit_state(client: grpcclient.InferenceServerClient) -> None:
    """STATE_OUT becomes the sequence's next STATE_IN (zeros at START); it is not sent, the
    config not declaring it as an output."""
    assert _sequence_step(client, "onnx_state", 51, 5, start=True) == {"OUTPUT": 5}
    assert _sequence_step(client, "onnx_state", 52, 100, start=True) == {"OUTPUT": 100}
    assert _sequence_step(client, "onnx_state", 51, 2) == {"OUTPUT": 7}
    assert _sequence_step(client, "onnx_state", 52, 1, end=True) == {"OUTPUT": 101}
    assert _sequence_step(client, "onnx_state", 51, 3, start=True) == {"OUTPUT": 3}  # reset
    assert _sequence_step(client, "onnx_state", 51, 4, end=True) == {"OUTPUT": 7}


def _sequence_config(**replace: str) -> dict[str, Any]:
    text = SEQUENCE_CONFIG
    for old, new in replace.items():
        assert old in text, old
        text = text.replace(old, new)
    return json_format.MessageToDict(text_format.Parse(text, mc.ModelConfig()),
                                     preserving_proto_field_name=True)


@pytest.mark.parametrize(("config", "message", "code"), [
    (_sequence_config(**{'name: "CORRID"': 'name: "CORR_ID"'}),
     "configuration specified sequence control 'CORR_ID', but model does not provide that "
     "input", "INTERNAL"),
    (_sequence_config(TYPE_UINT64="TYPE_INT64"),
     "unable to load model 'm', sequence control 'CORRID', the model expects data-type UINT64 "
     "but the model configuration specifies data-type TYPE_INT64", "INVALID_ARGUMENT"),
    (_sequence_config(**{"max_batch_size: 4": "max_batch_size: 0",
                         'INPUT" data_type: TYPE_INT32 dims: [ 1 ]':
                         'INPUT" data_type: TYPE_INT32 dims: [ -1, 1 ]'}),
     "unable to load model 'm', sequence control 'START' in model has dims [-1,1] but dims "
     "[1] is expected", "INVALID_ARGUMENT"),
])
def test_sequence_control_mismatches(tmp_path: Path, config: dict[str, Any], message: str,
                                     code: str) -> None:
    with pytest.raises(BackendError) as caught:
        loaded(spec(tmp_path, onnx_models.sequence_controls(), config))
    assert caught.value.message == message
    assert caught.value.code == code


def test_sequence_inputs_count_as_model_inputs(tmp_path: Path) -> None:
    config = _sequence_config()
    config["sequence_batching"]["control_input"].pop()     # no CORRID: one input unexplained
    with pytest.raises(BackendError) as caught:
        loaded(spec(tmp_path, onnx_models.sequence_controls(), config))
    assert caught.value.message == ("unable to load model 'm', configuration expects 3 inputs, "
                                    "model provides 4")
