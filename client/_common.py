"""What the sync and the asyncio client share: channel options, RPC table, request builders."""

from __future__ import annotations

import json
import os
import secrets
import socket
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np

from shmserve.client._convert import (
    InputValue,
    Outputs,
    ParameterValue,
    PreparedRequest,
    prepare_infer,
    read_outputs,
)
from shmserve.client._wire import decode_stream_response
from shmserve.client.errors import ShmserveError, invalid_argument
from shmserve.client.regions import Region
from shmserve.client.response_ring import ResponseRing
from shmserve.protos import shmserve_service_pb2 as pb
from shmserve.protos.parameters import parameter_value

SERVICE = "inference.GRPCInferenceService"
CLIENT_ID_HEADER = "shmserve-client-id"
INT32_MAX = 2**31 - 1

#: Default deadline of every unary call except model load/unload, in seconds.
DEFAULT_TIMEOUT = 60.0
#: Default deadline of load_model / unload_model (loads run initialize and warm-up).
LOAD_TIMEOUT = 600.0
#: Deadline of the unregister call made when a region's ``with`` block exits.
UNREGISTER_TIMEOUT = 10.0

#: Channel options: no message-size limit below what protobuf allows, and keepalive pings
#: that stay within a default gRPC server's ping policy (at most 2 pings without data).
CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.max_send_message_length", INT32_MAX),
    ("grpc.max_receive_message_length", INT32_MAX),
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 0),
    ("grpc.http2.max_pings_without_data", 2),
    ("grpc.primary_user_agent", "shmserve-client/0.1"),
)

# RPC name -> (request type, response type); ModelInfer and ModelStreamInfer travel as bytes.
UNARY_RPCS: dict[str, tuple[Any, Any]] = {
    "ServerLive": (pb.ServerLiveRequest, pb.ServerLiveResponse),
    "ServerReady": (pb.ServerReadyRequest, pb.ServerReadyResponse),
    "ModelReady": (pb.ModelReadyRequest, pb.ModelReadyResponse),
    "ServerMetadata": (pb.ServerMetadataRequest, pb.ServerMetadataResponse),
    "ModelMetadata": (pb.ModelMetadataRequest, pb.ModelMetadataResponse),
    "ModelConfig": (pb.ModelConfigRequest, pb.ModelConfigResponse),
    "ModelStatistics": (pb.ModelStatisticsRequest, pb.ModelStatisticsResponse),
    "RepositoryIndex": (pb.RepositoryIndexRequest, pb.RepositoryIndexResponse),
    "RepositoryModelLoad": (pb.RepositoryModelLoadRequest, pb.RepositoryModelLoadResponse),
    "RepositoryModelUnload": (pb.RepositoryModelUnloadRequest,
                              pb.RepositoryModelUnloadResponse),
    "SystemSharedMemoryStatus": (pb.SystemSharedMemoryStatusRequest,
                                 pb.SystemSharedMemoryStatusResponse),
    "SystemSharedMemoryRegister": (pb.SystemSharedMemoryRegisterRequest,
                                   pb.SystemSharedMemoryRegisterResponse),
    "SystemSharedMemoryUnregister": (pb.SystemSharedMemoryUnregisterRequest,
                                     pb.SystemSharedMemoryUnregisterResponse),
}

RegionStatus = pb.SystemSharedMemoryStatusResponse.RegionStatus


def method_path(rpc: str) -> str:
    return f"/{SERVICE}/{rpc}"


def target_of(url: str) -> str:
    """A gRPC target from a url: ``host:port``, ``grpc://host:port`` or ``unix:/path``."""
    for scheme in ("grpc://", "http://"):
        if url.startswith(scheme):
            return url[len(scheme):].rstrip("/")
    if "://" in url and not url.startswith("unix"):
        raise invalid_argument(f"unsupported url '{url}': use host:port, grpc://host:port or "
                               f"unix:/path")
    return url


