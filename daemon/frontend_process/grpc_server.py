"""The gRPC server every process serving the gRPC port builds alike (the supervisor with one
frontend, each frontend process with several)."""

from __future__ import annotations

import grpc

from shmserve.daemon.settings import Settings

INT32_MAX = 2**31 - 1
GRPC_OPTIONS = [
    ("grpc.max_send_message_length", INT32_MAX),
    # Accept client keepalive pings every 10 s, also between calls (tritonclient's
    # KeepAliveOptions users would otherwise get GOAWAY "too_many_pings").
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
]


def grpc_server(settings: Settings, reuse_port: bool) -> grpc.aio.Server:
    """``reuse_port``: several processes listen on the port and the kernel spreads the
    connections (SO_REUSEPORT). gRPC refuses a request larger than --max-request-bytes
    before any of it is handed to Python."""
    return grpc.aio.server(options=[
        *GRPC_OPTIONS, ("grpc.so_reuseport", 1 if reuse_port else 0),
        ("grpc.max_receive_message_length", settings.max_request_bytes)])
