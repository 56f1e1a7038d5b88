import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            value = pb_utils.get_input_tensor_by_name(request, "INPUT").as_numpy()
            sequence = int(pb_utils.get_input_tensor_by_name(request, "SEQ").as_numpy()[0])
            flags = int(pb_utils.get_input_tensor_by_name(request, "FLAGS").as_numpy()[0])
            answer = pb_utils.InferenceRequest(
                model_name="seq_state", requested_output_names=["OUTPUT"],
                inputs=[pb_utils.Tensor("INPUT", value)], correlation_id=sequence,
                flags=flags).exec()
            if answer.has_error():
                responses.append(pb_utils.InferenceResponse(error=answer.error()))
                continue
            output = pb_utils.get_output_tensor_by_name(answer, "OUTPUT").as_numpy()
            responses.append(pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor("OUTPUT", output)]))
        return responses
