"""Send one response per element of IN, spaced by DELAY (Triton's repeat_int32 example)."""

import threading
import time

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        for request in requests:
            # A thread per request: execute returns at once and the instance takes the next.
            threading.Thread(target=self._repeat, args=(request,), daemon=True).start()
        return None

    def _repeat(self, request):
        sender = request.get_response_sender()
        values = pb_utils.get_input_tensor_by_name(request, "IN").as_numpy().reshape(-1)
        delays = pb_utils.get_input_tensor_by_name(request, "DELAY").as_numpy().reshape(-1)
        wait = pb_utils.get_input_tensor_by_name(request, "WAIT").as_numpy().reshape(-1)
        if len(delays) != len(values):
            sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(
                f"expected DELAY to have {len(values)} elements, got {len(delays)}")),
                flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            return
        time.sleep(float(wait[0]) / 1000 if len(wait) else 0.0)
        for index, (value, delay) in enumerate(zip(values, delays, strict=True)):
            time.sleep(float(delay) / 1000)
            sender.send(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("OUT", np.array([value], np.int32)),
                pb_utils.Tensor("IDX", np.array([index], np.uint32))]))
        sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
