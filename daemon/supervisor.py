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
from shmserve.daemon.core import Core
from shmserve.daemon.frontend.bls import BlsDoor
from shmserve.daemon.frontend.http import HttpDoor
from shmserve.daemon.frontend.local import LocalFrontend
from shmserve.daemon.frontend.service import InferenceService, generic_handlers
from shmserve.daemon.frontend_process.core_http import CoreHttp
from shmserve.daemon.frontend_process.grpc_server import (
    GRPC_OPTIONS,
    TlsError,
    add_port,
    grpc_server,
    server_credentials,
)
from shmserve.daemon.frontend_process.pool import FrontendPool, frontend_count
from shmserve.daemon.frontend_process.records import RpcCall
from shmserve.daemon.heap import HeapTrimmer
from shmserve.daemon.host_metrics import HostMetrics
from shmserve.daemon.host_policy import check_policies
from shmserve.daemon.latency_metrics import options_from
from shmserve.daemon.leftovers import end_leftovers
from shmserve.daemon.lifeline import watch_lifeline
from shmserve.daemon.metrics import MetricsServer
from shmserve.daemon.model_config import detect_gpus
from shmserve.daemon.models import ModelManager
from shmserve.daemon.settings import Settings, is_unix_address
from shmserve.daemon.time_budget import TimeBudget
from shmserve.daemon.worker_process import WorkerProcess, start_fork_server
from shmserve.protos.local_socket import (
    prepare_socket_dir,
    server_socket_dir,
    socket_name,
    writable_by_others,
)
from shmserve.workers.lineage import SUPERVISOR_ENV
from shmserve.workers.shm import remove_arenas

log = logging.getLogger("shmserve")

__all__ = ["GRPC_OPTIONS", "Supervisor"]


