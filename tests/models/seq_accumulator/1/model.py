import os
import signal

import numpy as np
import triton_python_backend_utils as pb_utils


def _control(request, name):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return tensor.as_numpy().reshape(-1)[0]


class TritonPythonModel:
    def initialize(self, args):
        self.sums = {}

    def execute(self, requests):
        responses = []
        for request in requests:
            value = int(pb_utils.get_input_tensor_by_name(request, "INPUT").as_numpy()
                        .reshape(-1)[0])
            start, end = float(_control(request, "START")), int(_control(request, "END"))
            ready, corrid = bool(_control(request, "READY")), int(_control(request, "CORRID"))
            controls = np.array([[int(start), end, int(ready), corrid, len(requests),
                                  os.getpid()]], dtype=np.int64)
            if not ready:
                responses.append(pb_utils.InferenceResponse(output_tensors=[
                    pb_utils.Tensor("OUTPUT", np.zeros((1, 1), np.int32)),
                    pb_utils.Tensor("CONTROLS", controls)]))
                continue
            if value == -999:
                os.kill(os.getpid(), signal.SIGKILL)
            if start:
                self.sums[corrid] = 0
            if value < 0:
                responses.append(pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(f"negative input {value}")))
                continue
            total = self.sums.get(corrid, 0) + value
            self.sums[corrid] = total
            if end:
                del self.sums[corrid]
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("OUTPUT", np.array([[total]], np.int32)),
                pb_utils.Tensor("CONTROLS", controls)]))
        return responses
