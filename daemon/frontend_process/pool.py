"""The supervisor's frontend processes (``--grpc-frontends N``, N > 1): start, watch, restart,
stop.

Each process is forked from the fork server (a clean interpreter: no gRPC threads, no CUDA)
with one end of a socketpair, on which the supervisor opens its privileged channel
(daemon/frontend/frontend_link.py). All of them listen on the gRPC port with SO_REUSEPORT,
so the kernel spreads connections between them; the supervisor holds a bound (not listening)
socket on the port the whole time, so port 0 resolves once and a restarted frontend finds
its port again. A frontend that dies is started again (at once if it had served a while,
else after a back-off); only its own requests in flight fail, when its channel closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess

from shmserve.daemon.core import Core
from shmserve.daemon.frontend.frontend_link import Forward, FrontendChannel, FrontendLinks
from shmserve.daemon.frontend_process.main import FrontendSpec, run_frontend
from shmserve.daemon.frontend_process.records import FrontendReady
from shmserve.daemon.settings import Settings
from shmserve.daemon.worker_process import fork_context

log = logging.getLogger("shmserve.frontends")

START_TIMEOUT_SECS = 60.0
QUICK_DEATH_SECS = 5.0       # died sooner after starting: restart after a back-off
MAX_BACKOFF_SECS = 5.0


def frontend_count(configured: int) -> int:
    """--grpc-frontends: as given, or (0) one per four cores, at least 1 and at most 8."""
    if configured > 0:
        return configured
    return max(1, min(8, len(os.sched_getaffinity(0)) // 4))


@dataclass(eq=False)
class _Frontend:
    index: int
    pid: int | None = None
    process: BaseProcess | None = None
    channel: FrontendChannel | None = None
    ready: asyncio.Future[None] | None = None
    started_at: float = 0.0
    served_before: int = 0   # requests of its earlier processes
    restarts: int = 0
    backoff: float = 0.0
    exited: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def served(self) -> int:
        return self.served_before + (self.channel.requests if self.channel is not None else 0)


def reserve_port(host: str, port: int) -> socket.socket:
    """A bound, not listening, socket on the gRPC address: fixes the port. Bound before it
    allows SO_REUSEPORT, so a port some other server listens on (even with SO_REUSEPORT)
    is refused rather than shared; the frontends' sockets join it afterwards."""
    host = host.strip("[]")
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    except BaseException:
        sock.close()
        raise
    return sock


