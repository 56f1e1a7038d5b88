"""Health, metadata and inference with NumPy in and out (tensors travel as gRPC bytes).

    SHMSERVE_URL=127.0.0.1:8001 python examples/client/quickstart.py
"""

from __future__ import annotations

import os

import numpy as np

from shmserve.client import Client, ShmserveError

URL = os.environ.get("SHMSERVE_URL", "127.0.0.1:8001")


def main() -> None:
    with Client(URL) as client:
        assert client.is_server_live() and client.is_server_ready()
        print("server:", client.server_metadata().name)
        print("models:", [m.name for m in client.repository_index()])
        meta = client.model_metadata("simple")
        print("simple inputs:", [(t.name, t.datatype, list(t.shape)) for t in meta.inputs])

        a = np.arange(16, dtype=np.int32).reshape(1, 16)
        b = np.ones((1, 16), dtype=np.int32)
        out = client.infer("simple", {"INPUT0": a, "INPUT1": b})
        assert (out["OUTPUT0"] == a + b).all() and (out["OUTPUT1"] == a - b).all()
        print("OUTPUT0:", out["OUTPUT0"][0, :4], "...")

        # Only some outputs, with a request id.
        only = client.infer("simple", {"INPUT0": a, "INPUT1": b}, outputs=["OUTPUT1"],
                            request_id="req-1")
        assert list(only) == ["OUTPUT1"]

        # BYTES tensors are NumPy object arrays (str is sent as UTF-8, bytes come back).
        text = np.array([["hello", "world"]], dtype=object)
        print("UPPER:", client.infer("string_upper", {"TEXT": text})["UPPER"])

        # Several requests on one stream; answers come back as they complete.
        batches = [{"INPUT0": a + i, "INPUT1": b} for i in range(4)]
        for result in client.stream_infer("simple", batches):
            assert (result.unwrap()["OUTPUT0"] == a + result.index + b).all()

        # Every failure is a ShmserveError with the gRPC code and the server's message.
        try:
            client.infer("no_such_model", {"INPUT0": a})
        except ShmserveError as exc:
            print("error:", exc.code.name, "-", exc.message)


if __name__ == "__main__":
    main()
