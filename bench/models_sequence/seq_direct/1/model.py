"""A stateful accumulator: the running sum of INPUT per sequence, kept by the model itself
(keyed by the CORRID control input), reset at START, dropped at END; a not-ready request (a
filler of an empty slot) gets zeros. Runs unmodified on Triton's python backend and shmserve."""

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.sums = {}

    def execute(self, requests):
        responses = []
        for request in requests:
            ready = pb_utils.get_input_tensor_by_name(request, "READY").as_numpy()
            if not ready.reshape(-1)[0]:
                responses.append(pb_utils.InferenceResponse(output_tensors=[
                    pb_utils.Tensor("OUTPUT", np.zeros((1, 1), np.int32))]))
                continue
            value = pb_utils.get_input_tensor_by_name(request, "INPUT").as_numpy()
            start = pb_utils.get_input_tensor_by_name(request, "START").as_numpy()
            end = pb_utils.get_input_tensor_by_name(request, "END").as_numpy()
            corrid = int(pb_utils.get_input_tensor_by_name(request, "CORRID").as_numpy()
                         .reshape(-1)[0])
            total = (0 if start.reshape(-1)[0] else self.sums.get(corrid, 0)) + \
                int(value.reshape(-1)[0])
            if end.reshape(-1)[0]:
                self.sums.pop(corrid, None)
            else:
                self.sums[corrid] = total
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("OUTPUT", np.array([[total]], np.int32))]))
        return responses
