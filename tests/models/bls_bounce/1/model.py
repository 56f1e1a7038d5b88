import json

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            target = json.loads(request.parameters())["target"]
            response = pb_utils.InferenceRequest(
                model_name=target, inputs=request.inputs(), requested_output_names=["OUT"],
                parameters={"mode": "sync"}).exec()
            if response.has_error():
                responses.append(pb_utils.InferenceResponse(error=response.error()))
            else:
                responses.append(pb_utils.InferenceResponse(response.output_tensors()))
        return responses
