"""The dali backend's pure parts, without DALI: reading a serialized pipeline's declarations,
and checking/completing a config against them with the texts of Triton's DALI backend."""

from __future__ import annotations

from typing import Any

import pytest

from shmserve.daemon.auto_complete import states_max_batch_size
from shmserve.workers.backend import BackendError
from shmserve.workers.backends.dali import pipeline_def
from shmserve.workers.backends.dali.config_check import autofill_config, validate_config
from shmserve.workers.backends.dali.pipeline_def import (
    CPU_ONLY_DEVICE_ID,
    PipelineDefError,
    PipelineInfo,
    PipelineTensor,
    read_pipeline,
    with_device,
)

UINT8, FLOAT = 0, 9
IMAGES = PipelineTensor("IMAGES", UINT8, 3)
INFO = PipelineInfo(inputs=(IMAGES,),
                    outputs=(PipelineTensor("__Crop_0", UINT8, 3), PipelineTensor("__Cmn_1")),
                    max_batch_size=16, num_threads=2, device_id=CPU_ONLY_DEVICE_ID)


def serialized_by_hand() -> bytes:
    """A PipelineDef as DALI writes one: an ExternalSource op and two pipeline outputs."""
    message = pipeline_def._PipelineDef()
    message.batch_size, message.num_threads, message.device_id = 16, 2, 0
    source = message.op.add(name="ExternalSource", inst_name="IMAGES")
    source.output.add(name="IMAGES", device="cpu")
    source.args.add(name="device", strings=["cpu"])
    source.args.add(name="dtype", ints=[UINT8])
    source.args.add(name="ndim", ints=[3])
    message.op.add(name="Crop", inst_name="__Crop_0").output.add(name="__Crop_0", device="cpu")
    message.pipe_outputs.add(name="__Crop_0", device="cpu", dtype=UINT8, ndim=3)
    message.pipe_outputs.add(name="__Cmn_1", device="cpu", dtype=-1, ndim=-1)
    return bytes(message.SerializeToString())


def config(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "name": "m", "backend": "dali", "max_batch_size": 8,
        "input": [{"name": "IMAGES", "data_type": "TYPE_UINT8", "dims": [-1, -1, 3]}],
        "output": [{"name": "CROPPED", "data_type": "TYPE_UINT8", "dims": [2, 3, 3]},
                   {"name": "NORMALIZED", "data_type": "TYPE_FP32", "dims": [3, 2, 3]}]}
    return {**base, **overrides}


def test_read_pipeline_declarations() -> None:
    info = read_pipeline(serialized_by_hand())
    assert info.inputs == (PipelineTensor("IMAGES", UINT8, 3, "cpu"),)
    assert [(t.name, t.config_type, t.ndim) for t in info.outputs] == \
        [("__Crop_0", "TYPE_UINT8", 3), ("__Cmn_1", None, None)]
    assert (info.max_batch_size, info.num_threads, info.device_id) == (16, 2, 0)


def test_with_device_rewrites_only_the_device() -> None:
    original = serialized_by_hand()
    moved = with_device(original, CPU_ONLY_DEVICE_ID)
    assert read_pipeline(moved).device_id == CPU_ONLY_DEVICE_ID
    assert read_pipeline(moved).inputs == read_pipeline(original).inputs


def test_not_a_pipeline() -> None:
    with pytest.raises(PipelineDefError):
        read_pipeline(b"import nvidia.dali\n")


def test_a_matching_config_is_valid() -> None:
    validate_config(config(), INFO)
    # max_batch_size 0: dims count the sample dimension too.
    validate_config(config(max_batch_size=0, input=[
        {"name": "IMAGES", "data_type": "TYPE_UINT8", "dims": [-1, -1, -1, 3]}],
        output=[{"name": "A", "data_type": "TYPE_UINT8", "dims": [-1, 2, 3, 3]},
                {"name": "B", "data_type": "TYPE_FP32", "dims": [-1]}]), INFO)


