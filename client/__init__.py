"""shmserve client: KServe-v2 gRPC inference where zero-copy shared memory is the easy path.

    from shmserve.client import Client

    with Client("127.0.0.1:8001") as client, client.shared_memory(1 << 20) as region:
        x = region.ndarray((1, 16), "int32")      # lives in shared memory
        x[:] = 1
        out = client.infer("simple", {"INPUT0": x, "INPUT1": x})   # sent as a reference

See docs/client.md.
"""

from shmserve.client._aio import AsyncClient
from shmserve.client._common import (
    CHANNEL_OPTIONS,
    CLIENT_ID_HEADER,
    DEFAULT_TIMEOUT,
    LOAD_TIMEOUT,
    RegionStatus,
    StreamRequest,
    StreamResult,
)
from shmserve.client._sync import Client
from shmserve.client.errors import RegionFullError, ShmserveError
from shmserve.client.memfd_region import MemfdRegion
from shmserve.client.regions import ALIGNMENT, BytesTensor, HostRegion, Region, SystemRegion
from shmserve.client.response_ring import ResponseRing
from shmserve.client.sequence import AsyncSequence, Sequence
from shmserve.protos.datatypes import deserialize_bytes_tensor, serialize_bytes_tensor

__all__ = [
    "ALIGNMENT",
    "CHANNEL_OPTIONS",
    "CLIENT_ID_HEADER",
    "DEFAULT_TIMEOUT",
    "LOAD_TIMEOUT",
    "AsyncClient",
    "AsyncSequence",
    "BytesTensor",
    "Client",
    "HostRegion",
    "MemfdRegion",
    "Region",
    "RegionFullError",
    "RegionStatus",
    "ResponseRing",
    "Sequence",
    "ShmserveError",
    "StreamRequest",
    "StreamResult",
    "SystemRegion",
    "deserialize_bytes_tensor",
    "serialize_bytes_tensor",
]
