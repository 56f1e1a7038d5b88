"""OUTPUT0 = INPUT0 + offset, with knobs for model-control and repository-agent tests.

Config parameters (all optional): offset, init_delay / exec_delay (seconds), fail_init ("1"
makes initialize raise), log (a file that gets "INIT <pid> ..." and "FINALIZE <pid>" lines).
"""

import json
import os
import time

import numpy as np
import triton_python_backend_utils as pb_utils


def _param(config, key, default=""):
    return config.get("parameters", {}).get(key, {}).get("string_value", default)


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.offset = int(_param(config, "offset", "0"))
        self.exec_delay = float(_param(config, "exec_delay", "0") or 0)
        self.log = _param(config, "log")
        self._record(f"INIT {os.getpid()} offset={self.offset} "
                     f"repository={args['model_repository']}")
        time.sleep(float(_param(config, "init_delay", "0") or 0))
        if _param(config, "fail_init") == "1":
            raise RuntimeError("mc_tunable: initialize failed on purpose")

    def execute(self, requests):
        if self.exec_delay:
            time.sleep(self.exec_delay)
        responses = []
        for request in requests:
            data = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            out = (data + self.offset).astype(np.int32)
            responses.append(pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor("OUTPUT0", out)]))
        return responses

    def finalize(self):
        self._record(f"FINALIZE {os.getpid()}")

    def _record(self, line):
        if self.log:
            with open(self.log, "a") as f:
                f.write(line + "\n")