class Supervisor:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.pid = os.getpid()
        self._signals: asyncio.Queue[str] = asyncio.Queue()
        self.bound_port: int | None = None
        self.http_port: int | None = None
        self.frontends: FrontendPool | None = None  # --grpc-frontends N > 1
        self._core_http: CoreHttp | None = None     # their proxied HTTP calls' door

    async def run(self) -> int:
        settings = self.settings
        try:
            server_credentials(settings)  # TLS files checked before anything starts
        except TlsError as exc:
            log.error("%s", exc)
            return 1
        problem = check_policies(settings.host_policies, os.sched_getaffinity(0))
        if problem is not None:
            log.error("%s", problem)
            return 1
        end_leftovers()  # before the arenas: a leftover worker could still write one
        stale = remove_arenas(None)
        if stale:
            log.info("removed %d arena segment(s) left by dead servers", len(stale))
        loop = asyncio.get_running_loop()
        # On this thread, not an executor's: the fork server dies with the thread that
        # started it (PR_SET_PDEATHSIG), and only the main thread lives as long as we do.
        os.environ[SUPERVISOR_ENV] = str(self.pid)
        start_fork_server()
        # After the fork server started: its children keep glibc's defaults.
        heap = HeapTrimmer()
        heap.start()
        gpu_ids = detect_gpus()
        core = Core(settings, self.pid, gpu_ids)
        models = core.models
        metrics_address = settings.metrics_address or (
            "0.0.0.0" if is_unix_address(settings.grpc_address) else settings.grpc_address)
        host = HostMetrics(settings.allow_cpu_metrics, settings.allow_gpu_metrics,
                           settings.metrics_interval_ms / 1000)
        metrics = MetricsServer(models, metrics_address, settings.metrics_port, core.registry,
                                core.cache.cache if core.cache is not None else None,
                                host if host.enabled else None,
                                options_from(settings.metrics_config)
                                ) if settings.allow_metrics else None
        if metrics is not None:
            try:
                await metrics.start()
            except OSError as exc:
                log.error("cannot serve metrics on %s:%d: %s", metrics_address,
                          settings.metrics_port, exc)
                return 1
        frontends = frontend_count(settings.grpc_frontends) if settings.allow_grpc else 1
        if frontends > 1 and is_unix_address(settings.grpc_address):
            # SO_REUSEPORT spreads TCP connections only: a Unix socket has one listener.
            if settings.grpc_frontends > 1:
                log.warning("--grpc-frontends %d ignored: gRPC listens on a Unix socket (%s), "
                            "served by the supervisor", settings.grpc_frontends,
                            settings.grpc_address)
            frontends = 1
        server: grpc.aio.Server | None = None
        if frontends > 1:
            if not await self._start_frontends(core, frontends):
                if metrics is not None:
                    await metrics.stop()
                return 1
            if metrics is not None and self.frontends is not None:
                metrics.extra = self.frontends.metrics
        elif settings.allow_grpc:
            server = await self._start_grpc(core)
        if settings.allow_grpc and server is None and self.frontends is None:
            if metrics is not None:
                await metrics.stop()
            return 1
        # With frontend processes they serve the HTTP port too (self.http_port set then).
        http = HttpDoor(core) if settings.allow_http and self.frontends is None else None
        local: LocalFrontend | None = None
        try:
            if http is not None:
                try:
                    self.http_port = await http.start(settings.http_address, settings.http_port)
                except OSError as exc:
                    log.error("cannot listen for HTTP on %s:%d: %s", settings.http_address,
                              settings.http_port, exc)
                    raise
                log.info("Started HTTPService at %s:%d", settings.http_address, self.http_port)
            try:
                local = await self._start_local(core)
            except OSError as exc:
                log.error("cannot start the local channel: %s", exc)
                raise
        except OSError:
            if http is not None:
                await http.stop()
            if server is not None:
                await server.stop(0)
            if self.frontends is not None:
                await self.frontends.stop(5.0)
            if self._core_http is not None:
                await self._core_http.stop()
            if metrics is not None:
                await metrics.stop()
            return 1
        for name in ("SIGTERM", "SIGINT", "SIGHUP"):
            loop.add_signal_handler(getattr(signal, name), self._signals.put_nowait, name)
        if settings.lifeline_fd is not None:
            watch_lifeline(loop, settings.lifeline_fd, self._signals)
        bls_address = (settings.grpc_address if is_unix_address(settings.grpc_address)
                       else f"{settings.grpc_address}:{self.bound_port or settings.grpc_port}")
        bls = BlsDoor(core, bls_address,
                      ring_bytes=settings.local_ring_bytes, stall_secs=settings.local_stall_secs,
                      direct_rings=max(1, settings.local_direct_rings),
                      direct_ring_bytes=settings.local_direct_ring_bytes)
        WorkerProcess.bls_door = bls.adopt
        try:
            failed = await models.load_startup_models()
            if failed and settings.exit_on_error:
                # tritonserver: "failed to load all models", then exit.
                log.error("exiting: %d model(s) failed to load at start-up (%s); "
                          "--exit-on-error=false serves the others", len(failed),
                          ", ".join(failed))
                return 1
            grpc_at = (settings.grpc_address
                       if server is not None and is_unix_address(settings.grpc_address)
                       else self.bound_port)
            ports = ", ".join(f"{door} {port}" for door, port in
                              (("gRPC", grpc_at), ("HTTP", self.http_port))
                              if port is not None)
            systemd.notify(f"READY=1\nSTATUS=serving on {ports or 'the local channel'}\n"
                           f"MAINPID={self.pid}")
            log.info("shmserve ready: %d model(s)%s", models.ready_count(),
                     f"; {len(failed)} failed to load" if failed else "")
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
            await self._shutdown(core, server, http, local)
            heap.stop()
            WorkerProcess.bls_door = None
            await bls.stop()
            if metrics is not None:
                await metrics.stop()
        return 0

    async def _start_frontends(self, core: Core, count: int) -> bool:
        """gRPC served by ``count`` frontend processes; this process's door only runs the
        calls they forward."""
        settings = self.settings
        service = InferenceService(core)

        async def forward(call: RpcCall) -> bytes:
            return await service.run_forwarded(call.rpc, call.request, call.client_id)

        core_http = ""
        if settings.allow_http:
            self._core_http = CoreHttp(core)
            core_http = await self._core_http.start()
        self.frontends = FrontendPool(core, settings, count, forward, core_http)
        try:
            self.bound_port = await self.frontends.start()
        except OSError as exc:
            log.error("cannot listen on %s:%d%s: %s", settings.grpc_address,
                      settings.grpc_port, f" or {settings.http_address}:{settings.http_port}"
                      if core_http else "", exc)
            if self._core_http is not None:
                await self._core_http.stop()
            return False
        log.info("Started GRPCInferenceService at %s:%d (%d frontend processes)",
                 settings.grpc_address, self.bound_port, count)
        if core_http:
            self.http_port = self.frontends.http_port
            log.info("Started HTTPService at %s:%d (%d frontend processes)",
                     settings.http_address, self.http_port, count)
        return True

    async def _start_grpc(self, core: Core) -> grpc.aio.Server | None:
        settings = self.settings
        server = grpc_server(settings, reuse_port=settings.reuse_grpc_port)
        service = InferenceService(core)
        server.add_generic_rpc_handlers(generic_handlers(service))
        unix = is_unix_address(settings.grpc_address)
        address = (settings.grpc_address if unix
                   else f"{settings.grpc_address}:{settings.grpc_port}")
        try:
            bound = add_port(server, address, server_credentials(settings))
        except TlsError as exc:
            log.error("%s", exc)
            return None
        except RuntimeError as exc:
            log.error("cannot listen on %s: %s", address, exc)
            return None
        await server.start()
        if unix:
            log.info("Started GRPCInferenceService at %s", address)
        else:
            self.bound_port = bound
            log.info("Started GRPCInferenceService at %s:%d", settings.grpc_address, bound)
        return server

    async def _start_local(self, core: Core) -> LocalFrontend | None:
        path = self.settings.local_socket
        if path == "none":
            return None
        # Without gRPC the socket is still named after the configured gRPC port.
        grpc_port = self.bound_port if self.bound_port is not None else self.settings.grpc_port
        if path:
            if writable_by_others(os.path.dirname(os.path.abspath(path))):
                log.warning("the local socket %s is in a directory other users can write; "
                            "clients of other users will refuse it (see docs/security.md)",
                            path)
        else:
            directory, mode = server_socket_dir()
            prepare_socket_dir(directory, mode)
            path = os.path.join(directory, socket_name(grpc_port))
        grpc_host = self.settings.grpc_address
        grpc_host = "127.0.0.1" if grpc_host in ("0.0.0.0", "::", "[::]") else grpc_host
        grpc_target = grpc_host if is_unix_address(grpc_host) else f"{grpc_host}:{grpc_port}"
        settings = self.settings
        local = LocalFrontend(core, path, grpc_target,
                              ring_bytes=settings.local_ring_bytes,
                              stall_secs=settings.local_stall_secs,
                              direct_rings=settings.local_direct_rings,
                              direct_ring_bytes=settings.local_direct_ring_bytes)
        await local.start()
        return local

    async def _shutdown(self, core: Core, server: grpc.aio.Server | None,
                        http: HttpDoor | None, local: LocalFrontend | None) -> None:
        # One budget for everything: drain, then stop the workers (killing one still
        # executing), then close the servers; within systemd's TimeoutStopSec.
        budget = TimeBudget(self.settings.exit_timeout_secs)
        systemd.notify("STOPPING=1")
        core.exiting = True
        await core.drain(budget.for_draining())
        if local is not None:
            await local.stop()
        await core.models.shutdown(budget)
        await core.tracer.close()
        if http is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(http.stop(), max(0.1, budget.left()))
        if server is not None:
            await server.stop(grace=min(1.0, budget.left()))
        if self.frontends is not None:  # drained: each frontend stops its server and exits
            await self.frontends.stop(max(1.0, budget.left()))
        if self._core_http is not None:
            await self._core_http.stop()
        remove_arenas(self.pid)
        log.info("shmserve stopped")

    async def _rescan(self, models: ModelManager) -> None:
        """Follow the repository: load added and changed models, unload removed ones.

        Poll mode runs this every --repository-poll-secs; SIGHUP runs it in none and poll
        mode. In explicit mode models change only through RepositoryModelLoad/Unload
        (Triton: "polling is disabled"), so SIGHUP does nothing there. Failures are logged
        and retried at the next scan (Triton reverts the model's timestamp on a failed
        load); a failed reload keeps the old version serving.
        """
        from shmserve.daemon.errors import ServeError

        if self.settings.model_control_mode == "explicit":
            log.info("repository rescan ignored: model control mode is explicit; use "
                     "RepositoryModelLoad / RepositoryModelUnload")
            return
        removed = models.removed_models()
        changed = [name for name in models.repository_models() if models.changed(name)]
        if not removed and not changed:
            return
        log.info("repository changed: loading %s, unloading %s", changed or "nothing",
                 removed or "nothing")

        async def unload(name: str) -> None:
            await models.unload(name)
            models.forget(name)

        results = await asyncio.gather(*(unload(name) for name in removed),
                                       *(models.load(name) for name in changed),
                                       return_exceptions=True)
        for name, result in zip(removed + changed, results, strict=True):
            # A ServeError was logged, with its reason, where the load failed.
            if isinstance(result, BaseException) and not isinstance(result, ServeError):
                log.error("model '%s' failed to update", name, exc_info=result)

    async def _poll(self, models: ModelManager) -> None:
        """Poll mode: rescan every --repository-poll-secs. A scan in progress when the
        server shuts down is allowed to finish (shielded), so no load is cut in half."""
        interval = max(self.settings.repository_poll_secs, 0.05)
        while True:
            await asyncio.sleep(interval)
            scan = asyncio.ensure_future(self._rescan(models))
            try:
                await asyncio.shield(scan)
            except asyncio.CancelledError:
                with contextlib.suppress(Exception):
                    await scan
                raise
            except Exception:
                log.exception("repository poll failed")
