"""Returns something wrong from execute(); the request parameter "mode" picks what."""

import json
from typing import Any

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests: list[Any]) -> Any:
        mode = json.loads(requests[0].parameters()).get("mode")
        ok = pb_utils.InferenceResponse(output_tensors=[])
        if mode == "none":
            return None
        if mode == "tuple":
            return tuple(ok for _ in requests)
        if mode == "short":
            return [ok for _ in requests[1:]]
        if mode == "wrong_item":
            return [ok for _ in requests[1:]] + ["not a response"]
        if mode == "bad_tensor":
            return [pb_utils.InferenceResponse(output_tensors=["OUTPUT0"]) for _ in requests]
        return [ok for _ in requests]
