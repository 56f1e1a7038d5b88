"""AsyncClient: 32 concurrent requests on one channel, inputs and outputs in shared memory.

    SHMSERVE_URL=127.0.0.1:8001 python examples/client/async_concurrency.py
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator

import numpy as np

from shmserve.client import AsyncClient

URL = os.environ.get("SHMSERVE_URL", "127.0.0.1:8001")
CONCURRENCY = 32


async def main() -> None:
    async with AsyncClient(URL, transport="shm") as client, \
            client.shared_memory(1 << 20) as region:
        ones = region.copy(np.ones((1, 16), dtype=np.int32))
        inputs = [region.copy(np.full((1, 16), i, dtype=np.int32)) for i in range(CONCURRENCY)]
        sums = [region.ndarray((1, 16), np.int32) for _ in range(CONCURRENCY)]
        results = await asyncio.gather(*(
            client.infer("simple", {"INPUT0": x, "INPUT1": ones},
                         outputs={"OUTPUT0": out, "OUTPUT1": None})
            for x, out in zip(inputs, sums, strict=True)))
        for i, result in enumerate(results):
            assert result["OUTPUT0"] is sums[i] and (sums[i] == i + 1).all()
        print(f"{CONCURRENCY} concurrent requests: OK")

        # A stream's requests may come from an async generator.
        async def requests() -> AsyncIterator[dict[str, np.ndarray]]:
            for i in range(4):
                yield {"INPUT0": inputs[i], "INPUT1": ones}

        async for answer in client.stream_infer("simple", requests()):
            print("stream answer", answer.index, answer.unwrap()["OUTPUT0"][0, :3])


if __name__ == "__main__":
    asyncio.run(main())