def channel_options(extra: Sequence[tuple[str, Any]] | None) -> list[tuple[str, Any]]:
    """The default options, overridden key by key by ``extra``."""
    merged = dict(CHANNEL_OPTIONS)
    merged.update(dict(extra or ()))
    return list(merged.items())


def new_client_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(6)}"


def call_metadata(client_id: str, headers: Mapping[str, str] | None
                  ) -> tuple[tuple[str, str], ...]:
    items = [(CLIENT_ID_HEADER, client_id)]
    items.extend((key.lower(), value) for key, value in (headers or {}).items())
    return tuple(items)


class RegionSet:
    """This client's registered regions; ``locate`` finds the one holding an address range."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._regions: tuple[Region, ...] = ()

    def add(self, region: Region) -> None:
        with self._lock:
            self._regions = (*self._regions, region)

    def remove(self, region: Region) -> bool:
        with self._lock:
            if region not in self._regions:
                return False
            self._regions = tuple(r for r in self._regions if r is not region)
            return True

    def __iter__(self) -> Iterator[Region]:
        return iter(self._regions)

    def __len__(self) -> int:
        return len(self._regions)

    def locate(self, address: int, nbytes: int) -> tuple[str, int] | None:
        for region in self._regions:
            offset = region.locate(address, nbytes)
            if offset is not None:
                return region.name, offset
        return None


# --- request builders --------------------------------------------------------------------------
def load_request(name: str, config: str | Mapping[str, Any] | None,
                 files: Mapping[str, bytes] | None) -> pb.RepositoryModelLoadRequest:
    request = pb.RepositoryModelLoadRequest(model_name=name)
    if config is not None:
        text = config if isinstance(config, str) else json.dumps(config)
        request.parameters["config"].string_param = text
    for path, content in (files or {}).items():
        key = path if path.startswith("file:") else f"file:{path}"
        request.parameters[key].bytes_param = bytes(content)
    return request


def unload_request(name: str, unload_dependents: bool) -> pb.RepositoryModelUnloadRequest:
    request = pb.RepositoryModelUnloadRequest(model_name=name)
    if unload_dependents:
        request.parameters["unload_dependents"].bool_param = True
    return request


@dataclass(slots=True)
class StreamRequest:
    """One request of a stream; a plain ``{name: array}`` mapping means ``StreamRequest(it)``."""

    inputs: Mapping[str, InputValue]
    outputs: Outputs = None
    request_id: str = ""
    parameters: Mapping[str, ParameterValue] | None = None


@dataclass(slots=True)
class StreamResult:
    """One answer of a stream: ``outputs``, or ``error`` when the request failed.

    ``index`` is the request's position in the iterable given to ``stream_infer`` (-1 when the
    server's answer names no request); answers arrive in completion order.
    """

    index: int
    request_id: str
    model_name: str
    model_version: str
    outputs: dict[str, np.ndarray] = field(default_factory=dict)
    parameters: dict[str, ParameterValue | None] = field(default_factory=dict)
    error: ShmserveError | None = None
    # The request's last answer. A decoupled model's request may have any number of answers
    # (none, or an empty final one with the request parameter
    # triton_enable_empty_final_response).
    final: bool = True
    # The response-ring slot its outputs are in (``stream_infer(ring=...)``); -1: none.
    ring_slot: int = -1

    def unwrap(self) -> dict[str, np.ndarray]:
        """The outputs, or raise the request's error."""
        if self.error is not None:
            raise self.error
        return self.outputs


FINAL_RESPONSE = "triton_final_response"


#: The request parameter asking for a decoupled request's final flag as an empty response.
EMPTY_FINAL = "triton_enable_empty_final_response"


