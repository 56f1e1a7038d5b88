"""tritonserver's --grpc-header-forward-pattern and --http-header-forward-pattern: request
headers whose name matches the pattern (anywhere in the name) reach the model as string
request parameters (``request.parameters()`` in a python model)."""

from __future__ import annotations

import re
from collections.abc import Iterable

from shmserve.daemon.errors import invalid_argument
from shmserve.daemon.infer_request import RequestItems

# Parameter names the protocol itself uses (Triton's kReservedParameterKeys); and every name
# starting with "triton_".
RESERVED = frozenset({"sequence_id", "sequence_start", "sequence_end", "priority", "timeout",
                      "headers", "binary_data_output"})

Headers = list[tuple[str, str]]


class HeaderForwarder:
    def __init__(self, pattern: str) -> None:
        self._regex = re.compile(pattern)

    def pick(self, headers: Iterable[tuple[str, str]]) -> Headers:
        """The headers to forward, as (name, value)."""
        search = self._regex.search
        return [(str(name), str(value)) for name, value in headers if search(str(name))]


def forwarder(pattern: str) -> HeaderForwarder | None:
    return HeaderForwarder(pattern) if pattern else None


def with_headers(items: RequestItems, headers: Headers | None) -> RequestItems:
    """``items`` with the forwarded headers among its parameters; raises ServeError (Triton's
    text) for a reserved name."""
    if headers:
        for name, value in headers:
            if name in RESERVED or name.startswith("triton_"):
                raise invalid_argument(f"Header '{name}' is reserved for Triton usage and "
                                       f"cannot be forwarded.")
            items.parameters[name] = value
    return items
