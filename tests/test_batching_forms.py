"""Batching that forms: requests for a dynamic-batching model wait in the core while its
instance executes, so a batch takes everything that arrived meanwhile (issue 18 item 3).

A "hold" request makes the instance busy for a while; the requests sent during that time
must run as ONE batch, whose size grows with the concurrency. Read from ModelStatistics'
batch_stats, no timing assertion (the hold only has to outlast a few sends).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient

from shmserve.tests.conftest import StartServer

HOLD_MS = 2000

MODEL_PY = '''
import time
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        values = [pb_utils.get_input_tensor_by_name(r, "IN").as_numpy() for r in requests]
        hold = max(int(-v.min()) for v in values)
        if hold > 0:
            time.sleep(hold / 1000)
        return [pb_utils.InferenceResponse([pb_utils.Tensor("OUT", v)]) for v in values]
'''

CONFIG = '''
name: "held_batched"
backend: "python"
max_batch_size: 16
dynamic_batching { }
input [ { name: "IN", data_type: TYPE_INT32, dims: [ 1 ] } ]
output [ { name: "OUT", data_type: TYPE_INT32, dims: [ 1 ] } ]
instance_group [ { count: 1, kind: KIND_CPU } ]
'''


def _repository(root: Path) -> Path:
    model = root / "held_batched"
    (model / "1").mkdir(parents=True)
    (model / "config.pbtxt").write_text(CONFIG)
    (model / "1" / "model.py").write_text(MODEL_PY)
    return root


def _infer(url: str, value: int, results: list[int]) -> None:
    with grpcclient.InferenceServerClient(url) as client:
        tensor = grpcclient.InferInput("IN", [1, 1], "INT32")
        tensor.set_data_from_numpy(np.array([[value]], dtype=np.int32))
        answer = client.infer("held_batched", [tensor]).as_numpy("OUT")
        assert answer is not None
        results.append(int(answer[0][0]))


def _batch_counts(client: grpcclient.InferenceServerClient) -> dict[int, int]:
    stats = client.get_inference_statistics("held_batched").model_stats[0]
    return {b.batch_size: b.compute_infer.count for b in stats.batch_stats}


def test_batches_grow_with_concurrency_while_the_instance_is_busy(
        start_server: StartServer, tmp_path: Path) -> None:
    server = start_server(repository=_repository(tmp_path / "repo"))
    with grpcclient.InferenceServerClient(server.url) as client:
        seen: dict[int, int] = {}
        for concurrency in (1, 3, 6):
            results: list[int] = []
            hold = threading.Thread(target=_infer, args=(server.url, -HOLD_MS, results))
            hold.start()
            time.sleep(0.3)  # the hold request is executing (the rest only has to be later)
            senders = [threading.Thread(target=_infer, args=(server.url, value, results))
                       for value in range(1, concurrency + 1)]
            for sender in senders:
                sender.start()
                time.sleep(0.02)  # one by one: each alone would be sent ahead today
            for thread in (hold, *senders):
                thread.join(60)
            assert sorted(results) == [-HOLD_MS, *range(1, concurrency + 1)]
            counts = _batch_counts(client)
            grown = {size: counts.get(size, 0) - seen.get(size, 0) for size in counts}
            # The hold ran alone; everything sent while it ran ran as one batch.
            expected = {1: 2} if concurrency == 1 else {1: 1, concurrency: 1}
            assert {size: n for size, n in grown.items() if n} == expected, counts
            seen = counts
