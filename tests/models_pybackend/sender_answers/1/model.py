"""Non-decoupled, answering through response senders (as Triton allows): one response with
the final flag each, the second request's from a thread after execute returned."""

import threading
import time

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        first, second = requests
        self._answer(first)
        threading.Thread(target=self._late, args=(second,), daemon=True).start()
        return None

    def _late(self, request):
        time.sleep(0.05)
        self._answer(request)

    @staticmethod
    def _answer(request):
        value = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
        request.get_response_sender().send(
            pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT0", value * 2)]),
            flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
