"""shmserve: a Triton-compatible (KServe v2) inference server that moves tensors through
shared memory.

The package's folders install as its subpackages (``shmserve.daemon``, ``shmserve.client``,
``shmserve.workers``, ...; see pyproject.toml). This root module only names the embedded
server, imported on first use so that ``import shmserve`` stays light (no gRPC, no NumPy):

    import shmserve

    with shmserve.Server(model_repository="models") as server, server.client() as client:
        out = client.infer("simple", {"INPUT0": x, "INPUT1": x})

See docs/deploy.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from shmserve.embedded import Server, ServerError

__all__ = ["Server", "ServerError"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from shmserve import embedded
        return getattr(embedded, name)
    raise AttributeError(f"module 'shmserve' has no attribute '{name}'")
