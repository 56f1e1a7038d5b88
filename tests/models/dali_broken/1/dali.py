import nvidia.dali as dali
import nvidia.dali.fn as fn
from nvidia.dali.plugin.triton import autoserialize


@autoserialize
@dali.pipeline_def(batch_size=8, num_threads=1, device_id=0)
def pipe():
    images = fn.external_source(device="cpu", name="IMAGES")
    return fn.crop(images, crop=(2, 3), no_such_argument=True)


raise RuntimeError("this pipeline file is broken on purpose")
