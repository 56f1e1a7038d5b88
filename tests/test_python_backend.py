"""The built-in python backend, driven in-process through its hooks with real model.py files.

The model repositories live in tests/models_pybackend/; each ModelSpec below carries the model
config in Triton's model_config JSON form (what config.pbtxt becomes).
"""

from __future__ import annotations

import json
import logging
import mmap
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from shmserve.workers.backend import (
    BackendError,
    InstanceSpec,
    ModelSpec,
    Request,
    Response,
    resolve_backend,
)
from shmserve.workers.backends.python import (
    PythonBackend,
    auto_complete_config,
    visible_device_id,
)
from shmserve.workers.backends.python import triton_python_backend_utils as pb_utils

MODELS = Path(__file__).parent / "models_pybackend"


# -- helpers ----------------------------------------------------------------------------------

def tensor(name: str, data_type: str, dims: list[int]) -> dict[str, Any]:
    return {"name": name, "data_type": data_type, "dims": dims}


def config(name: str, inputs: list[dict[str, Any]], outputs: list[dict[str, Any]],
           max_batch_size: int = 0, **extra: Any) -> dict[str, Any]:
    """A model config as Triton's model_config JSON (proto field names, dims as numbers)."""
    return {
        "name": name,
        "backend": "python",
        "max_batch_size": max_batch_size,
        "input": inputs,
        "output": outputs,
        "instance_group": [{"name": f"{name}_0", "kind": "KIND_CPU", "count": 1, "gpus": []}],
        **extra,
    }


FP32_IO: dict[str, Any] = {
    "inputs": [tensor("INPUT0", "TYPE_FP32", [1])],
    "outputs": [tensor("OUTPUT0", "TYPE_FP32", [1])],
}

CONFIGS: dict[str, dict[str, Any]] = {
    "simple": config(
        "simple",
        [tensor("INPUT0", "TYPE_INT32", [16]), tensor("INPUT1", "TYPE_INT32", [16])],
        [tensor("OUTPUT0", "TYPE_INT32", [16]), tensor("OUTPUT1", "TYPE_INT32", [16])]),
    "bytes_model": config(
        "bytes_model", [tensor("INPUT0", "TYPE_STRING", [-1, -1])],
        [tensor("UPPER", "TYPE_STRING", [-1, -1]), tensor("REVERSED", "TYPE_STRING", [-1, -1]),
         tensor("LENGTHS", "TYPE_INT32", [-1, -1])]),
    "partial_error": config(
        "partial_error", [tensor("INPUT0", "TYPE_FP32", [4])],
        [tensor("OUTPUT0", "TYPE_FP32", [4])], max_batch_size=8, dynamic_batching={}),
    "execute_raises": config("execute_raises", **FP32_IO),
    "init_raises": config("init_raises", **FP32_IO),
    "no_class": config("no_class", **FP32_IO),
    "decoupled_echo": config(
        "decoupled_echo", [tensor("INPUT0", "TYPE_FP32", [-1])],
        [tensor("OUTPUT0", "TYPE_FP32", [-1])], model_transaction_policy={"decoupled": True}),
    "sender_answers": config(
        "sender_answers", [tensor("INPUT0", "TYPE_FP32", [1])],
        [tensor("OUTPUT0", "TYPE_FP32", [1])]),
    "identity": config(
        "identity", [tensor("INPUT0", "TYPE_FP32", [-1])], [tensor("OUTPUT0", "TYPE_FP32", [-1])]),
    "bad_return": config(
        "bad_return", **FP32_IO, parameters={"flavour": {"string_value": "broken"}}),
    "bls_caller": config("bls_caller", **FP32_IO),
    "introspect": config(
        "introspect", [tensor("INPUT0", "TYPE_INT64", [2])],
        [tensor("ECHO", "TYPE_STRING", [1]), tensor("DOUBLE", "TYPE_INT64", [2])],
        max_batch_size=4, parameters={"greeting": {"string_value": "hello"}}),
    "async_model": config(
        "async_model", [tensor("INPUT0", "TYPE_INT32", [-1])],
        [tensor("OUTPUT0", "TYPE_INT32", [-1])]),
    "relative_import": config(
        "relative_import", [tensor("INPUT0", "TYPE_INT32", [-1])],
        [tensor("OUTPUT0", "TYPE_INT32", [-1])], default_model_filename="entry.py"),
}


