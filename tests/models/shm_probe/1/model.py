"""Write through the input view: the client sees the change in its own segment (zero copy)."""

import json
import time
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests: list[Any]) -> list[Any]:
        responses = []
        for request in requests:
            data = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            sleep_ms = json.loads(request.parameters() or "{}").get("sleep_ms", 0)
            if sleep_ms:
                time.sleep(float(sleep_ms) / 1000.0)
            writeable = bool(data.flags.writeable)
            if writeable:
                data += np.uint8(1)
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("OUTPUT0", data),
                pb_utils.Tensor("WRITEABLE", np.array([int(writeable)], dtype=np.int32)),
            ]))
        return responses
