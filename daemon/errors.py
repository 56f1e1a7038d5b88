"""One error type for everything the server reports; mapped to a gRPC status in one place."""

from __future__ import annotations

import grpc

# Longest error text sent to a client: a message echoing a 10,000-character name or listing
# thousands of inputs would pass the client's metadata limit (RESOURCE_EXHAUSTED instead of
# the real error). Longer texts keep their start and end.
MAX_MESSAGE_CHARS = 1024


def bounded(message: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    if len(message) <= limit:
        return message
    cut = len(message) - limit
    return f"{message[:limit * 3 // 4]}... ({cut} characters cut) ...{message[-limit // 4:]}"


class ServeError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        message = bounded(message)
        super().__init__(message)
        self.code = code
        self.message = message

    @classmethod
    def from_tuple(cls, raw: list[str] | tuple[str, str]) -> ServeError:
        """Errors that crossed the process boundary as [code name, message]."""
        code_name, message = raw[0], raw[1]
        code = getattr(grpc.StatusCode, code_name, grpc.StatusCode.INTERNAL)
        return cls(code, message)

    def __repr__(self) -> str:
        return f"ServeError({self.code.name}, {self.message!r})"


def invalid_argument(message: str) -> ServeError:
    return ServeError(grpc.StatusCode.INVALID_ARGUMENT, message)


def not_found(message: str) -> ServeError:
    return ServeError(grpc.StatusCode.NOT_FOUND, message)


def unavailable(message: str) -> ServeError:
    return ServeError(grpc.StatusCode.UNAVAILABLE, message)


def internal(message: str) -> ServeError:
    return ServeError(grpc.StatusCode.INTERNAL, message)


def already_exists(message: str) -> ServeError:
    return ServeError(grpc.StatusCode.ALREADY_EXISTS, message)


def resource_exhausted(message: str) -> ServeError:
    return ServeError(grpc.StatusCode.RESOURCE_EXHAUSTED, message)


def unimplemented(message: str) -> ServeError:
    return ServeError(grpc.StatusCode.UNIMPLEMENTED, message)


def unknown_model(name: str) -> ServeError:
    return not_found(f"Request for unknown model: '{name}' is not found")


SERVER_EXITING = "Server exiting"
