"""BYTES (string) tensors in shared memory, in Triton's length-prefixed layout.

    SHMSERVE_URL=127.0.0.1:8001 python examples/client/bytes_tensors.py
"""

from __future__ import annotations

import os

import numpy as np

from shmserve.client import Client

URL = os.environ.get("SHMSERVE_URL", "127.0.0.1:8001")


def main() -> None:
    with Client(URL, transport="shm") as client, client.shared_memory(1 << 16) as region:
        # Each element is written as a uint32 little-endian length and the bytes.
        text = region.bytes_tensor(["zero", "copy", "strings"], shape=(1, 3))
        # A BYTES output's size is not known in advance: give it a byte buffer.
        upper = region.ndarray(1024, np.uint8)
        out = client.infer("string_upper", {"TEXT": text}, outputs={"UPPER": upper})
        print(out["UPPER"])                  # decoded from the region: [[b'ZERO' ...]]
        assert out["UPPER"].tolist() == [[b"ZERO", b"COPY", b"STRINGS"]]
        assert text.decode().tolist() == [[b"zero", b"copy", b"strings"]]


if __name__ == "__main__":
    main()
