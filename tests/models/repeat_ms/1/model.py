import json
import threading
import time

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        for request in requests:
            if json.loads(request.parameters()).get("in_thread"):
                threading.Thread(target=self._repeat, args=(request,), daemon=True).start()
            else:
                self._repeat(request)
        return None

    @staticmethod
    def _repeat(request):
        sender = request.get_response_sender()
        values = pb_utils.get_input_tensor_by_name(request, "IN").as_numpy()
        delay = int(pb_utils.get_input_tensor_by_name(request, "DELAY_MS").as_numpy()[0])
        cancel_log = json.loads(request.parameters()).get("cancel_log", "")
        for index, value in enumerate(values):
            if request.is_cancelled() or sender.is_cancelled():
                if cancel_log:
                    with open(cancel_log, "a") as f:
                        f.write(f"{request.request_id()} cancelled at {index}\n")
                break
            sender.send(pb_utils.InferenceResponse([
                pb_utils.Tensor("OUT", np.array([value], dtype=np.int32)),
                pb_utils.Tensor("IDX", np.array([index], dtype=np.int32))]))
            time.sleep(delay / 1000)
        sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        try:
            sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        except pb_utils.TritonModelException as exc:
            if str(exc) != "Unable to send response. Response sender has been closed.":
                raise
        else:
            raise RuntimeError("sending after the final flag did not raise")
