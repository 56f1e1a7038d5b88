import json

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    async def execute(self, requests):
        return [await self.one(request) for request in requests]

    async def one(self, request):
        parameters = json.loads(request.parameters())
        mode = parameters.get("mode", "sync")
        values = pb_utils.get_input_tensor_by_name(request, "IN").as_numpy()
        if mode == "error":
            call = pb_utils.InferenceRequest(
                model_name="midstream_error", requested_output_names=["OUT"],
                inputs=[pb_utils.Tensor("IN", values[:1])])
        elif mode == "fill":  # IN = [responses, elements of each]
            call = pb_utils.InferenceRequest(
                model_name="fill_stream", requested_output_names=["OUT"],
                inputs=[pb_utils.Tensor("COUNT", values[:1]),
                        pb_utils.Tensor("ELEMENTS", values[1:2])])
        else:
            call = pb_utils.InferenceRequest(
                model_name="repeat_ms", requested_output_names=["OUT"],
                inputs=[pb_utils.Tensor("IN", values),
                        pb_utils.Tensor("DELAY_MS", np.array([10], np.int32))],
                parameters={"cancel_log": parameters.get("cancel_log", "")})
        if mode in ("sync", "first", "error", "fill"):
            responses = list(self.take(call.exec(decoupled=True), mode))
        elif mode == "async":
            responses = list(self.take(await call.async_exec(decoupled=True), mode))
        else:  # async_for
            responses = [response async for response in await call.async_exec(decoupled=True)]
        total, count = 0, 0
        for response in responses:
            count += 1
            if response.has_error():
                if mode == "error":
                    total -= 1000  # the error response counted, the stream went on
                    continue
                return pb_utils.InferenceResponse(error=response.error())
            out = pb_utils.get_output_tensor_by_name(response, "OUT")
            if out is not None:
                total += int(out.as_numpy().sum())
        last_empty = bool(responses) and not responses[-1].has_error() \
            and len(responses[-1].output_tensors()) == 0
        return pb_utils.InferenceResponse([
            pb_utils.Tensor("SUM", np.array([total], np.int32)),
            pb_utils.Tensor("COUNT", np.array([count], np.int32)),
            pb_utils.Tensor("LAST_EMPTY", np.array([last_empty], np.bool_))])

    @staticmethod
    def take(responses, mode):
        for response in responses:
            yield response
            if mode == "first":
                responses.cancel()
                return
