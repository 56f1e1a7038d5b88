import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.runs = 0

    def execute(self, requests):
        responses = []
        for request in requests:
            self.runs += 1
            seed = int(pb_utils.get_input_tensor_by_name(request, "SEED").as_numpy()[0])
            size = int(pb_utils.get_input_tensor_by_name(request, "SIZE").as_numpy()[0])
            out = (np.arange(size, dtype=np.int64) + seed).astype(np.uint8)
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("OUT", out),
                pb_utils.Tensor("RUN", np.array([self.runs], dtype=np.int64))]))
        return responses