def model_spec(name: str, model_config: dict[str, Any] | None = None,
               repository: Path = MODELS, version: int = 1) -> ModelSpec:
    model_dir = repository / name
    return ModelSpec(name=name, version=version,
                     config=model_config if model_config is not None else CONFIGS[name],
                     repository_path=str(model_dir), version_path=str(model_dir / str(version)))


def instance_spec(name: str, index: int = 0) -> InstanceSpec:
    return InstanceSpec(name=f"{name}_0_{index}", kind="KIND_CPU", device_id=0, index=index)


class Loaded:
    """Backends loaded by a test; the fixture finalizes them the way a worker does."""

    def __init__(self) -> None:
        self.backends: list[PythonBackend] = []

    def __call__(self, name: str, model_config: dict[str, Any] | None = None) -> PythonBackend:
        backend = PythonBackend()
        backend.backend_initialize({})
        self.backends.append(backend)
        model = model_spec(name, model_config)
        backend.model_initialize(model)
        backend.instance_initialize(model, instance_spec(name))
        return backend

    def finalize(self) -> None:
        for backend in self.backends:
            backend.instance_finalize()
            backend.model_finalize()
            backend.backend_finalize()


@pytest.fixture
def load() -> Iterator[Loaded]:
    loaded = Loaded()
    yield loaded
    loaded.finalize()


def request(inputs: dict[str, Any], request_id: str = "", requested: list[str] | None = None,
            parameters: dict[str, Any] | None = None, correlation_id: int | str = 0) -> Request:
    return Request(request_id=request_id, inputs=inputs, requested_outputs=requested or [],
                   parameters=parameters or {}, correlation_id=correlation_id)


def ok(response: Response) -> dict[str, Any]:
    assert response.error is None, response.error.message
    return response.outputs


def failed(response: Response) -> BackendError:
    assert response.error is not None, f"expected an error, got outputs {response.outputs}"
    return response.error


# -- the simple add/sub model -----------------------------------------------------------------

def test_simple_add_sub(load: Loaded, capsys: pytest.CaptureFixture[str]) -> None:
    backend = load("simple")
    a = np.arange(16, dtype=np.int32)
    b = np.full(16, 3, dtype=np.int32)
    responses = backend.execute([
        request({"INPUT0": a, "INPUT1": b}, "r1"),
        request({"INPUT0": b, "INPUT1": a}, "r2"),
    ])
    assert len(responses) == 2
    first, second = ok(responses[0]), ok(responses[1])
    assert set(first) == {"OUTPUT0", "OUTPUT1"}
    np.testing.assert_array_equal(first["OUTPUT0"], a + b)
    np.testing.assert_array_equal(first["OUTPUT1"], a - b)
    np.testing.assert_array_equal(second["OUTPUT1"], b - a)
    assert first["OUTPUT0"].dtype == np.int32
    backend.instance_finalize()
    assert "Cleaning up..." in capsys.readouterr().out


def test_requested_outputs_filter_the_response(load: Loaded) -> None:
    backend = load("simple")
    a = np.ones(16, dtype=np.int32)
    (response,) = backend.execute([request({"INPUT0": a, "INPUT1": a}, requested=["OUTPUT1"])])
    outputs = ok(response)
    assert list(outputs) == ["OUTPUT1"]
    np.testing.assert_array_equal(outputs["OUTPUT1"], np.zeros(16, dtype=np.int32))


def test_model_finalize_runs_finalize_once(capsys: pytest.CaptureFixture[str]) -> None:
    backend = PythonBackend()
    model = model_spec("simple")
    backend.model_initialize(model)
    backend.instance_initialize(model, instance_spec("simple"))
    backend.model_finalize()                    # without instance_finalize first
    backend.instance_finalize()                 # a second call is harmless
    assert capsys.readouterr().out.count("Cleaning up...") == 1


