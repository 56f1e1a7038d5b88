"""The dali backend: hooks in-process, then a real server through tritonclient.

Pipelines are defined and serialized by the tests (tests/dali_models.py) and every served
result is checked against the same pipeline run directly in this process. Everything here skips
when NVIDIA DALI is missing; tests/test_dali_config.py (pure logic) and the missing-package test
in tests/test_dali_missing.py run everywhere. DALI runs CPU-only pipelines without a GPU, so only
the KIND_GPU test needs one.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("nvidia.dali", reason="the dali backend tests need NVIDIA DALI "
                                          "(pip install 'shmserve[dali]')")

import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from shmserve.tests import dali_models
from shmserve.tests.conftest import assert_no_arenas
from shmserve.tests.serverproc import TEST_MODELS, ServerProcess
from shmserve.workers.backend import (
    BackendError,
    InstanceSpec,
    ModelSpec,
    Request,
    resolve_backend,
)
from shmserve.workers.backends.dali import DaliBackend
from shmserve.workers.backends.dali.pipeline_def import (
    CPU_ONLY_DEVICE_ID,
    read_pipeline,
    with_device,
)

CPU = InstanceSpec("m_0_0", "KIND_CPU", 0, 0)
CONFIG: dict[str, Any] = {
    "name": "m", "backend": "dali", "max_batch_size": 8,
    "input": [{"name": "IMAGES", "data_type": "TYPE_UINT8", "dims": [-1, -1, 3]}],
    "output": [{"name": "CROPPED", "data_type": "TYPE_UINT8", "dims": [2, 3, 3]},
               {"name": "NORMALIZED", "data_type": "TYPE_FP32", "dims": [3, 2, 3]}],
}


def images(count: int, height: int = 4, width: int = 5, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (count, height, width, 3), dtype=np.uint8)


def expected(batch: np.ndarray) -> list[np.ndarray]:
    return dali_models.run_directly(dali_models.crop_normalize, {"IMAGES": batch})


def spec_for(tmp_path: Path, model_file: bytes | None = None, filename: str = "model.dali",
             config: dict[str, Any] | None = None) -> ModelSpec:
    version = tmp_path / "m" / "1"
    version.mkdir(parents=True, exist_ok=True)
    if model_file is not None:
        (version / filename).write_bytes(model_file)
    return ModelSpec("m", 1, dict(config or CONFIG), str(tmp_path / "m"), str(version))


def loaded(spec: ModelSpec) -> DaliBackend:
    backend = DaliBackend()
    backend.backend_initialize({})
    backend.model_initialize(spec)
    backend.instance_initialize(spec, CPU)
    return backend


# --- in-process: the hooks --------------------------------------------------------------------

def test_backend_resolves_by_entry_point_name() -> None:
    assert resolve_backend("dali") is DaliBackend


def test_pipeline_declarations_are_read_without_dali() -> None:
    info = read_pipeline(dali_models.serialized(dali_models.crop_normalize))
    assert [(t.name, t.config_type, t.ndim) for t in info.inputs] == [("IMAGES", "TYPE_UINT8", 3)]
    assert len(info.outputs) == 2 and info.max_batch_size == 8
    assert info.device_id == CPU_ONLY_DEVICE_ID
    declared = read_pipeline(dali_models.serialized(dali_models.scaled))
    assert [(t.name, t.config_type, t.ndim) for t in declared.outputs] == \
        [(declared.outputs[0].name, "TYPE_FP32", 1)]


def test_requests_of_a_batch_run_as_one_dali_batch(tmp_path: Path) -> None:
    backend = loaded(spec_for(tmp_path, dali_models.serialized(dali_models.crop_normalize)))
    first = images(2)
    first.flags.writeable = False               # inputs may be read-only views of shared memory
    second = images(3, height=6, width=7, seed=1)   # other sample shapes: fed as one DALI batch
    responses = backend.execute([Request("a", {"IMAGES": first}, []),
                                 Request("b", {"IMAGES": second}, [])])
    for response, batch in zip(responses, (first, second), strict=True):
        assert response.error is None, response.error
        cropped, normalized = expected(batch)
        np.testing.assert_array_equal(response.outputs["CROPPED"], cropped)
        np.testing.assert_array_equal(response.outputs["NORMALIZED"], normalized)
    assert responses[1].outputs["NORMALIZED"].shape == (3, 3, 2, 3)


def test_one_pipeline_run_per_batch(tmp_path: Path) -> None:
    config = {**CONFIG, "output": [CONFIG["output"][0],
                                   {"name": "POSITION", "data_type": "TYPE_INT32", "dims": [1]}]}
    backend = loaded(spec_for(tmp_path, dali_models.serialized(dali_models.batch_probe),
                              config=config))
    responses = backend.execute([Request("a", {"IMAGES": images(2)}, []),
                                 Request("b", {"IMAGES": images(3, seed=1)}, [])])
    positions = [int(p) for r in responses for p in r.outputs["POSITION"].reshape(-1)]
    assert sorted(positions) == [0, 1, 2, 3, 4], "the 5 samples should have run as one batch"


def test_a_batch_larger_than_the_pipeline_runs_in_passes(tmp_path: Path) -> None:
    config = dict(CONFIG, max_batch_size=2)       # the pipeline is built for batches of 2
    backend = loaded(spec_for(tmp_path, dali_models.serialized(dali_models.crop_normalize),
                              config=config))
    batches = [images(2, seed=seed) for seed in range(3)]
    responses = backend.execute([Request(str(i), {"IMAGES": b}, [])
                                 for i, b in enumerate(batches)])
    for response, batch in zip(responses, batches, strict=True):
        assert response.error is None, response.error
        np.testing.assert_array_equal(response.outputs["CROPPED"], expected(batch)[0])


def test_a_failed_run_fails_its_requests_and_the_pipeline_is_rebuilt(tmp_path: Path) -> None:
    backend = loaded(spec_for(tmp_path, dali_models.serialized(dali_models.crop_normalize)))
    [bad] = backend.execute([Request("bad", {"IMAGES": np.zeros((1, 4, 5), np.uint8)}, [])])
    assert bad.error is not None
    assert "ExternalSource expected data with 3 dimensions and got 2" in bad.error.message
    [good] = backend.execute([Request("good", {"IMAGES": images(1)}, [])])
    assert good.error is None, good.error
    np.testing.assert_array_equal(good.outputs["CROPPED"], expected(images(1))[0])


def test_requests_the_pipeline_cannot_take_fail_alone(tmp_path: Path) -> None:
    config = dict(CONFIG, max_batch_size=0, input=[
        {"name": "IMAGES", "data_type": "TYPE_UINT8", "dims": [-1, -1, -1, 3]}], output=[
        {"name": "CROPPED", "data_type": "TYPE_UINT8", "dims": [-1, 2, 3, 3]},
        {"name": "NORMALIZED", "data_type": "TYPE_FP32", "dims": [-1, 3, 2, 3]}])
    backend = loaded(spec_for(tmp_path, dali_models.serialized(dali_models.crop_normalize),
                              config=config))                # the pipeline's batch size: 8
    too_many, empty, fine = backend.execute([
        Request("a", {"IMAGES": images(9)}, []), Request("b", {"IMAGES": images(0)}, []),
        Request("c", {"IMAGES": images(8)}, [])])
    assert too_many.error is not None and empty.error is not None
    assert "has 9 samples; its DALI pipeline takes 1 to 8" in too_many.error.message
    assert fine.error is None, fine.error
    np.testing.assert_array_equal(fine.outputs["CROPPED"], expected(images(8))[0])


def test_python_pipeline_file_is_autoserialized(tmp_path: Path) -> None:
    source = (TEST_MODELS / "dali_autoserialize" / "1" / "dali.py").read_bytes()
    backend = loaded(spec_for(tmp_path, source, filename="dali.py"))
    batch = images(2)
    [response] = backend.execute([Request("a", {"IMAGES": batch}, [])])
    assert response.error is None, response.error
    np.testing.assert_array_equal(response.outputs["NORMALIZED"], expected(batch)[1])


def test_pipeline_serialized_for_a_gpu_runs_on_a_cpu_instance(tmp_path: Path) -> None:
    # A model.dali serialized on a GPU host carries device_id 0; a KIND_CPU instance runs it.
    on_gpu = with_device(dali_models.serialized(dali_models.crop_normalize), 0)
    assert read_pipeline(on_gpu).device_id == 0
    backend = loaded(spec_for(tmp_path, on_gpu))
    [response] = backend.execute([Request("a", {"IMAGES": images(1)}, [])])
    assert response.error is None, response.error


@pytest.mark.filterwarnings("ignore:nvidia-dali-cuda120 is no longer shipped with CUDA")
def test_gpu_operators_on_a_cpu_instance_fail_the_load(tmp_path: Path) -> None:
    config = dict(CONFIG, output=CONFIG["output"][:1])
    with pytest.raises(BackendError) as caught:
        loaded(spec_for(tmp_path, dali_models.serialized(dali_models.on_gpu), config=config))
    message = caught.value.message
    assert message.startswith("unable to load model 'm_0_0': DALI could not build the "
                              "pipeline: "), message


@pytest.mark.parametrize(("change", "message"), [
    ({"input": [{"name": "PIXELS", "data_type": "TYPE_UINT8", "dims": [-1, -1, 3]}]},
     "Configuration file contains config for PIXELS but such input is not present in the "
     "pipeline."),
    ({"input": [{"name": "IMAGES", "data_type": "TYPE_FP32", "dims": [-1, -1, 3]}]},
     'Mismatch of data_type config for "IMAGES".\nData type defined in config: TYPE_FP32\n'
     "Data type defined in pipeline: TYPE_UINT8"),
    ({"input": [{"name": "IMAGES", "data_type": "TYPE_UINT8", "dims": [-1, 3]}]},
     'Mismatch in number of dimensions for "IMAGES"'),
    ({"output": CONFIG["output"][:1]},
     "The number of outputs specified in the DALI pipeline and the configuration file do not "
     "match.\nModel config outputs: 1\nPipeline outputs: 2"),
])
def test_config_contradicting_the_pipeline_fails_the_load(tmp_path: Path, change: dict[str, Any],
                                                          message: str) -> None:
    spec = spec_for(tmp_path, dali_models.serialized(dali_models.crop_normalize),
                    config={**CONFIG, **change})
    with pytest.raises(BackendError) as caught:
        loaded(spec)
    assert message in caught.value.message
    assert caught.value.code == "INVALID_ARGUMENT"


def test_missing_or_unreadable_model_file(tmp_path: Path) -> None:
    with pytest.raises(BackendError) as caught:
        loaded(spec_for(tmp_path, b"this is not a DALI pipeline"))
    version = tmp_path / "m" / "1"
    assert caught.value.message.startswith(
        f"unable to load model 'm': Failed to load model file. The program looked in the "
        f"following locations: {version}/model.dali, {version}/dali.py.")


# --- a real server ---------------------------------------------------------------------------

SERVED = ["dali_crop_normalize", "dali_autoserialize", "dali_batching", "dali_autocomplete",
          "simple"]


@pytest.fixture(scope="module")
def dali_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    repo = dali_models.build_dali_repository(tmp_path_factory.mktemp("dali") / "repo",
                                             [*SERVED, "dali_broken"])
    flags = ["--model-control-mode", "explicit"]
    for name in SERVED:
        flags += ["--load-model", name]
    server = ServerProcess(repo, *flags)
    server.wait_ready()
    yield server
    code = server.stop()
    assert code == 0, server.log()
    assert_no_arenas(server.pid)


@pytest.fixture
def client(dali_server: ServerProcess) -> Iterator[grpcclient.InferenceServerClient]:
    triton = grpcclient.InferenceServerClient(dali_server.url)
    yield triton
    triton.close()


def infer_images(client: grpcclient.InferenceServerClient, model: str,
                 batch: np.ndarray) -> Any:
    tensor = grpcclient.InferInput("IMAGES", list(batch.shape), "UINT8")
    tensor.set_data_from_numpy(batch)
    return client.infer(model, [tensor])


@pytest.mark.parametrize("model", ["dali_crop_normalize", "dali_autoserialize"])
def test_server_pipeline_matches_the_pipeline_run_directly(
        client: grpcclient.InferenceServerClient, model: str) -> None:
    metadata = client.get_model_metadata(model)
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == \
        [("IMAGES", "UINT8", [-1, -1, -1, 3])]
    for batch in (images(3), images(1, height=120, width=240, seed=2)):  # 2nd: via the arena
        result = infer_images(client, model, batch)
        cropped, normalized = expected(batch)
        np.testing.assert_array_equal(result.as_numpy("CROPPED"), cropped)
        np.testing.assert_array_equal(result.as_numpy("NORMALIZED"), normalized)


def test_server_completes_the_config_from_the_pipeline(
        client: grpcclient.InferenceServerClient) -> None:
    config = client.get_model_config("dali_autocomplete").config
    assert config.backend == "dali" and config.max_batch_size == 4
    assert [(t.name, t.data_type, list(t.dims), t.allow_ragged_batch) for t in config.input] == \
        [("VALUES", 11, [-1], True)]                                   # 11: TYPE_FP32
    [output] = config.output
    assert (output.data_type, list(output.dims)) == (11, [-1])
    assert config.HasField("dynamic_batching")
    values = np.arange(6, dtype=np.float32).reshape(2, 3)
    tensor = grpcclient.InferInput("VALUES", [2, 3], "FP32")
    tensor.set_data_from_numpy(values)
    result = client.infer("dali_autocomplete", [tensor])
    np.testing.assert_array_equal(result.as_numpy(output.name), values * 2)


def test_server_batches_concurrent_requests(client: grpcclient.InferenceServerClient,
                                            dali_server: ServerProcess) -> None:
    model = "dali_batching"
    before = client.get_inference_statistics(model).model_stats[0]
    batches = [images(1, seed=seed) for seed in range(4)]

    def call(batch: np.ndarray) -> Any:
        own = grpcclient.InferenceServerClient(dali_server.url)
        try:
            return infer_images(own, model, batch)
        finally:
            own.close()

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(call, batches))
    for batch, result in zip(batches, results, strict=True):
        np.testing.assert_array_equal(result.as_numpy("CROPPED"), expected(batch)[0])
    positions = sorted(int(result.as_numpy("POSITION")[0, 0]) for result in results)
    assert positions == [0, 1, 2, 3], "the four requests should have run as one DALI batch"
    after = client.get_inference_statistics(model).model_stats[0]
    assert after.inference_count - before.inference_count == 4
    assert after.execution_count - before.execution_count == 1, \
        "the four requests should have run as one DALI batch"


def test_server_broken_pipeline_file_fails_its_load_only(
        client: grpcclient.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException) as caught:
        client.load_model("dali_broken")
    message = caught.value.message()
    assert "Failed to load model file" in message, message
    assert "dali.py: RuntimeError: this pipeline file is broken on purpose" in message, message
    assert not client.is_model_ready("dali_broken")
    result = infer_images(client, "dali_crop_normalize", images(1))
    np.testing.assert_array_equal(result.as_numpy("CROPPED"), expected(images(1))[0])
    simple = grpcclient.InferInput("INPUT0", [1, 16], "INT32")
    simple.set_data_from_numpy(np.ones((1, 16), np.int32))
    other = grpcclient.InferInput("INPUT1", [1, 16], "INT32")
    other.set_data_from_numpy(np.ones((1, 16), np.int32))
    assert client.infer("simple", [simple, other]).as_numpy("OUTPUT0").tolist() == [[2] * 16]


@pytest.mark.gpu
@pytest.mark.filterwarnings("ignore:nvidia-dali-cuda120 is no longer shipped with CUDA")
def test_gpu_pipeline_on_a_gpu_instance(tmp_path: Path) -> None:
    """A pipeline with GPU operators on a KIND_GPU instance; its outputs come back to the host."""
    backend = DaliBackend()
    source = (TEST_MODELS / "dali_autoserialize" / "1" / "dali.py").read_text()
    gpu_source = source.replace('fn.crop(images,', 'fn.crop(images.gpu(),')
    spec = spec_for(tmp_path, gpu_source.encode(), filename="dali.py")
    backend.model_initialize(spec)
    backend.instance_initialize(spec, InstanceSpec("m_0_0", "KIND_GPU", 0, 0))
    batch = images(2)
    [response] = backend.execute([Request("a", {"IMAGES": batch}, [])])
    assert response.error is None, response.error
    np.testing.assert_array_equal(response.outputs["CROPPED"], expected(batch)[0])
