"""default_model_filename "entry.py"; helpers imported relatively and from sys.path."""

from typing import Any

import shmserve_pyb_test_helper_abs
import triton_python_backend_utils as pb_utils

from .helpers import scale


class TritonPythonModel:
    def execute(self, requests: list[Any]) -> list[Any]:
        offset = shmserve_pyb_test_helper_abs.OFFSET
        return [
            pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(
                "OUTPUT0",
                scale(pb_utils.get_input_tensor_by_name(r, "INPUT0").as_numpy()) + offset)])
            for r in requests
        ]