def test_user_code_gets_our_pb_utils(load: Loaded) -> None:
    load("simple")
    assert sys.modules["triton_python_backend_utils"] is pb_utils


def test_resolved_by_entry_point() -> None:
    assert resolve_backend("python") is PythonBackend


# -- BYTES ------------------------------------------------------------------------------------

def test_bytes_model(load: Loaded) -> None:
    backend = load("bytes_model")
    words = np.empty((2, 2), dtype=np.object_)
    words[:] = [[b"hello", b""], ["w\u00f6rld".encode(), b"a\x00b"]]
    (response,) = backend.execute([request({"INPUT0": words})])
    outputs = ok(response)
    upper, reversed_text, lengths = outputs["UPPER"], outputs["REVERSED"], outputs["LENGTHS"]
    assert upper.dtype == np.object_ and upper.shape == (2, 2)
    assert upper.tolist() == [[b"HELLO", b""], ["W\u00f6RLD".encode(), b"A\x00B"]]
    # A str ('U') array from the model goes out as an object array of UTF-8 bytes.
    assert reversed_text.dtype == np.object_
    assert reversed_text.tolist() == [[b"olleh", b""], ["dlr\u00f6w".encode(), b"b\x00a"]]
    assert lengths.tolist() == [[5, 0], [6, 3]]


# -- errors -----------------------------------------------------------------------------------

def test_triton_error_fails_only_its_request(load: Loaded) -> None:
    backend = load("partial_error")
    good = np.array([[1, 4, 9, 16]], dtype=np.float32)
    bad = np.array([[1, -4, 9, 16]], dtype=np.float32)
    responses = backend.execute([request({"INPUT0": good}, "a"), request({"INPUT0": bad}, "b"),
                                 request({"INPUT0": good * 4}, "c")])
    assert len(responses) == 3
    np.testing.assert_allclose(ok(responses[0])["OUTPUT0"], [[1, 2, 3, 4]])
    error = failed(responses[1])
    assert error.code == "INVALID_ARGUMENT"
    assert error.message == "request b: negative input"
    assert responses[1].outputs == {}
    np.testing.assert_allclose(ok(responses[2])["OUTPUT0"], [[2, 4, 6, 8]])


def test_execute_raising_fails_the_whole_batch(load: Loaded,
                                               caplog: pytest.LogCaptureFixture) -> None:
    backend = load("execute_raises")
    x = np.zeros(1, dtype=np.float32)
    responses = backend.execute([request({"INPUT0": x}) for _ in range(3)])
    assert len(responses) == 3
    for response in responses:
        error = failed(response)
        assert error.code == "INTERNAL"
        assert "ValueError: boom: cannot handle 3 request(s)" in error.message
        assert "execute_raises_0_0" in error.message
    # The instance keeps serving (and failing) later batches.
    assert failed(backend.execute([request({"INPUT0": x})])[0]).code == "INTERNAL"
    # finalize() raises in this model: logged, not propagated.
    with caplog.at_level(logging.ERROR):
        backend.instance_finalize()
    assert "finalize failed too" in caplog.text


def test_initialize_raising_fails_the_load() -> None:
    backend = PythonBackend()
    model = model_spec("init_raises")
    backend.model_initialize(model)
    with pytest.raises(BackendError) as info:
        backend.instance_initialize(model, instance_spec("init_raises"))
    assert "RuntimeError: weights file weights.bin is corrupt" in info.value.message
    assert "init_raises_0_0" in info.value.message
    backend.model_finalize()


def test_missing_model_file(tmp_path: Path) -> None:
    (tmp_path / "ghost" / "1").mkdir(parents=True)
    model = model_spec("ghost", config("ghost", **FP32_IO), repository=tmp_path)
    with pytest.raises(BackendError) as info:
        PythonBackend().model_initialize(model)
    assert info.value.code == "NOT_FOUND"
    assert str(tmp_path / "ghost" / "1" / "model.py") in info.value.message


