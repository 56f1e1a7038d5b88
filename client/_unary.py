"""What each unary RPC of the clients sends, and what they return of its answer (no I/O).

``Client`` and ``AsyncClient`` run a ``Unary`` the same way, blocking or awaited: send
``request`` as ``rpc``, then return ``read(response)``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from shmserve.client._common import RegionStatus, load_request, unload_request
from shmserve.protos import shmserve_model_config_pb2 as mc
from shmserve.protos import shmserve_service_pb2 as pb

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Unary(Generic[T]):
    rpc: str
    request: Any
    read: Callable[[Any], T]
    loads: bool = False  # load/unload: ``load_timeout`` is the default deadline


def _nothing(_: Any) -> None:
    return None


def _same(response: Any) -> Any:
    return response


def server_live() -> Unary[bool]:
    return Unary("ServerLive", pb.ServerLiveRequest(), lambda r: bool(r.live))


def server_ready() -> Unary[bool]:
    return Unary("ServerReady", pb.ServerReadyRequest(), lambda r: bool(r.ready))


def model_ready(name: str, version: str) -> Unary[bool]:
    return Unary("ModelReady", pb.ModelReadyRequest(name=name, version=version),
                 lambda r: bool(r.ready))


def server_metadata() -> Unary[pb.ServerMetadataResponse]:
    return Unary("ServerMetadata", pb.ServerMetadataRequest(), _same)


def model_metadata(name: str, version: str) -> Unary[pb.ModelMetadataResponse]:
    return Unary("ModelMetadata", pb.ModelMetadataRequest(name=name, version=version), _same)


def model_config(name: str, version: str) -> Unary[mc.ModelConfig]:
    return Unary("ModelConfig", pb.ModelConfigRequest(name=name, version=version),
                 lambda r: r.config)


def model_statistics(name: str, version: str) -> Unary[list[pb.ModelStatistics]]:
    return Unary("ModelStatistics", pb.ModelStatisticsRequest(name=name, version=version),
                 lambda r: list(r.model_stats))


def repository_index(ready: bool) -> Unary[list[pb.RepositoryIndexResponse.ModelIndex]]:
    return Unary("RepositoryIndex", pb.RepositoryIndexRequest(ready=ready),
                 lambda r: list(r.models))


def load_model(name: str, config: str | Mapping[str, Any] | None,
               files: Mapping[str, bytes] | None) -> Unary[None]:
    return Unary("RepositoryModelLoad", load_request(name, config, files), _nothing, loads=True)


def unload_model(name: str, unload_dependents: bool) -> Unary[None]:
    return Unary("RepositoryModelUnload", unload_request(name, unload_dependents), _nothing,
                 loads=True)


def shm_status(name: str) -> Unary[dict[str, RegionStatus]]:
    return Unary("SystemSharedMemoryStatus", pb.SystemSharedMemoryStatusRequest(name=name),
                 lambda r: dict(r.regions))


def shm_register(name: str, key: str, offset: int, byte_size: int) -> Unary[None]:
    return Unary("SystemSharedMemoryRegister", pb.SystemSharedMemoryRegisterRequest(
        name=name, key=key, offset=offset, byte_size=byte_size), _nothing)


def shm_unregister(name: str) -> Unary[None]:
    return Unary("SystemSharedMemoryUnregister",
                 pb.SystemSharedMemoryUnregisterRequest(name=name), _nothing)
