# The pipeline of tests/dali_models.py crop_normalize(), as a model repository's dali.py:
# Triton's DALI backend (and shmserve's) serializes the one @autoserialize pipeline_def here.
import nvidia.dali as dali
import nvidia.dali.fn as fn
import nvidia.dali.types as types
from nvidia.dali.plugin.triton import autoserialize


@autoserialize
@dali.pipeline_def(batch_size=8, num_threads=1, device_id=0)
def pipe():
    images = fn.external_source(device="cpu", name="IMAGES", dtype=types.UINT8, ndim=3,
                                layout="HWC")
    cropped = fn.crop(images, crop=(2, 3), crop_pos_x=0.25, crop_pos_y=0.5)
    normalized = fn.crop_mirror_normalize(images, crop=(2, 3), crop_pos_x=0.25, crop_pos_y=0.5,
                                          mean=[10.0, 20.0, 30.0], std=[2.0, 4.0, 8.0],
                                          dtype=types.FLOAT, output_layout="CHW")
    return cropped, normalized
