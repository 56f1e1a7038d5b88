"""What the gRPC door needs of the core: the in-process ``Core``, or, in a frontend process
(``--grpc-frontends``), its link to the core (daemon/frontend_process/remote_core.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from shmserve.daemon.infer_request import RequestItems
from shmserve.daemon.reply import Reply
from shmserve.daemon.request import InferRequest
from shmserve.daemon.settings import Settings


class CoreAccess(Protocol):
    @property
    def settings(self) -> Settings: ...

    def submit(self, model_name: str, version: str, parse: Callable[[], RequestItems],
               reply: Reply, streaming: bool = False) -> InferRequest: ...

    def cancel(self, request: InferRequest) -> None: ...
