import asyncio
import json

import numpy as np
import triton_python_backend_utils as pb_utils


def call(model, inputs, outputs=("OUT",), **kwargs):
    return pb_utils.InferenceRequest(model_name=model, inputs=inputs,
                                     requested_output_names=list(outputs), **kwargs)


class TritonPythonModel:
    def initialize(self, args):
        # BLS from initialize: bls_double is loaded first (see the test's repository).
        self.init_answer = None
        response = call("bls_double", [pb_utils.Tensor("IN", np.ones(2, np.float32))]).exec()
        if not response.has_error():
            self.init_answer = pb_utils.get_output_tensor_by_name(response, "OUT").as_numpy()

    async def execute(self, requests):
        return [await self.one(request) for request in requests]

    async def one(self, request):
        mode = json.loads(request.parameters()).get("mode", "sync")
        data = pb_utils.get_input_tensor_by_name(request, "IN").as_numpy()
        if mode == "sync":
            response = call("bls_double", [pb_utils.Tensor("IN", data)]).exec()
        elif mode == "async":
            first, second = await asyncio.gather(
                call("bls_double", [pb_utils.Tensor("IN", data)]).async_exec(),
                call("bls_double", [pb_utils.Tensor("IN", data + 1)]).async_exec())
            if first.has_error() or second.has_error():
                response = first if first.has_error() else second
            else:
                total = (pb_utils.get_output_tensor_by_name(first, "OUT").as_numpy()
                         + pb_utils.get_output_tensor_by_name(second, "OUT").as_numpy())
                response = pb_utils.InferenceResponse([pb_utils.Tensor("OUT", total)])
        elif mode == "preferred":
            # The python_backend's BLS example: preferred memory and the caller's trace.
            assert request.trace().get_context() is None
            inner = call("bls_double", [pb_utils.Tensor("IN", data)],
                         preferred_memory=pb_utils.PreferredMemory(
                             pb_utils.TRITONSERVER_MEMORY_CPU, 0),
                         trace=request.trace())
            inner.set_flags(0)
            response = inner.exec()
        elif mode == "init":
            response = pb_utils.InferenceResponse(
                [pb_utils.Tensor("OUT", np.asarray(self.init_answer, np.float32))])
        elif mode == "unknown":
            response = call("no_such_model", [pb_utils.Tensor("IN", data)]).exec()
        elif mode == "bad_input":
            response = call("bls_double", [pb_utils.Tensor("IN", data.astype(np.int32))]).exec()
        elif mode == "self":
            response = call("bls_caller", [pb_utils.Tensor("IN", data)]).exec()
        elif mode == "self_async":
            # Awaited: this instance runs the inner request meanwhile (async def execute).
            response = await call("bls_caller", [pb_utils.Tensor("IN", data)],
                                  parameters={"mode": "sync"}).async_exec()
        elif mode == "cycle":
            # bls_caller -> bls_bounce -> bls_caller: this only instance waits meanwhile.
            response = call("bls_bounce", [pb_utils.Tensor("IN", data)],
                            parameters={"target": "bls_caller"}).exec()
        elif mode == "via_bounce":
            response = call("bls_bounce", [pb_utils.Tensor("IN", data)],
                            parameters={"target": "bls_double"}).exec()
        elif mode == "timeout":
            response = call("bls_double", [pb_utils.Tensor("IN", data)],
                            parameters={"slow": 1}, timeout=50_000).exec()
        elif mode == "pipeline":
            response = self.pipeline(data, 1)
        elif mode == "keep":
            # Outputs of earlier calls stay valid while later calls run (regions are reused
            # only once no array views them): kept, small and large, then returned together.
            kept = []
            for k, size in enumerate((len(data), len(data), 300_000, len(data))):
                answer = call("bls_double", [pb_utils.Tensor(
                    "IN", np.resize(data + k, size).astype(np.float32))]).exec()
                if answer.has_error():
                    return answer
                kept.append(pb_utils.get_output_tensor_by_name(answer, "OUT").as_numpy())
            response = pb_utils.InferenceResponse(
                [pb_utils.Tensor("OUT", np.concatenate(kept))])
        elif mode == "big_pipeline":
            response = self.pipeline(data, 1 << 20)   # 16 B in: a 16 MiB intermediate tensor
        else:
            raise ValueError(f"unknown mode {mode}")
        if response.has_error():
            # Passed on to the client: code and message as the called model answered.
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(
                "BLS failed: " + response.error().message(), response.error().code()))
        out = pb_utils.get_output_tensor_by_name(response, "OUT").as_numpy()
        return pb_utils.InferenceResponse([pb_utils.Tensor("OUT", out)])

    def pipeline(self, data, repeat):
        """pre-process -> model -> post-process; large intermediates summed at the end."""
        pre = call("bls_pre", [pb_utils.Tensor("IN", data),
                               pb_utils.Tensor("REPEAT", np.array([repeat], np.int32))]).exec()
        if pre.has_error():
            return pre
        mid = pb_utils.get_output_tensor_by_name(pre, "OUT").as_numpy()
        doubled = call("bls_double", [pb_utils.Tensor("IN", mid)]).exec()
        if doubled.has_error():
            return doubled
        out = pb_utils.get_output_tensor_by_name(doubled, "OUT").as_numpy()
        # post-process: fold the repeats back (the mean of each position).
        post = out.reshape(repeat, -1).mean(axis=0).astype(np.float32) - 1
        return pb_utils.InferenceResponse([pb_utils.Tensor("OUT", post)])
