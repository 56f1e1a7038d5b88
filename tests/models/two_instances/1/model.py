import os
import time

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.name = args["model_instance_name"]

    def execute(self, requests):
        time.sleep(0.3)
        pid = np.array([os.getpid()], dtype=np.int64)
        return [pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("PID", pid)])
                for _ in requests]