class FrontendPool:
    def __init__(self, core: Core, settings: Settings, count: int, forward: Forward,
                 core_http: str = "") -> None:
        """``core_http``: the core's HTTP door (a Unix socket); given, the frontends serve
        the HTTP port too, proxying all but inference to it."""
        self._settings = settings
        self._core_http = core_http
        self._links = FrontendLinks(core, forward, "", ring_bytes=settings.local_ring_bytes,
                                    stall_secs=settings.local_stall_secs,
                                    direct_rings=max(1, settings.local_direct_rings),
                                    direct_ring_bytes=settings.local_direct_ring_bytes)
        self._links.ready_callback = self._ready
        self._frontends = [_Frontend(index) for index in range(count)]
        self._reserved: list[socket.socket] = []
        self._address = ""
        self._stopping = False
        self._restarts: set[asyncio.Task[None]] = set()
        self.port = 0
        self.http_port = 0

    # --- start --------------------------------------------------------------------------
    async def start(self) -> int:
        """Start every frontend and wait until each serves; the port. Raises OSError."""
        settings = self._settings
        self._reserved.append(reserve_port(settings.grpc_address, settings.grpc_port))
        self.port = int(self._reserved[0].getsockname()[1])
        self._address = f"{settings.grpc_address}:{self.port}"
        if self._core_http:
            try:
                self._reserved.append(reserve_port(settings.http_address, settings.http_port))
            except OSError:
                self._reserved.pop().close()
                raise
            self.http_port = int(self._reserved[1].getsockname()[1])
        try:
            await asyncio.gather(*(self._start(frontend) for frontend in self._frontends))
        except BaseException:
            await self.stop(5.0)
            raise
        return self.port

    async def _start(self, frontend: _Frontend) -> None:
        loop = asyncio.get_running_loop()
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        spec = FrontendSpec(frontend.index, self._address, self._settings,
                            self._settings.http_address if self._core_http else "",
                            self.http_port, self._core_http)
        process = fork_context().Process(target=run_frontend, args=(child, spec),
                                         name=f"shmserve-frontend-{frontend.index}",
                                         daemon=True)
        try:
            await loop.run_in_executor(None, process.start)
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        frontend.process = process
        frontend.pid = process.pid
        frontend.started_at = time.monotonic()
        frontend.exited = asyncio.Event()
        frontend.ready = loop.create_future()
        loop.add_reader(process.sentinel, self._on_exit, frontend, process)
        try:
            channel = await self._links.open_channel(parent)
        except OSError:
            parent.close()
            channel = None
        assert channel is None or isinstance(channel, FrontendChannel)
        frontend.channel = channel
        done, _ = await asyncio.wait([frontend.ready], timeout=START_TIMEOUT_SECS)
        if not done or frontend.ready.exception() is not None:
            error = frontend.ready.exception() if done else None
            self._kill(frontend)
            raise OSError(f"gRPC frontend {frontend.index} did not start serving "
                          f"{self._address}: {error or 'timed out'}")
        log.info("gRPC frontend %d (pid %d) serving %s", frontend.index, frontend.pid,
                 self._address)

    def _ready(self, channel: FrontendChannel, ready: FrontendReady) -> None:
        for frontend in self._frontends:
            if frontend.channel is channel and frontend.ready is not None \
                    and not frontend.ready.done():
                frontend.ready.set_result(None)

    # --- death and restart --------------------------------------------------------------
    def _on_exit(self, frontend: _Frontend, process: BaseProcess) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(process.sentinel)
        process.join(0)
        if process is not frontend.process:
            return  # an earlier process of this frontend (killed after a failed start)
        code = process.exitcode
        frontend.exited.set()
        if frontend.channel is not None:
            frontend.served_before += frontend.channel.requests
            frontend.channel.close()  # its requests in flight fail (their caller is gone)
            frontend.channel = None
        if frontend.ready is not None and not frontend.ready.done():
            frontend.ready.set_exception(OSError(f"it exited ({_exit_text(code)})"))
            frontend.ready.exception()  # retrieved: the starter may have given up waiting
            return  # a failed start: the starter reports it
        if self._stopping:
            return
        lived = time.monotonic() - frontend.started_at
        frontend.backoff = 0.0 if lived >= QUICK_DEATH_SECS else \
            min(MAX_BACKOFF_SECS, max(0.1, frontend.backoff * 2))
        log.warning("gRPC frontend %d (pid %s) %s; restarting it%s", frontend.index,
                    frontend.pid, _exit_text(code),
                    f" in {frontend.backoff:.1f}s" if frontend.backoff else "")
        task = loop.create_task(self._restart(frontend))
        self._restarts.add(task)
        task.add_done_callback(self._restarts.discard)

    async def _restart(self, frontend: _Frontend) -> None:
        while True:
            await asyncio.sleep(frontend.backoff)
            if self._stopping:
                return
            frontend.restarts += 1
            try:
                await self._start(frontend)
                return
            except OSError as exc:
                log.error("%s", exc)
                frontend.backoff = min(MAX_BACKOFF_SECS, max(0.1, frontend.backoff * 2))

    def _kill(self, frontend: _Frontend) -> None:
        if frontend.pid is not None and not frontend.exited.is_set():
            with contextlib.suppress(ProcessLookupError):
                os.kill(frontend.pid, signal.SIGKILL)

    # --- stop ---------------------------------------------------------------------------
    async def stop(self, timeout: float) -> None:
        """Close every frontend's channel (each stops its server and exits); kill what is
        left after ``timeout``."""
        self._stopping = True
        for task in list(self._restarts):
            task.cancel()
        for frontend in self._frontends:
            if frontend.channel is not None:
                frontend.channel.close()
        waiting = [f.exited.wait() for f in self._frontends
                   if f.process is not None and not f.exited.is_set()]
        if waiting:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*waiting), max(0.1, timeout))
        for frontend in self._frontends:
            if frontend.process is not None and not frontend.exited.is_set():
                log.warning("gRPC frontend %d did not stop; killing it", frontend.index)
                self._kill(frontend)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(frontend.exited.wait(), 5.0)
        await self._links.stop()
        for reserved in self._reserved:
            reserved.close()
        self._reserved.clear()

    # --- counters -----------------------------------------------------------------------
    def metrics(self) -> list[str]:
        lines = ["# HELP shmserve_frontend_requests_total Calls each frontend process "
                 "forwarded to the core (inference, gRPC or HTTP, and other gRPC calls)",
                 "# TYPE shmserve_frontend_requests_total counter"]
        lines += [f'shmserve_frontend_requests_total{{frontend="{f.index}"}} {f.served}'
                  for f in self._frontends]
        lines += ["# HELP shmserve_frontend_restarts_total Times a gRPC frontend process was "
                  "started again after it died",
                  "# TYPE shmserve_frontend_restarts_total counter"]
        lines += [f'shmserve_frontend_restarts_total{{frontend="{f.index}"}} {f.restarts}'
                  for f in self._frontends]
        lines += ["# HELP shmserve_frontend_pid The process id of each gRPC frontend",
                  "# TYPE shmserve_frontend_pid gauge"]
        lines += [f'shmserve_frontend_pid{{frontend="{f.index}"}} {f.pid or 0}'
                  for f in self._frontends]
        return lines


def _exit_text(code: int | None) -> str:
    if code is None:
        return "exited"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
    return f"exited with status {code}"
