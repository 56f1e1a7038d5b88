import json
import sys
import threading

import numpy as np
import triton_python_backend_utils as pb_utils

ELEMENTS = 20_000  # 80 KB per response: above the 64 KiB inline limit


class TritonPythonModel:
    def initialize(self, args):
        sys.setswitchinterval(1e-6)  # switch threads as often as possible: races show

    def execute(self, requests):
        for request in requests:
            threads = int(pb_utils.get_input_tensor_by_name(request, "THREADS").as_numpy()[0])
            count = int(pb_utils.get_input_tensor_by_name(request, "COUNT").as_numpy()[0])
            outcomes = json.loads(request.parameters()).get("outcomes", "")
            sender = request.get_response_sender()
            barrier = threading.Barrier(threads)
            for thread in range(threads):
                threading.Thread(target=self._send, daemon=True,
                                 args=(sender, barrier, thread, count, outcomes)).start()
        return None

    @staticmethod
    def _send(sender, barrier, thread, count, outcomes):
        barrier.wait()
        for index in range(count):
            value = np.full(ELEMENTS, thread * 1000 + index, dtype=np.int32)
            sender.send(pb_utils.InferenceResponse([pb_utils.Tensor("OUT", value)]))
        barrier.wait()
        final = pb_utils.InferenceResponse(
            [pb_utils.Tensor("OUT", np.array([-1 - thread], dtype=np.int32))])
        try:
            sender.send(final, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            outcome = "sent"
        except pb_utils.TritonModelException as exc:
            outcome = str(exc)
        if outcomes:  # the test reads each thread's outcome of its final send
            with open(outcomes, "a") as f:
                f.write(outcome + "\n")
