import os
import time

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.executed = 0

    def execute(self, requests):
        responses = []
        for request in requests:
            wait = pb_utils.get_input_tensor_by_name(request, "WAIT").as_numpy()
            path = wait.reshape(-1)[0].decode()
            if path:
                open(path + ".held", "w").close()  # the test's sign that the gate holds
            deadline = time.monotonic() + 60
            while path and not os.path.exists(path) and time.monotonic() < deadline:
                time.sleep(0.01)
            self.executed += 1
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("ORDER", np.array([[self.executed]], dtype=np.int64))]))
        return responses
