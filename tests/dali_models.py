"""DALI pipelines for the dali backend's tests, built and serialized by the tests themselves.

Importing this module needs NVIDIA DALI (``pip install 'shmserve[dali]'``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import nvidia.dali as dali
import nvidia.dali.fn as fn
import nvidia.dali.types as types

from shmserve.tests.serverproc import build_repository

MEAN = [10.0, 20.0, 30.0]
STD = [2.0, 4.0, 8.0]


@dali.pipeline_def(batch_size=8, num_threads=1, device_id=None)
def crop_normalize() -> Any:
    """Decode-free pre-processing of uint8 HWC images: a 2x3 crop, and the same crop
    normalized per channel into float32 CHW. tests/models/dali_autoserialize/1/dali.py is the
    same pipeline as a model file."""
    images = fn.external_source(device="cpu", name="IMAGES", dtype=types.UINT8, ndim=3,
                                layout="HWC")
    cropped = fn.crop(images, crop=(2, 3), crop_pos_x=0.25, crop_pos_y=0.5)
    normalized = fn.crop_mirror_normalize(images, crop=(2, 3), crop_pos_x=0.25, crop_pos_y=0.5,
                                          mean=MEAN, std=STD, dtype=types.FLOAT,
                                          output_layout="CHW")
    return cropped, normalized


@dali.pipeline_def(batch_size=8, num_threads=1, device_id=None)
def batch_probe() -> Any:
    """The crop, and each sample's position in a random permutation of the batch that ran."""
    images = fn.external_source(device="cpu", name="IMAGES", dtype=types.UINT8, ndim=3,
                                layout="HWC")
    cropped = fn.crop(images, crop=(2, 3), crop_pos_x=0.25, crop_pos_y=0.5)
    position = fn.reshape(fn.batch_permutation(allow_repetitions=False), shape=[1])
    return cropped, position


@dali.pipeline_def(batch_size=2, num_threads=1, device_id=None)
def on_gpu() -> Any:
    """The crop on the GPU: needs a GPU instance."""
    images = fn.external_source(device="cpu", name="IMAGES", dtype=types.UINT8, ndim=3)
    return fn.crop(images.gpu(), crop=(2, 3))


@dali.pipeline_def(batch_size=4, num_threads=1, device_id=None,
                   output_dtype=[types.FLOAT], output_ndim=[1])
def scaled() -> Any:
    """Everything declared in the pipeline (dtype, ndim, outputs): enough to complete a config."""
    values = fn.external_source(device="cpu", name="VALUES", dtype=types.FLOAT, ndim=1)
    return values * 2.0


PIPELINES = {"dali_crop_normalize": crop_normalize, "dali_batching": batch_probe,
             "dali_autocomplete": scaled}


def serialized(definition: Any) -> bytes:
    pipe = definition()
    data = pipe.serialize()
    return data if isinstance(data, bytes) else bytes(data, "latin-1")


def run_directly(definition: Any, feeds: dict[str, list[np.ndarray] | np.ndarray]
                 ) -> list[np.ndarray]:
    """The pipeline run in this process on one batch: each output as one array."""
    pipe = definition()
    pipe.build()
    for name, batch in feeds.items():
        pipe.feed_input(name, batch)
    return [np.array(output.as_array()) for output in pipe.run()]


def build_dali_repository(target: Path, names: list[str]) -> Path:
    """Copy the named example/test models and write ``1/model.dali`` where this module has
    their pipeline."""
    build_repository(target, names)
    for name in names:
        definition = PIPELINES.get(name)
        if definition is not None:
            version = target / name / "1"
            version.mkdir(exist_ok=True)
            (version / "model.dali").write_bytes(serialized(definition))
    return target
