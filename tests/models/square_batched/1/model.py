import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        batch = np.array([[len(requests)]], dtype=np.int32)
        for request in requests:
            count = int(pb_utils.get_input_tensor_by_name(request, "IN").as_numpy()[0][0])
            sender = request.get_response_sender()
            for _ in range(count):
                sender.send(pb_utils.InferenceResponse([
                    pb_utils.Tensor("OUT", np.array([[count]], dtype=np.int32)),
                    pb_utils.Tensor("BATCH", batch)]))
            sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None
