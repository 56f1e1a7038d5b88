"""Add and subtract two vectors of integers written as strings (Triton's simple_string)."""

import numpy as np
import triton_python_backend_utils as pb_utils


def _integers(request, name):
    strings = pb_utils.get_input_tensor_by_name(request, name).as_numpy()
    return np.vectorize(int, otypes=[np.int64])(strings)


def _strings(values):
    return np.vectorize(lambda value: str(value).encode(), otypes=[np.object_])(values)


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                in0, in1 = _integers(request, "INPUT0"), _integers(request, "INPUT1")
            except ValueError as exc:
                responses.append(pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(f"inputs must be integers as strings: {exc}")))
                continue
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("OUTPUT0", _strings(in0 + in1)),
                pb_utils.Tensor("OUTPUT1", _strings(in0 - in1))]))
        return responses
