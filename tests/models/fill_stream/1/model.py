import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        for request in requests:
            count = int(pb_utils.get_input_tensor_by_name(request, "COUNT").as_numpy()[0])
            elements = int(pb_utils.get_input_tensor_by_name(request, "ELEMENTS").as_numpy()[0])
            sender = request.get_response_sender()
            for index in range(count):
                if request.is_cancelled():
                    break
                sender.send(pb_utils.InferenceResponse([
                    pb_utils.Tensor("OUT", np.full(elements, index, dtype=np.int32)),
                    pb_utils.Tensor("IDX", np.array([index], dtype=np.int32)),
                    pb_utils.Tensor("TEXT", np.array([f"response {index}".encode()],
                                                     dtype=np.object_))]))
            sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None
