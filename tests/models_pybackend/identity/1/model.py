"""Returns its input as its output and remembers what it saw (for zero-copy checks)."""

from typing import Any

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    seen: list[Any]

    def initialize(self, args: dict[str, str]) -> None:
        self.seen = []

    def execute(self, requests: list[Any]) -> list[Any]:
        responses = []
        for request in requests:
            tensor = pb_utils.get_input_tensor_by_name(request, "INPUT0")
            self.seen.append(tensor.as_numpy())
            responses.append(pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor("OUTPUT0", tensor.as_numpy())]))
        return responses
