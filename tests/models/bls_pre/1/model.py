import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            data = pb_utils.get_input_tensor_by_name(request, "IN").as_numpy()
            repeat = int(pb_utils.get_input_tensor_by_name(request, "REPEAT").as_numpy()[0])
            responses.append(pb_utils.InferenceResponse(
                [pb_utils.Tensor("OUT", np.tile(data + 1, repeat))]))
        return responses