def test_missing_default_model_filename() -> None:
    model = model_spec("simple", {**CONFIGS["simple"], "default_model_filename": "nope.py"})
    with pytest.raises(BackendError) as info:
        PythonBackend().model_initialize(model)
    assert str(MODELS / "simple" / "1" / "nope.py") in info.value.message


def test_model_without_triton_python_model() -> None:
    with pytest.raises(BackendError) as info:
        PythonBackend().model_initialize(model_spec("no_class"))
    assert "TritonPythonModel" in info.value.message
    assert str(MODELS / "no_class" / "1" / "model.py") in info.value.message


def test_model_that_fails_to_import(tmp_path: Path) -> None:
    (tmp_path / "broken" / "1").mkdir(parents=True)
    (tmp_path / "broken" / "1" / "model.py").write_text(
        "import shmserve_no_such_module_for_tests\n")
    model = model_spec("broken", config("broken", **FP32_IO), repository=tmp_path)
    with pytest.raises(BackendError) as info:
        PythonBackend().model_initialize(model)
    assert "failed to import model file" in info.value.message
    assert "No module named 'shmserve_no_such_module_for_tests'" in info.value.message
    assert not any(name.startswith("_shmserve_pymodel_") and name.endswith("_broken")
                   for name in sys.modules)


@pytest.mark.parametrize(("mode", "fragment"), [
    ("none", "must return a list of pb_utils.InferenceResponse, got NoneType"),
    ("tuple", "must return a list of pb_utils.InferenceResponse, got tuple"),
    ("short", "InferenceRequest(s) size is:3, and InferenceResponse(s) size is:2"),
    ("wrong_item", "returned a str at index 2; expected pb_utils.InferenceResponse"),
    ("bad_tensor", "TritonModelException: InferenceResponse: output_tensors[0] is a str"),
])
def test_wrong_execute_return_fails_every_request(load: Loaded, mode: str,
                                                  fragment: str) -> None:
    backend = load("bad_return")
    x = np.zeros(1, dtype=np.float32)
    responses = backend.execute([request({"INPUT0": x}, parameters={"mode": mode})
                                 for _ in range(3)])
    assert len(responses) == 3
    for response in responses:
        error = failed(response)
        assert fragment in error.message
        assert error.code == "INTERNAL"
    # The same model is fine when it behaves.
    (response,) = backend.execute([request({"INPUT0": x}, parameters={"mode": "ok"})])
    assert ok(response) == {}


def test_bls_outside_a_worker_is_an_error_response(load: Loaded) -> None:
    """In-process (no worker, no server) there is nothing to call: exec() answers with an
    error response, which this model raises. BLS itself: tests/test_bls.py."""
    backend = load("bls_caller")
    (response,) = backend.execute([request({"INPUT0": np.zeros(1, dtype=np.float32)})])
    error = failed(response)
    assert "BLS is not available in this process" in error.message


def test_decoupled_model_answers_through_its_requests_sinks(load: Loaded) -> None:
    """A decoupled model gets a sender per request, wired to the request's sink; execute
    answers each request as streamed."""
    backend = load("decoupled_echo")
    sink = _ListSink()
    item = request({"INPUT0": np.array([3.0], dtype=np.float32)})
    item.sink = sink
    (response,) = backend.execute([item])
    assert response.streamed
    assert [(r.outputs["OUTPUT0"].tolist() if r else None, final) for r, final in sink.sent] \
        == [([3.0], False), ([3.0], False), (None, True)]


class _ListSink:
    def __init__(self) -> None:
        self.sent: list[tuple[Response | None, bool]] = []

    def send(self, response: Response | None, final: bool) -> None:
        self.sent.append((response, final))

    def is_cancelled(self) -> bool:
        return False


def test_non_decoupled_model_may_answer_through_response_senders(load: Loaded) -> None:
    backend = load("sender_answers")
    first, second = backend.execute([request({"INPUT0": np.array([1.0], dtype=np.float32)}),
                                     request({"INPUT0": np.array([2.0], dtype=np.float32)})])
    assert ok(first)["OUTPUT0"].tolist() == [2.0]
    assert ok(second)["OUTPUT0"].tolist() == [4.0]  # sent from a thread after execute


