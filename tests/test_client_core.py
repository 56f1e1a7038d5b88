"""The client core both clients share (client/_core.py, client/_unary.py): pure logic, no server.

The clients themselves are tested against real servers in test_client.py and
test_local_channel.py; these tests pin what the two shells must agree on.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import grpc
import numpy as np
import pytest

from shmserve.client import AsyncClient, Client, ShmserveError
from shmserve.client import _unary as rpc
from shmserve.client._common import UNARY_RPCS
from shmserve.client._core import UNSET, ClientCore
from shmserve.client._local import LocalRequest, stream_result
from shmserve.protos import shmserve_service_pb2 as pb

# What the asyncio client does without I/O, so not awaitable there either.
_NOT_AWAITED = {"serialize_infer_request", "shared_memory", "cuda_shared_memory", "sequence"}
_SYNC_ONLY = {"__enter__", "__exit__"}
_ASYNC_ONLY = {"__aenter__", "__aexit__"}


def _public(cls: type) -> dict[str, Any]:
    return {name: getattr(cls, name) for name in dir(cls)
            if not name.startswith("_") or name in _SYNC_ONLY | _ASYNC_ONLY}


def _parameters(method: Callable[..., Any]) -> list[tuple[str, Any, Any]]:
    """Names, kinds and defaults (annotations may differ: async takes async iterables too)."""
    return [(p.name, p.kind, p.default) for p in inspect.signature(method).parameters.values()]


def test_the_two_clients_offer_the_same_methods_with_the_same_parameters() -> None:
    sync, aio = _public(Client), _public(AsyncClient)
    assert set(sync) - _SYNC_ONLY == set(aio) - _ASYNC_ONLY
    for name in set(sync) - _SYNC_ONLY:
        if isinstance(sync[name], property):
            assert isinstance(aio[name], property), name
            continue
        assert _parameters(sync[name]) == _parameters(aio[name]), name


def test_every_io_method_of_the_async_client_is_awaited() -> None:
    for name, method in _public(AsyncClient).items():
        if isinstance(method, property) or name in _NOT_AWAITED:
            continue
        awaitable = (inspect.iscoroutinefunction(method)
                     or inspect.isasyncgenfunction(method))
        assert awaitable, name
        assert not inspect.iscoroutinefunction(getattr(Client, name, None)), name
    for name in _NOT_AWAITED:
        assert not inspect.iscoroutinefunction(getattr(AsyncClient, name)), name


def test_both_clients_are_shells_over_the_core() -> None:
    assert issubclass(Client, ClientCore) and issubclass(AsyncClient, ClientCore)
    assert Client.serialize_infer_request is AsyncClient.serialize_infer_request


_PLANS: list[tuple[Callable[[], rpc.Unary[Any]], Any, Any]] = [
    (rpc.server_live, pb.ServerLiveResponse(live=True), True),
    (rpc.server_ready, pb.ServerReadyResponse(ready=False), False),
    (lambda: rpc.model_ready("m", "2"), pb.ModelReadyResponse(ready=True), True),
    (lambda: rpc.model_config("m", ""), pb.ModelConfigResponse(), pb.ModelConfigResponse().config),
    (lambda: rpc.model_statistics("m", ""),
     pb.ModelStatisticsResponse(model_stats=[pb.ModelStatistics(name="m")]),
     [pb.ModelStatistics(name="m")]),
    (lambda: rpc.repository_index(True),
     pb.RepositoryIndexResponse(models=[pb.RepositoryIndexResponse.ModelIndex(name="m")]),
     [pb.RepositoryIndexResponse.ModelIndex(name="m")]),
    (lambda: rpc.shm_unregister("r"), pb.SystemSharedMemoryUnregisterResponse(), None),
]


@pytest.mark.parametrize("plan, response, expected", _PLANS)
def test_unary_plans_send_the_rpcs_request_type_and_read_its_answer(
        plan: Callable[[], rpc.Unary[Any]], response: Any, expected: Any) -> None:
    call = plan()
    request_type, response_type = UNARY_RPCS[call.rpc]
    assert type(call.request) is request_type
    assert type(response) is response_type
    answer = call.read(response)
    assert answer == expected and type(answer) is type(expected)
    assert not call.loads


def test_load_and_unload_default_to_the_load_timeout() -> None:
    load = rpc.load_model("m", {"backend": "python"}, {"1/model.py": b"x"})
    assert load.loads and load.rpc == "RepositoryModelLoad"
    assert load.request.parameters["config"].string_param == '{"backend": "python"}'
    assert load.request.parameters["file:1/model.py"].bytes_param == b"x"
    unload = rpc.unload_model("m", True)
    assert unload.loads and unload.request.parameters["unload_dependents"].bool_param
    with Client("127.0.0.1:1", timeout=3.0, load_timeout=7.0) as client:  # never connects
        assert client._deadline(UNSET) == 3.0
        assert client._deadline(UNSET, load.loads) == 7.0
        assert client._deadline(None, load.loads) is None
        assert client._deadline(0.5) == 0.5


def test_a_request_too_large_for_the_channel_falls_back_unless_it_names_regions() -> None:
    plain = LocalRequest({}, {}, 10, references=False)
    ClientCore._past_channel(plain, 5)  # gRPC carries it
    with pytest.raises(ShmserveError) as info:
        ClientCore._past_channel(LocalRequest({}, {}, 10, references=True), 5)
    assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "too large for the local channel" in info.value.message


def test_stream_answers_through_the_channel() -> None:
    refused = stream_result(3, "r3", "m", {"err": ["INVALID_ARGUMENT", "bad input"]}, {})
    assert (refused.index, refused.request_id, refused.model_version) == (3, "r3", "")
    assert refused.error is not None and refused.error.code == grpc.StatusCode.UNKNOWN
    assert refused.error.message == "bad input"
    data = np.arange(4, dtype=np.int32)
    ok = stream_result(0, "0", "m", {"model_version": "1",
                                     "out": [["OUT", "INT32", [4], data.tobytes()]]}, {})
    assert ok.error is None and ok.model_version == "1"
    np.testing.assert_array_equal(ok.unwrap()["OUT"], data)
    broken = stream_result(1, "1", "m", {"model_version": "1",
                                         "out": [["OUT", "INT32", [5], data.tobytes()]]}, {})
    assert broken.error is not None and broken.error.code == grpc.StatusCode.INTERNAL
