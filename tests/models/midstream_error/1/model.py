import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            value = pb_utils.get_input_tensor_by_name(request, "IN")
            sender.send(pb_utils.InferenceResponse([pb_utils.Tensor("OUT", value.as_numpy())]))
            sender.send(pb_utils.InferenceResponse(
                error=pb_utils.TritonError("midstream failure")))
            sender.send(pb_utils.InferenceResponse([pb_utils.Tensor("OUT", value.as_numpy())]))
        raise RuntimeError("model gave up")
