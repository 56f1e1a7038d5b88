"""The core every door shares: models, regions, in-flight and drain accounting, one entry.

A door (gRPC, the local channel; HTTP, BLS and extra frontends next) parses its wire format
into ``RequestItems`` and calls ``submit`` with a ``Reply`` of its own; the core resolves the
model, validates the request (infer_request.py) and queues it with the model's scheduler,
which answers through the reply. A door holds the core and nothing of another door.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from shmserve.daemon.cached_infer import CacheFront
from shmserve.daemon.errors import SERVER_EXITING, unavailable, unimplemented
from shmserve.daemon.infer_request import RequestItems, build_request
from shmserve.daemon.models import ModelManager
from shmserve.daemon.reply import Reply
from shmserve.daemon.request import InferRequest
from shmserve.daemon.response_cache import ResponseCache, cache_size
from shmserve.daemon.settings import Settings
from shmserve.daemon.shm_registry import ShmPolicy, ShmRegistry
from shmserve.daemon.trace_config import config_from
from shmserve.daemon.tracing import Trace, Tracer


class Core:
    def __init__(self, settings: Settings, supervisor_pid: int, gpu_ids: list[int]) -> None:
        self.settings = settings
        self.models = ModelManager(settings, supervisor_pid, gpu_ids, self._finished)
        self.models.step_door = self  # ensembles submit their steps through the core
        policy = ShmPolicy(settings.allow_client_shm, settings.shm_allow_foreign_owners,
                           settings.shm_key_prefix)
        size = cache_size(settings.cache_config)
        # The response cache (--cache-config), for models with response_cache enabled.
        self.cache = CacheFront(ResponseCache(size), self._finished) if size else None
        self.registry = ShmRegistry(self._regions_released, policy, gpu_ids)
        # Request tracing (--trace-config and the trace API).
        self.tracer = Tracer(config_from(settings.trace_config))
        self.exiting = False
        self.inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def _regions_released(self, region_ids: list[int]) -> None:
        self.models.release_regions(region_ids)
        if self.cache is not None:
            self.cache.forget_regions(region_ids)

    def submit(self, model_name: str, version: str, parse: Callable[[], RequestItems],
               reply: Reply, streaming: bool = False,
               parent: Trace | None = None) -> InferRequest:
        """Every door's way in: resolve the model, ``parse`` the door's message (after the
        model is known, so its errors come in Triton's order), validate and queue it. The
        scheduler answers through ``reply``; a door whose ``reply`` takes several responses
        (``streaming``) may send to decoupled models. Raises ServeError (nothing was queued
        then)."""
        if self.exiting:
            raise unavailable(SERVER_EXITING)
        model = self.models.resolve(model_name, version)
        if not streaming and model.config.model_transaction_policy.decoupled:
            raise unimplemented(f"ModelInfer RPC doesn't support models with decoupled "
                                f"transaction policy; use ModelStreamInfer for model "
                                f"'{model.name}'")
        request = build_request(model, self.registry, parse(), reply)
        reply.request = request
        request.trace = self.tracer.start(model.name, model.version, request.request_id,
                                          parent)
        self.inflight += 1
        self._idle.clear()
        try:
            cache = self.cache
            if cache is not None and cache.enabled_for(model):
                cache.submit(model, request)
            else:
                model.scheduler.submit(request)
        except BaseException:
            self._finished(request)
            raise
        return request

    def cancel(self, request: InferRequest) -> None:
        """The door's caller gave up (deadline, cancel, closed channel): a queued request is
        dropped, one sent ahead is withdrawn; its reply is not called any more, so the reply
        lets go of the request here (a reply keeps it until its final answer otherwise, and
        the pair would be a cycle left to the garbage collector: tests/test_door_cycles.py)."""
        if not request.done and not request.cancelled and request.scheduler is not None:
            request.scheduler.cancel(request)
        request.reply.request = None

    def _finished(self, request: InferRequest) -> None:
        """Once per accepted request, when the scheduler is done with it."""
        request.done = True
        if request.trace is not None:
            self.tracer.end(request.trace)
            request.trace = None
        for region in request.regions:
            self.registry.release(region)
        self.inflight -= 1
        if self.inflight == 0:
            self._idle.set()

    async def drain(self, timeout: float) -> None:
        """Wait until no accepted request is left (or the timeout passed)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout)
