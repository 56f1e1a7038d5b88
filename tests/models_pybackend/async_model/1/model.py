"""A coroutine execute(), as Triton allows."""

import asyncio
from typing import Any

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    async def execute(self, requests: list[Any]) -> list[Any]:
        await asyncio.sleep(0)
        return [
            pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(
                "OUTPUT0", pb_utils.get_input_tensor_by_name(r, "INPUT0").as_numpy() + 1)])
            for r in requests
        ]
