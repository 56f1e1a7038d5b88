"""The one exception type the client raises, and its conversions from gRPC errors."""

from __future__ import annotations

import grpc


class ShmserveError(Exception):
    """A failed call: the gRPC status ``code`` and the server's (or the client's) ``message``.

    Server errors keep Triton's codes and texts (``NOT_FOUND`` "Request for unknown model: ...").
    Requests the client itself refuses before sending (an array of an unsupported dtype, an
    output array that is not in a registered region) are ``INVALID_ARGUMENT``.
    """

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"[{code.name}] {message}")
        self.code = code
        self.message = message

    def __reduce__(self) -> tuple[type[ShmserveError], tuple[grpc.StatusCode, str]]:
        return (type(self), (self.code, self.message))


class RegionFullError(ShmserveError, MemoryError):
    """``region.ndarray(...)`` asked for more bytes than the region has left."""

    def __init__(self, message: str) -> None:
        super().__init__(grpc.StatusCode.RESOURCE_EXHAUSTED, message)

    def __reduce__(self) -> tuple[type[ShmserveError], tuple[str]]:  # type: ignore[override]
        return (type(self), (self.message,))


def from_rpc_error(error: grpc.RpcError) -> ShmserveError:
    """Turn a grpc (sync or aio) RpcError into a ShmserveError with its code and details."""
    code_fn = getattr(error, "code", None)
    details_fn = getattr(error, "details", None)
    code = code_fn() if callable(code_fn) else None
    details = details_fn() if callable(details_fn) else None
    if not isinstance(code, grpc.StatusCode):
        code = grpc.StatusCode.UNKNOWN
    return ShmserveError(code, details if isinstance(details, str) else str(error))


def invalid_argument(message: str) -> ShmserveError:
    return ShmserveError(grpc.StatusCode.INVALID_ARGUMENT, message)
