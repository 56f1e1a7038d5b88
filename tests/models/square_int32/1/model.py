import threading
import time

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        for request in requests:
            count = int(pb_utils.get_input_tensor_by_name(request, "IN").as_numpy()[0])
            thread = threading.Thread(target=self._answer,
                                      args=(request.get_response_sender(), count), daemon=True)
            thread.start()
        return None

    @staticmethod
    def _answer(sender, count):
        time.sleep(0.05)  # execute has returned by now
        for _ in range(count):
            sender.send(pb_utils.InferenceResponse(
                [pb_utils.Tensor("OUT", np.array([count], dtype=np.int32))]))
        sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