def test_response_sender_texts_are_tritons() -> None:
    sent: list[Any] = []
    sender = pb_utils.InferenceResponseSender(lambda r, f: sent.append((r, f)))
    with pytest.raises(pb_utils.TritonModelException) as info:
        sender.send()
    assert str(info.value) == ("Inference Response object must be provided when the response "
                               "flags is set to zero.")
    with pytest.raises(pb_utils.TritonModelException) as info:
        sender.send(pb_utils.InferenceResponse(), flags=4)
    assert str(info.value) == "Unable to send response. Unsupported flag provided."
    sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
    with pytest.raises(pb_utils.TritonModelException) as info:
        sender.send(pb_utils.InferenceResponse())
    assert str(info.value) == "Unable to send response. Response sender has been closed."
    assert sent == [(None, True)]
    plain = pb_utils.InferenceResponseSender(None, decoupled=False)
    with pytest.raises(pb_utils.TritonModelException) as info:
        plain.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
    assert str(info.value) == ("Unable to send response. Non-decoupled model cannot send "
                               "complete final before sending a response.")
    plain.send(pb_utils.InferenceResponse())
    with pytest.raises(pb_utils.TritonModelException) as info:
        plain.send(pb_utils.InferenceResponse(), pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
    assert str(info.value) == ("Unable to send response. Non-decoupled model cannot send more "
                               "than one response.")


def test_execute_before_initialize_is_an_error_not_a_crash() -> None:
    responses = PythonBackend().execute([request({}), request({})])
    assert [failed(r).code for r in responses] == ["UNAVAILABLE", "UNAVAILABLE"]


# -- zero copy --------------------------------------------------------------------------------

def test_inputs_are_not_copied(load: Loaded) -> None:
    backend = load("identity")
    region = mmap.mmap(-1, 4096)                 # stands in for a shared-memory segment
    writable = np.frombuffer(region, dtype=np.float32, count=8, offset=64)
    readonly = np.frombuffer(b"\x00" * 32, dtype=np.float32)
    assert not readonly.flags.writeable
    responses = backend.execute([request({"INPUT0": writable}), request({"INPUT0": readonly})])
    seen = backend._model_object.seen
    for array, response, model_saw in zip([writable, readonly], responses, seen, strict=True):
        assert model_saw is array                # Tensor.as_numpy() is the array passed in
        assert np.shares_memory(ok(response)["OUTPUT0"], array)
    writable[0] = 42.0
    assert seen[0][0] == 42.0


def test_tensor_holds_the_given_array() -> None:
    array = np.arange(6, dtype=np.float32).reshape(2, 3)
    t = pb_utils.Tensor("x", array)
    assert t.as_numpy() is array
    assert t.name() == "x"
    assert t.shape() == [2, 3]
    assert t.is_cpu()
    assert t.triton_dtype() == 11


# -- what the model sees ----------------------------------------------------------------------

def test_initialize_args_and_request_accessors(load: Loaded,
                                               caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO):
        backend = load("introspect")
    assert "initialized introspect_0_0" in caplog.text
    data = np.array([[1, 2]], dtype=np.int64)
    (response,) = backend.execute([request(
        {"INPUT0": data}, "req-7", correlation_id=99,
        parameters={"temperature": 0.5, "tag": "x", "sequence_start": True, "sequence_id": 99})])
    outputs = ok(response)
    np.testing.assert_array_equal(outputs["DOUBLE"], data * 2)
    report = json.loads(outputs["ECHO"][0][0])
    args = report["args"]
    assert report["arg_types"] == ["str"]
    assert json.loads(args["model_config"]) == CONFIGS["introspect"]
    assert args["model_instance_kind"] == "CPU"
    assert args["model_instance_name"] == "introspect_0_0"
    assert args["model_instance_device_id"] == "0"
    assert args["model_repository"] == str(MODELS / "introspect")
    assert args["model_version"] == "1"
    assert args["model_name"] == "introspect"
    assert report["greeting"] == "hello"
    assert report["request_id"] == "req-7"
    assert report["correlation_id"] == 99
    assert report["parameters"] == {"temperature": 0.5, "tag": "x"}
    assert report["flags"] == pb_utils.TRITONSERVER_REQUEST_FLAG_SEQUENCE_START
    # No requested outputs means all of them, as Triton's core fills them in.
    assert report["requested_output_names"] == ["ECHO", "DOUBLE"]
    assert report["inputs"] == ["INPUT0"]
    assert report["shape"] == [1, 2]
    assert report["is_cpu"] is True


def test_gpu_instance_kind_and_device(monkeypatch: pytest.MonkeyPatch) -> None:
    # A GPU worker is pinned to host GPU 3: inside it, that GPU is cuda:0.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    backend = PythonBackend()
    model = model_spec("introspect")
    backend.model_initialize(model)
    backend.instance_initialize(model, InstanceSpec("introspect_0_1", "KIND_GPU", 3, 1))
    try:
        (response,) = backend.execute([request({"INPUT0": np.zeros((1, 2), np.int64)},
                                               requested=["ECHO"])])
        outputs = ok(response)
        assert list(outputs) == ["ECHO"]
        report = json.loads(outputs["ECHO"][0][0])
        assert report["args"]["model_instance_kind"] == "GPU"
        assert report["args"]["model_instance_device_id"] == "0"
        assert report["requested_output_names"] == ["ECHO"]
    finally:
        backend.instance_finalize()
        backend.model_finalize()


@pytest.mark.parametrize(("kind", "host_id", "visible", "expected"), [
    ("KIND_GPU", 3, None, 3),
    ("KIND_GPU", 3, "3", 0),
    ("KIND_GPU", 3, "1,3", 1),
    ("KIND_GPU", 3, "GPU-8f2a", 0),
    ("KIND_CPU", 0, "3", 0),
])
def test_visible_device_id(monkeypatch: pytest.MonkeyPatch, kind: str, host_id: int,
                           visible: str | None, expected: int) -> None:
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert visible_device_id(InstanceSpec("m_0_0", kind, host_id, 0)) == expected


def test_async_execute(load: Loaded) -> None:
    backend = load("async_model")
    (response,) = backend.execute([request({"INPUT0": np.array([1, 2], dtype=np.int32)})])
    np.testing.assert_array_equal(ok(response)["OUTPUT0"], [2, 3])


def test_default_model_filename_and_helper_imports(load: Loaded) -> None:
    backend = load("relative_import")
    (response,) = backend.execute([request({"INPUT0": np.array([1, 2], dtype=np.int32)})])
    np.testing.assert_array_equal(ok(response)["OUTPUT0"], [17, 27])


# -- auto_complete_config ---------------------------------------------------------------------

def test_auto_complete_config() -> None:
    original = {"name": "auto_complete", "backend": "python", "max_batch_size": 0,
                "input": [], "output": []}
    snapshot = json.loads(json.dumps(original))
    result = auto_complete_config(original, str(MODELS / "auto_complete" / "1" / "model.py"))
    assert original == snapshot                  # the caller's dict is not modified
    assert result["max_batch_size"] == 8
    assert result["dynamic_batching"] == {}
    assert result["input"] == [tensor("IN", "TYPE_FP32", [4])]
    assert result["output"] == [tensor("OUT", "TYPE_FP32", [4])]
    assert result["backend"] == "python"


def test_auto_complete_config_conflict_is_an_error() -> None:
    configured = {"name": "auto_complete", "max_batch_size": 16, "input": [], "output": []}
    with pytest.raises(BackendError) as info:
        auto_complete_config(configured, str(MODELS / "auto_complete" / "1" / "model.py"))
    assert ("ValueError: configuration specified max_batch_size 16, but in auto-complete-config "
            "function for model 'auto_complete' specified max_batch_size 8") in info.value.message


def test_auto_complete_config_without_hook_is_unchanged() -> None:
    result = auto_complete_config(CONFIGS["simple"], str(MODELS / "simple" / "1" / "model.py"))
    assert result == CONFIGS["simple"]
    assert result is not CONFIGS["simple"]


def test_model_config_object() -> None:
    cfg = pb_utils.ModelConfig(json.dumps({"name": "m", "max_batch_size": 4}))
    with pytest.raises(ValueError, match="max_batch_size 4"):
        cfg.set_max_batch_size(2)
    cfg.add_input({"name": "A", "data_type": "TYPE_FP32", "dims": [2]})
    cfg.add_input({"name": "A", "data_type": "TYPE_FP32", "dims": [2]})   # same: no duplicate
    with pytest.raises(ValueError, match="expects datatype TYPE_FP32 for input 'A'"):
        cfg.add_input({"name": "A", "data_type": "TYPE_INT8", "dims": [2]})
    with pytest.raises(ValueError, match="expects dims"):
        cfg.add_input({"name": "A", "data_type": "TYPE_FP32", "dims": [3]})
    with pytest.raises(ValueError, match="missing 'dims'"):
        cfg.add_output({"name": "B", "data_type": "TYPE_FP32"})
    with pytest.raises(ValueError, match="property other than"):
        cfg.add_output({"name": "B", "data_type": "TYPE_FP32", "dims": [1], "format": "x"})
    cfg.set_model_transaction_policy({"decoupled": False})
    assert cfg.as_dict()["input"] == [tensor("A", "TYPE_FP32", [2])]
    assert cfg.as_dict()["model_transaction_policy"] == {"decoupled": False}
    cfg_seq = pb_utils.ModelConfig({"name": "s", "sequence_batching": {}})
    with pytest.raises(ValueError, match="sequence_batching"):
        cfg_seq.set_dynamic_batching()


# -- pb_utils surface -------------------------------------------------------------------------

def test_datatype_helpers() -> None:
    assert pb_utils.triton_string_to_numpy("TYPE_FP32") is np.float32
    assert pb_utils.triton_string_to_numpy("TYPE_STRING") is np.object_
    assert pb_utils.triton_string_to_numpy("TYPE_BOOL") is np.bool_
    assert pb_utils.numpy_to_triton_type(np.int32) == 8
    assert pb_utils.numpy_to_triton_type(np.dtype(np.object_)) == 13
    assert pb_utils.numpy_to_triton_type(np.complex64) is None
    assert pb_utils.triton_to_numpy_type(11) is np.float32
    with pytest.raises(pb_utils.TritonModelException):
        pb_utils.triton_string_to_numpy("TYPE_NOPE")


def test_bytes_codec() -> None:
    words = np.array([b"ab", "c\u00e9", b""], dtype=np.object_)
    wire = pb_utils.serialize_byte_tensor(words)
    assert wire.dtype == np.object_ and wire.shape == ()
    assert wire.item() == b"\x02\x00\x00\x00ab\x03\x00\x00\x00c\xc3\xa9\x00\x00\x00\x00"
    assert pb_utils.deserialize_bytes_tensor(wire.item()).tolist() == [b"ab", "c\u00e9".encode(),
                                                                       b""]
    assert pb_utils.deserialize_bytes_tensor(wire).tolist()[0] == b"ab"
    with pytest.raises(pb_utils.TritonModelException):
        pb_utils.deserialize_bytes_tensor(b"\x09\x00\x00\x00ab")


def test_config_lookups() -> None:
    cfg = CONFIGS["simple"]
    assert pb_utils.get_input_config_by_name(cfg, "INPUT1") == tensor("INPUT1", "TYPE_INT32", [16])
    output0 = pb_utils.get_output_config_by_name(cfg, "OUTPUT0")
    assert output0 is cfg["output"][0]           # the config's own dict, as Triton returns
    assert pb_utils.get_output_config_by_name(cfg, "NOPE") is None
    assert pb_utils.using_decoupled_model_transaction_policy(cfg) is False
    response = pb_utils.InferenceResponse([pb_utils.Tensor("A", np.zeros(1))])
    assert pb_utils.get_output_tensor_by_name(response, "A") is response.output_tensors()[0]
    assert pb_utils.get_output_tensor_by_name(response, "B") is None


def test_triton_error_codes() -> None:
    error = pb_utils.TritonError("nope")
    assert error.message() == "nope" and error.code() == pb_utils.TritonError.INTERNAL
    mapping = {
        pb_utils.TritonError.UNKNOWN: "UNKNOWN",
        pb_utils.TritonError.INTERNAL: "INTERNAL",
        pb_utils.TritonError.NOT_FOUND: "NOT_FOUND",
        pb_utils.TritonError.INVALID_ARG: "INVALID_ARGUMENT",
        pb_utils.TritonError.UNAVAILABLE: "UNAVAILABLE",
        pb_utils.TritonError.UNSUPPORTED: "UNIMPLEMENTED",
        pb_utils.TritonError.ALREADY_EXISTS: "ALREADY_EXISTS",
        pb_utils.TritonError.CANCELLED: "CANCELLED",
    }
    assert len(set(mapping)) == 8
    for code, name in mapping.items():
        assert pb_utils.grpc_code_name(code) == name
    response = pb_utils.InferenceResponse(output_tensors=[], error=error)
    assert response.has_error() and response.error() is error
    assert not pb_utils.InferenceResponse([]).has_error()


def test_unsupported_features_say_so() -> None:
    bls = pb_utils.InferenceRequest(model_name="other", requested_output_names=["B"],
                                    inputs=[pb_utils.Tensor("A", np.zeros(1))])
    # Outside a worker there is no server to call: one error response, also when decoupled.
    streamed = list(bls.exec(decoupled=True))
    assert len(streamed) == 1 and streamed[0].has_error()
    response = bls.exec()
    assert response.has_error()
    error = response.error()
    assert error is not None and error.code() == pb_utils.TritonError.UNAVAILABLE


def test_dlpack_round_trips_share_memory() -> None:
    array = np.arange(5, dtype=np.float64)
    t = pb_utils.Tensor("x", array)
    back = pb_utils.Tensor.from_dlpack("y", t.to_dlpack())      # a bare capsule
    assert back.name() == "y"
    assert np.shares_memory(back.as_numpy(), array)
    assert pb_utils.Tensor.from_dlpack("z", array).as_numpy().tolist() == array.tolist()
    readonly = np.frombuffer(b"\x01\x02\x03\x04", dtype=np.uint8)
    again = pb_utils.Tensor.from_dlpack("r", pb_utils.Tensor("r", readonly).to_dlpack())
    assert np.shares_memory(again.as_numpy(), readonly)
    assert not again.as_numpy().flags.writeable
    with pytest.raises(pb_utils.TritonModelException, match="BYTES"):
        pb_utils.Tensor("b", np.array([b"x"], dtype=np.object_)).to_dlpack()
    with pytest.raises(pb_utils.TritonModelException):
        pb_utils.Tensor.from_dlpack("bad", 42)
    capsule = pb_utils.Tensor("c", array).to_dlpack()
    pb_utils.Tensor.from_dlpack("first", capsule)
    with pytest.raises(pb_utils.TritonModelException, match="unused DLPack capsule"):
        pb_utils.Tensor.from_dlpack("second", capsule)


def test_logger_goes_to_python_logging(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG):
        pb_utils.Logger.log_info("i-msg")
        pb_utils.Logger.log_warn("w-msg")
        pb_utils.Logger.log_error("e-msg")
        pb_utils.Logger.log_verbose("v-msg")
        pb_utils.Logger.log("l-msg", pb_utils.LogLevel.WARNING)
    levels = {record.getMessage(): record.levelno for record in caplog.records}
    assert levels == {"i-msg": logging.INFO, "w-msg": logging.WARNING, "e-msg": logging.ERROR,
                      "v-msg": logging.DEBUG, "l-msg": logging.WARNING}
