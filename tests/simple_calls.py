"""One request to the example model ``simple`` (OUTPUT0 = INPUT0 + INPUT1) with either
tritonclient module, checked."""

from __future__ import annotations

from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient


def infer_simple(client: Any, module: Any = grpcclient, request_id: str = "") -> None:
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    inputs = [module.InferInput("INPUT0", [1, 16], "INT32"),
              module.InferInput("INPUT1", [1, 16], "INT32")]
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(np.ones_like(a))
    result = client.infer("simple", inputs, request_id=request_id)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + 1)
