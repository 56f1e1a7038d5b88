"""CPU-bound test model: spins for a fixed amount of CPU time, then returns INPUT0 * 3 + 1.

The spin counts this thread's CPU time (not wall time), so every request costs the same CPU
however busy the host is: throughput can only grow with instances while cores are free.
"""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        burn = config.get("parameters", {}).get("burn_ms", {}).get("string_value", "2")
        self.burn_s = float(burn) / 1000.0

    def execute(self, requests: list[Any]) -> list[Any]:
        responses = []
        for request in requests:
            data = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            deadline = time.thread_time() + self.burn_s
            while time.thread_time() < deadline:
                pass
            result = (data.astype(np.int64) * 3 + 1).astype(np.int32)
            responses.append(
                pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("OUTPUT0", result)]))
        return responses