@pytest.mark.parametrize(("overrides", "message"), [
    ({"input": []}, 'Missing config for "IMAGES" input.'),
    ({"input": [{"name": "IMAGES", "data_type": "TYPE_UINT8", "dims": [-1, -1, 3]},
                {"name": "EXTRA", "data_type": "TYPE_UINT8", "dims": [1]}]},
     "Configuration file contains config for EXTRA but such input is not present in the "
     "pipeline."),
    ({"input": [{"name": "IMAGES", "data_type": "TYPE_INT8", "dims": [-1, -1, 3]}]},
     'Mismatch of data_type config for "IMAGES".\nData type defined in config: TYPE_INT8\n'
     "Data type defined in pipeline: TYPE_UINT8"),
    ({"input": [{"name": "IMAGES", "data_type": "TYPE_INVALID", "dims": [-1, -1, 3]}]},
     'Missing data_type config for "IMAGES"'),
    ({"input": [{"name": "IMAGES", "data_type": "TYPE_UINT8", "dims": []}]},
     'Missing dims config for "IMAGES"'),
    ({"input": [{"name": "IMAGES", "data_type": "TYPE_UINT8", "dims": [-1, 3]}]},
     'Mismatch in number of dimensions for "IMAGES"\nNumber of dimensions defined in config: 2\n'
     "Number of dimensions defined in pipeline: 3"),
    ({"max_batch_size": 0},
     'Mismatch in number of dimensions for "IMAGES"\nNumber of dimensions defined in config: 3\n'
     "Number of dimensions defined in pipeline: 4"),
    ({"output": [{"name": "CROPPED", "data_type": "TYPE_UINT8", "dims": [2, 3, 3]}]},
     "The number of outputs specified in the DALI pipeline and the configuration file do not "
     "match.\nModel config outputs: 1\nPipeline outputs: 2"),
    ({"output": [{"name": "CROPPED", "data_type": "TYPE_FP32", "dims": [2, 3, 3]},
                 {"name": "NORMALIZED", "data_type": "TYPE_FP32", "dims": [3, 2, 3]}]},
     'Mismatch of data_type config for "CROPPED".'),
])
def test_config_mismatches(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(BackendError) as caught:
        validate_config(config(**overrides), INFO)
    assert caught.value.code == "INVALID_ARGUMENT"
    assert caught.value.message.startswith(message), caught.value.message


def test_autofill_from_the_pipeline() -> None:
    bare = {"name": "m", "backend": "dali"}
    completed = autofill_config(bare, INFO, max_batch_size_given=False)
    assert completed["max_batch_size"] == 16
    assert completed["input"] == [{"name": "IMAGES", "data_type": "TYPE_UINT8",
                                   "dims": [-1, -1, -1], "allow_ragged_batch": True}]
    assert completed["output"] == [{"name": "__Crop_0", "data_type": "TYPE_UINT8",
                                    "dims": [-1, -1, -1]},
                                   {"name": "__Cmn_1", "data_type": "TYPE_INVALID"}]
    assert completed["dynamic_batching"] == {}
    assert bare == {"name": "m", "backend": "dali"}          # the argument is left alone


def test_autofill_keeps_what_the_config_says() -> None:
    partial = {"name": "m", "backend": "dali", "max_batch_size": 4,
               "input": [{"name": "IMAGES", "dims": [-1, -1, 3]}],
               "output": [{"name": "CROPPED", "dims": [2, 3, 3]}]}
    completed = autofill_config(partial, INFO, max_batch_size_given=True)
    assert completed["max_batch_size"] == 4
    assert completed["input"][0]["dims"] == [-1, -1, 3]
    assert completed["output"][0] == {"name": "CROPPED", "data_type": "TYPE_UINT8",
                                      "dims": [2, 3, 3]}
    assert completed["output"][1]["name"] == "__Cmn_1"
    unbatched = autofill_config({"name": "m", "max_batch_size": 0}, INFO,
                                max_batch_size_given=True)
    assert unbatched["max_batch_size"] == 0 and "dynamic_batching" not in unbatched
    assert unbatched["input"][0]["dims"] == [-1, -1, -1, -1]
    with pytest.raises(BackendError, match="Mismatch in number of dimensions for \"CROPPED\""):
        autofill_config({"output": [{"name": "CROPPED", "dims": [2, 3]}]}, INFO, False)


def test_states_max_batch_size() -> None:
    assert states_max_batch_size('name: "m"\nmax_batch_size: 0\n')
    assert not states_max_batch_size('name: "m"\n# max_batch_size: 8\n')
    assert not states_max_batch_size('name: "m"\ndynamic_batching {\n max_batch_size: 8\n}\n')
