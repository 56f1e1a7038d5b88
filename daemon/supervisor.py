"""The supervisor: fork server first, then models, gRPC, signals, and an orderly exit.

Signal handlers only record the signal on the event loop; the loop acts on it:
SIGTERM/SIGINT drain and exit, SIGHUP re-reads the repository.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal

import grpc

from shmserve.daemon import systemd
from shmserve.daemon.frontend.service import (
    InferenceService,
    ServerState,
    generic_handlers,
)
from shmserve.daemon.model_config import detect_gpus
from shmserve.daemon.models import ModelManager
from shmserve.daemon.settings import Settings
from shmserve.daemon.shm_registry import ShmRegistry
from shmserve.daemon.worker_process import start_fork_server
from shmserve.workers.shm import remove_arenas

log = logging.getLogger("shmserve")

INT32_MAX = 2**31 - 1
GRPC_OPTIONS = [
    ("grpc.max_send_message_length", INT32_MAX),
    ("grpc.max_receive_message_length", INT32_MAX),
    ("grpc.so_reuseport", 0),
]


class Supervisor:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.pid = os.getpid()
        self._signals: asyncio.Queue[str] = asyncio.Queue()
        self.bound_port: int | None = None

    async def run(self) -> int:
        settings = self.settings
        stale = remove_arenas(None)
        if stale:
            log.info("removed %d arena segment(s) left by dead servers", len(stale))
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, start_fork_server)
        gpu_ids = detect_gpus()
        models = ModelManager(settings, self.pid, gpu_ids)
        registry = ShmRegistry(models.release_regions, settings.shm_key_prefix, gpu_ids)
        state = ServerState(settings, models, registry)
        server = grpc.aio.server(options=GRPC_OPTIONS)
        server.add_generic_rpc_handlers(generic_handlers(InferenceService(state)))
        address = f"{settings.grpc_address}:{settings.grpc_port}"
        try:
            self.bound_port = server.add_insecure_port(address)
        except RuntimeError as exc:
            log.error("cannot listen on %s: %s", address, exc)
            return 1
        await server.start()
        host = settings.grpc_address
        log.info("Started GRPCInferenceService at %s:%d", host, self.bound_port)
        for name in ("SIGTERM", "SIGINT", "SIGHUP"):
            loop.add_signal_handler(getattr(signal, name), self._signals.put_nowait, name)
        try:
            await models.load_startup_models()
            systemd.notify(f"READY=1\nSTATUS=serving on port {self.bound_port}\n"
                           f"MAINPID={self.pid}")
            log.info("shmserve ready: %d model(s)", len(models.records()))
            poller = (loop.create_task(self._poll(models))
                      if settings.model_control_mode == "poll" else None)
            while True:
                name = await self._signals.get()
                if name == "SIGHUP":
                    systemd.notify("RELOADING=1")
                    await self._rescan(models)
                    systemd.notify("READY=1")
                    continue
                log.info("received %s; draining", name)
                break
            if poller is not None:
                poller.cancel()
        finally:
            await self._shutdown(state, server)
        return 0

    async def _shutdown(self, state: ServerState, server: grpc.aio.Server) -> None:
        systemd.notify("STOPPING=1")
        state.exiting = True
        timeout = self.settings.exit_timeout_secs
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(state.idle.wait(), timeout)
        await state.models.shutdown()
        await server.stop(grace=1.0)
        remove_arenas(self.pid)
        log.info("shmserve stopped")

    async def _rescan(self, models: ModelManager) -> None:
        """Load new and changed models, unload removed ones (SIGHUP and poll mode)."""
        present = set(models.repository_models())
        mode = self.settings.model_control_mode
        for name in models.forget_missing(present):
            if models.record(name).versions:
                await models.unload(name)
        if mode == "explicit":
            return
        for name in sorted(present):
            if models.changed(name):
                with contextlib.suppress(Exception):
                    await models.load(name)

    async def _poll(self, models: ModelManager) -> None:
        while True:
            await asyncio.sleep(self.settings.repository_poll_secs)
            try:
                await self._rescan(models)
            except Exception:
                log.exception("repository poll failed")