class StreamBook:
    """Stream bookkeeping: request id -> (index, region outputs), for reading the answers."""

    def __init__(self, model: str, version: str, outputs: Outputs,
                 parameters: Mapping[str, ParameterValue] | None, regions: RegionSet,
                 ring: ResponseRing | None = None) -> None:
        self.ring = ring
        self.model = model
        self.version = version
        self.outputs = outputs
        self.parameters = parameters
        self.regions = regions
        self._pending: dict[str, list[tuple[int, dict[str, np.ndarray]]]] = {}
        self._hidden_finals: set[str] = set()  # requests whose empty final answer is ours
        self._lock = threading.Lock()
        self.failure: BaseException | None = None

    def prepare(self, index: int, item: StreamRequest | Mapping[str, InputValue]) -> bytes:
        request = item if isinstance(item, StreamRequest) else StreamRequest(item)
        request_id = request.request_id or f"{index}"
        parameters = request.parameters if request.parameters is not None else self.parameters
        if self.ring is not None:
            # The ring passes to the next request once this one's final answer was read:
            # over gRPC that needs the empty final response, shown only when asked for.
            if not (parameters or {}).get(EMPTY_FINAL):
                with self._lock:
                    self._hidden_finals.add(request_id)
            parameters = {**(parameters or {}), **self.ring.parameters(), EMPTY_FINAL: True}
        outputs = request.outputs if request.outputs is not None else self.outputs
        prepared = prepare_infer(self.model, request.inputs, outputs, self.version, request_id,
                                 parameters, self.regions.locate if len(self.regions) else None)
        with self._lock:
            self._pending.setdefault(request_id, []).append((index,
                                                             prepared.region_outputs))
        return prepared.payload

    def finish(self) -> None:
        """At the end of the stream: raise what stopped the requests' iterable, if anything."""
        if self.failure is not None:
            raise self.failure

    def read(self, data: bytes) -> StreamResult | None:
        """The answer in ``data``; None for an empty final answer nobody asked for."""
        error_message, header, raw = decode_stream_response(data)
        flag = header.parameters.get(FINAL_RESPONSE)
        final = flag is None or flag.bool_param
        if final and self._hidden_finals and header.id in self._hidden_finals:
            with self._lock:
                self._hidden_finals.discard(header.id)
            if not header.outputs and not error_message:
                with self._lock:
                    waiting = self._pending.get(header.id)
                    if waiting:
                        waiting.pop(0)
                        if not waiting:
                            del self._pending[header.id]
                if self.ring is not None:
                    self.ring.finished()
                return None
        region_outputs: dict[str, np.ndarray]
        with self._lock:
            waiting = self._pending.get(header.id)
            if not waiting:
                index, region_outputs = -1, {}
            elif final:
                index, region_outputs = waiting.pop(0)
                if not waiting:
                    del self._pending[header.id]
            else:  # more answers of this request follow
                index, region_outputs = waiting[0]
        result = StreamResult(index, header.id, header.model_name or self.model,
                              header.model_version, final=final)
        ring = self.ring
        if error_message:
            result.error = ShmserveError(grpc.StatusCode.UNKNOWN, error_message)
            if ring is not None and final:
                ring.finished()
            return result
        try:
            if ring is not None:
                placed = [(output.name, output.datatype, list(output.shape))
                          for output in header.outputs if output.name not in region_outputs
                          and "shared_memory_region" in output.parameters]
                if placed:
                    result.ring_slot, arrays = ring.place(placed)
                    region_outputs = {**region_outputs, **arrays}
            result.outputs = read_outputs(header, raw, region_outputs)
        except ShmserveError as exc:
            result.error = exc
        finally:
            if ring is not None and final:
                ring.finished()
        result.parameters = {key: parameter_value(value)
                             for key, value in header.parameters.items()}
        return result


def prepare(model: str, inputs: Mapping[str, InputValue], outputs: Outputs, version: str,
            request_id: str, parameters: Mapping[str, ParameterValue] | None,
            regions: RegionSet) -> PreparedRequest:
    if type(inputs) is not dict and not isinstance(inputs, Mapping):
        raise invalid_argument("inputs must be a mapping of input name to array")
    return prepare_infer(model, inputs, outputs, version, request_id, parameters,
                         regions.locate if len(regions) else None)
