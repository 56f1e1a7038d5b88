"""A frontend process's life: the channel to the core, the gRPC server, and the end.

Started from the fork server (never from the supervisor, whose gRPC threads do not survive a
fork), it inherits the fork server's ignored SIGTERM/SIGINT/SIGHUP, so a signal sent to the
whole process group reaches only the supervisor: the supervisor drains first, then closes
this process's channel, and the process stops its server and exits. It dies with the fork
server (PR_SET_PDEATHSIG), which dies with the supervisor.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc

from shmserve.client.local_channel import AsyncLocalChannel
from shmserve.daemon.frontend.service import (
    CLIENT_ID_HEADER,
    RPCS,
    InferenceService,
    generic_handlers,
)
from shmserve.daemon.frontend_process.grpc_server import add_port, grpc_server, server_credentials
from shmserve.daemon.frontend_process.http_proxy import FrontendHttpDoor
from shmserve.daemon.frontend_process.records import FrontendReady, RpcCall
from shmserve.daemon.frontend_process.remote_core import RemoteCore
from shmserve.daemon.heap import HeapTrimmer
from shmserve.daemon.settings import Settings
from shmserve.protos import shmserve_health_pb2 as health_pb
from shmserve.workers.lineage import set_parent_death_signal
from shmserve.workers.proctitle import set_process_title

log = logging.getLogger("shmserve.frontend")
_CHANNEL_CHECK_SECS = 0.2


@dataclass(frozen=True, slots=True)
class FrontendSpec:
    """What a frontend process is started with."""

    index: int
    address: str          # host:port to serve gRPC on, with SO_REUSEPORT
    settings: Settings
    http_host: str = ""   # where to serve HTTP too ("": not at all), with SO_REUSEPORT
    http_port: int = 0
    core_http: str = ""   # the core's HTTP door (a Unix socket) for proxied routes


def run_frontend(sock: socket.socket, spec: FrontendSpec) -> None:
    """The process's entry (after the fork server forked it)."""
    set_parent_death_signal()
    set_process_title(f"shmserve frontend {spec.index}", f"shmserve-fe{spec.index}")
    logging.basicConfig(level=logging.DEBUG if spec.settings.log_verbose else logging.INFO,
                        format=f"%(asctime)s frontend{spec.index} %(levelname)s %(name)s: "
                               f"%(message)s")
    try:
        import uvloop
        uvloop.run(_serve(sock, spec))
    except ImportError:
        asyncio.run(_serve(sock, spec))


async def _serve(sock: socket.socket, spec: FrontendSpec) -> None:
    heap = HeapTrimmer()  # it builds and receives large gRPC messages too
    heap.start()
    channel = await AsyncLocalChannel.over(sock)
    core = RemoteCore(channel, spec.settings)
    service = InferenceService(core)
    server = grpc_server(spec.settings, reuse_port=True)
    server.add_generic_rpc_handlers(generic_handlers(service, _forwarder(core)))
    add_port(server, spec.address, server_credentials(spec.settings))
    await server.start()
    http = None
    if spec.http_host:
        http = FrontendHttpDoor(core, spec.core_http)
        await http.start_shared(spec.http_host.strip("[]"), spec.http_port)
    await channel.call(FrontendReady(spec.index, os.getpid()).message())
    while not channel.closed:  # the supervisor closes it to stop us (or died)
        await asyncio.sleep(_CHANNEL_CHECK_SECS)
    await server.stop(grace=1.0)
    if http is not None:
        await http.stop()
    heap.stop()


Handler = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]


def _forwarder(core: RemoteCore) -> Callable[[str], Handler]:
    """Each non-inference RPC's handler here: the call, forwarded to the core's door."""

    def forward(rpc: str) -> Handler:
        entry = RPCS.get(rpc)
        response_type = entry[1] if entry is not None else health_pb.HealthCheckResponse

        async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
            client_id = ""
            for key, value in context.invocation_metadata() or ():
                if key == CLIENT_ID_HEADER:
                    client_id = str(value)
            answer = await core.call(RpcCall(rpc, request.SerializeToString(), client_id))
            return response_type.FromString(answer)

        return handle

    return forward

