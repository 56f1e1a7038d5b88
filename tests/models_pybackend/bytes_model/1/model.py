"""A BYTES (TYPE_STRING) model: object arrays in, object and str arrays out."""

from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests: list[Any]) -> list[Any]:
        responses = []
        for request in requests:
            words = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            # Round-trip through the wire codec, as some models do by hand.
            wire = pb_utils.serialize_byte_tensor(words)
            words = pb_utils.deserialize_bytes_tensor(wire.item()).reshape(words.shape)
            upper = np.array([w.upper() for w in words.reshape(-1)], dtype=np.object_)
            reversed_text = np.array([w.decode("utf-8")[::-1] for w in words.reshape(-1)])
            lengths = np.array([len(w) for w in words.reshape(-1)], dtype=np.int32)
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("UPPER", upper.reshape(words.shape)),
                pb_utils.Tensor("REVERSED", reversed_text.reshape(words.shape)),
                pb_utils.Tensor("LENGTHS", lengths.reshape(words.shape)),
            ]))
        return responses
