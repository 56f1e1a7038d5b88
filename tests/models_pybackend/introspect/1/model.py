"""Reports what it was given: initialize args and each request's metadata, as JSON."""

import json
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        self.args = args
        self.model_config = json.loads(args["model_config"])
        pb_utils.Logger.log_info(f"initialized {args['model_instance_name']}")

    def execute(self, requests: list[Any]) -> list[Any]:
        responses = []
        for request in requests:
            data = pb_utils.get_input_tensor_by_name(request, "INPUT0")
            report = {
                "args": self.args,
                "arg_types": sorted({type(v).__name__ for v in self.args.values()}),
                "greeting": self.model_config["parameters"]["greeting"]["string_value"],
                "request_id": request.request_id(),
                "correlation_id": request.correlation_id(),
                "parameters": json.loads(request.parameters()),
                "flags": request.flags(),
                "requested_output_names": request.requested_output_names(),
                "inputs": [t.name() for t in request.inputs()],
                "shape": data.shape(),
                "is_cpu": data.is_cpu(),
            }
            echo = np.array([[json.dumps(report).encode("utf-8")]], dtype=np.object_)  # [batch, 1]
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("ECHO", echo),
                pb_utils.Tensor("DOUBLE", data.as_numpy() * 2),
            ]))
        return responses
