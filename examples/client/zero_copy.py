"""Zero-copy inference through POSIX shared memory.

Arrays allocated in a region are sent as region references: the request carries no tensor
bytes, and outputs directed into the region come back as NumPy views of it.

    SHMSERVE_URL=127.0.0.1:8001 python examples/client/zero_copy.py
"""

from __future__ import annotations

import os

import numpy as np

from shmserve.client import Client

URL = os.environ.get("SHMSERVE_URL", "127.0.0.1:8001")
N = 4 * 1024 * 1024  # 16 MiB of float32


def main() -> None:
    # transport="shm": the local channel (regions over gRPC need --allow-client-shm)
    with Client(URL, transport="shm") as client, client.shared_memory(2 * N * 4 + 4096) as region:
        x = region.ndarray(N, np.float32)   # lives in the segment
        x[:] = np.random.default_rng(0).random(N, dtype=np.float32)
        y = region.ndarray(N, np.float32)   # the server writes the output here

        request = client.serialize_infer_request("identity_fp32", {"INPUT0": x},
                                                 outputs={"OUTPUT0": y})
        print(f"request: {len(request)} bytes for a {x.nbytes >> 20} MiB tensor")

        out = client.infer("identity_fp32", {"INPUT0": x}, outputs={"OUTPUT0": y})
        assert out["OUTPUT0"] is y            # the very array we passed, filled in place
        assert np.array_equal(y, x)
        print("output is a view of the region:", np.shares_memory(out["OUTPUT0"], y))

        # The same region holds small tensors too (64-byte aligned bump allocation).
        a = region.copy(np.arange(16, dtype=np.int32).reshape(1, 16))
        b = region.copy(np.ones((1, 16), dtype=np.int32))
        s = region.ndarray((1, 16), np.int32)
        client.infer("simple", {"INPUT0": a, "INPUT1": b}, outputs={"OUTPUT0": s})
        print("simple OUTPUT0 in shared memory:", s[0, :4], "...")
        print(f"region {region.name}: {region.used} of {region.byte_size} bytes used")
    # Leaving the block unregistered the region and removed it from /dev/shm.


if __name__ == "__main__":
    main()
