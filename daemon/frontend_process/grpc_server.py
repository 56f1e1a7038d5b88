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


class TlsError(Exception):
    """The TLS settings cannot be used (a missing setting, an unreadable file)."""


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS credentials from --grpc-use-ssl[-mutual] and the PEM files; None for plaintext."""
    if not (settings.grpc_use_ssl or settings.grpc_use_ssl_mutual):
        return None
    needed = [("--grpc-server-cert", settings.grpc_server_cert),
              ("--grpc-server-key", settings.grpc_server_key)]
    if settings.grpc_use_ssl_mutual:
        needed.append(("--grpc-root-cert", settings.grpc_root_cert))
    contents: list[bytes] = []
    for flag, path in needed:
        if not path:
            raise TlsError(f"gRPC over TLS needs {flag}")
        try:
            with open(path, "rb") as pem:
                contents.append(pem.read())
        except OSError as exc:
            raise TlsError(f"cannot read {flag} {path}: {exc.strerror or exc}") from None
    root = contents[2] if settings.grpc_use_ssl_mutual else None
    return grpc.ssl_server_credentials([(contents[1], contents[0])], root_certificates=root,
                                       require_client_auth=settings.grpc_use_ssl_mutual)


def add_port(server: grpc.aio.Server, address: str,
             credentials: grpc.ServerCredentials | None) -> int:
    """Listen on ``address``, over TLS with ``credentials``; the port bound."""
    if credentials is None:
        return server.add_insecure_port(address)
    return server.add_secure_port(address, credentials)


# tritonserver's connection flags -> gRPC core arguments (set only when given).
_CONNECTION_ARGUMENTS = {
    "grpc_keepalive_time": "grpc.keepalive_time_ms",
    "grpc_keepalive_timeout": "grpc.keepalive_timeout_ms",
    "grpc_keepalive_permit_without_calls": "grpc.keepalive_permit_without_calls",
    "grpc_http2_max_pings_without_data": "grpc.http2.max_pings_without_data",
    "grpc_http2_min_recv_ping_interval_without_data":
        "grpc.http2.min_ping_interval_without_data_ms",
    "grpc_http2_max_ping_strikes": "grpc.http2.max_ping_strikes",
    "grpc_max_connection_age": "grpc.max_connection_age_ms",
    "grpc_max_connection_age_grace": "grpc.max_connection_age_grace_ms",
}


def server_options(settings: Settings, reuse_port: bool) -> list[tuple[str, int]]:
    """The gRPC server's arguments: ours, overridden by the connection flags given."""
    options = dict(GRPC_OPTIONS)
    for field, argument in _CONNECTION_ARGUMENTS.items():
        value = getattr(settings, field)
        if value is not None:
            options[argument] = int(value)
    options["grpc.so_reuseport"] = 1 if reuse_port else 0
    options["grpc.max_receive_message_length"] = settings.max_request_bytes
    return list(options.items())


def grpc_server(settings: Settings, reuse_port: bool) -> grpc.aio.Server:
    """``reuse_port``: several processes listen on the port and the kernel spreads the
    connections (SO_REUSEPORT). gRPC refuses a request larger than --max-request-bytes
    before any of it is handed to Python."""
    return grpc.aio.server(options=server_options(settings, reuse_port))
