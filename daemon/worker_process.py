"""The supervisor's handle on one worker process: start, control channel, death, heartbeat.

Workers are started through the stdlib multiprocessing forkserver (a fresh interpreter that
preloads numpy and the worker modules), so they never inherit the supervisor's gRPC threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import multiprocessing
import multiprocessing.context
import os
import signal
import socket
import time
from collections.abc import Callable
from typing import Any

from shmserve.daemon.errors import ServeError, internal, unavailable
from shmserve.workers import protocol
from shmserve.workers.protocol import region_fd_tag
from shmserve.workers.shm import remove_owner_arenas

log = logging.getLogger("shmserve.supervisor")

_PRELOAD = ["shmserve.workers.forkserver_setup", "shmserve.workers.main",
            "shmserve.workers.backends.python", "numpy"]
_context: multiprocessing.context.ForkServerContext | None = None
DoneCallback = Callable[["protocol.Done | BaseException"], None]


def start_fork_server() -> None:
    """Start the fork server now, before gRPC exists, so workers fork from a clean process."""
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(_PRELOAD)
        from multiprocessing import forkserver
        forkserver.ensure_running()


def fork_context() -> multiprocessing.context.ForkServerContext:
    start_fork_server()
    assert _context is not None
    return _context


class _ControlProtocol(asyncio.Protocol):
    def __init__(self, owner: WorkerProcess) -> None:
        self._owner = owner
        self._unpacker = protocol.new_unpacker()

    def data_received(self, data: bytes) -> None:
        self._unpacker.feed(data)
        for frame in self._unpacker:
            self._owner.on_frame(frame)

    def connection_lost(self, exc: Exception | None) -> None:
        self._owner.on_channel_closed()


class WorkerProcess:
    _batch_ids = itertools.count(1)

    def __init__(self, spec: protocol.WorkerSpec, label: str,
                 on_exit: Callable[[WorkerProcess, str], None]) -> None:
        self.spec = spec
        self.label = label
        self._on_exit = on_exit
        self._process: multiprocessing.process.BaseProcess | None = None
        self._transport: asyncio.Transport | None = None
        self._ready: asyncio.Future[protocol.Ready] | None = None
        self._inflight: dict[int, DoneCallback] = {}
        self._exited = False
        self._stopping = False
        self._last_pong = time.monotonic()
        self._heartbeat: asyncio.Task[None] | None = None
        self._fd_socket: socket.socket | None = None
        self._shared_regions: set[int] = set()  # memfd regions whose fd the worker has
        self.pid: int | None = None

    # --- lifecycle ----------------------------------------------------------------------
    async def start(self, heartbeat_secs: float, hang_secs: float) -> None:
        """Start the process and wait until its initialize hooks finished (or failed)."""
        loop = asyncio.get_running_loop()
        parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        # Local-channel fds for direct answers travel on their own socket, so the control
        # socket's hot path stays plain recv().
        fd_parent, fd_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        fd_parent.setblocking(False)
        self._fd_socket = fd_parent
        from shmserve.workers.main import run_worker
        process = fork_context().Process(target=run_worker,
                                         args=(child_sock, self.spec, fd_child),
                                         name=f"shmserve-worker-{self.label}", daemon=True)
        self._ready = loop.create_future()
        try:
            await loop.run_in_executor(None, process.start)
        except BaseException:
            parent_sock.close()
            fd_parent.close()
            raise
        finally:
            child_sock.close()
            fd_child.close()
        self._process = process
        self.pid = process.pid
        parent_sock.setblocking(False)
        transport, _ = await loop.create_unix_connection(lambda: _ControlProtocol(self),
                                                         sock=parent_sock)
        self._transport = transport
        loop.add_reader(process.sentinel, self._on_sentinel)
        try:
            await self._ready
        except BaseException:
            await self.wait_exit(5.0)
            raise
        self._heartbeat = loop.create_task(self._watch(heartbeat_secs, hang_secs))

    async def stop(self, timeout: float) -> None:
        """Ask the worker to finalize and exit; kill it if it does not within ``timeout``."""
        if self._exited:
            return
        self._stopping = True
        self._send(protocol.STOP_FRAME)
        if not await self.wait_exit(timeout):
            log.warning("worker %s did not stop in %.1fs; killing it", self.label, timeout)
            self.kill()
            await self.wait_exit(5.0)

    def kill(self) -> None:
        if self.pid is not None and not self._exited:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)

    async def wait_exit(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self._exited and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return self._exited

    @property
    def became_ready(self) -> bool:
        return self._ready is not None and self._ready.done() and not self._ready.cancelled() \
            and self._ready.exception() is None

    @property
    def alive(self) -> bool:
        return not self._exited and self._ready is not None and self._ready.done() \
            and not self._ready.exception()

    # --- data path ----------------------------------------------------------------------
    def execute(self, requests: list[list[Any]], lane: int, each: bool,
                on_done: DoneCallback) -> int:
        """Send one frame of requests and return its id: executed as one batch, or ``each``
        on its own, with outputs in the arena of ``lane``. ``on_done`` gets the worker's
        DONE frame, or the error that ended the worker. It is called directly from the
        channel's reader (no future, no extra loop iteration): this is the hot path."""
        batch_id = next(self._batch_ids)
        if self._exited:
            on_done(self._death_error("exited"))
            return batch_id
        self._inflight[batch_id] = on_done
        # protocol.Exec(batch_id, requests, lane, each).pack(), without the object
        self._send([protocol.EXEC, batch_id, requests, lane, each])
        return batch_id

    def withdraw(self, batch_id: int, index: int) -> None:
        """The caller of request ``index`` of a sent batch gave up: the worker skips it unless
        it already started (it still answers for it, so its regions stay pinned till then)."""
        if batch_id in self._inflight:
            self._send(protocol.Cancel(batch_id, index).pack())

    def attach_channel(self, channel_id: int, memfd: int, client_socket: int,
                       ring_base: int, ring_capacity: int) -> bool:
        """Let the worker answer this local channel's requests itself into the direct ring
        at ``ring_base`` (see workers/direct_answers.py); False if that cannot be done now."""
        if not self.alive or self._fd_socket is None:
            return False
        try:
            socket.send_fds(self._fd_socket, [str(channel_id).encode()], [memfd, client_socket])
        except OSError:  # full (the worker is busy for long) or gone: answer the usual way
            return False
        self._send(protocol.Attach(channel_id, ring_base, ring_capacity).pack())
        return True

    def share_region_fd(self, region_id: int, fd: int) -> bool:
        """Give the worker its own duplicate of a memfd region's fd (once per region); False if
        that cannot be done now.

        Passed over the fd socket (SCM_RIGHTS) rather than opened by the worker as
        /proc/<supervisor>/fd/<n>: that open is checked against the memfd's mode and owner,
        which the client chose (another uid when the server runs as its own user), and needs
        /proc access to the supervisor (ptrace rules, hidepid, a non-dumpable process); a
        passed fd needs none of that, and the worker holds the file itself, whatever the
        supervisor closes later.
        """
        if region_id in self._shared_regions:
            return True
        if not self.alive or self._fd_socket is None:
            return False
        try:
            socket.send_fds(self._fd_socket, [region_fd_tag(region_id)], [fd])
        except OSError:  # full (the worker is busy for long) or gone
            return False
        self._send(protocol.ShareRegion(region_id).pack())
        self._shared_regions.add(region_id)
        return True

    def detach_channel(self, channel_id: int) -> None:
        if not self._exited:
            self._send(protocol.Detach(channel_id).pack())

    def release_regions(self, region_ids: list[int]) -> None:
        self._shared_regions.difference_update(region_ids)
        if not self._exited:
            self._send(protocol.Release(region_ids).pack())

    def _send(self, frame: list[Any]) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(protocol.encode(frame))

    # --- events from the worker ---------------------------------------------------------
    def on_frame(self, frame: list[Any]) -> None:
        kind = frame[0]
        if kind == protocol.DONE:
            done = protocol.Done.unpack(frame)
            on_done = self._inflight.pop(done.batch, None)
            if on_done is not None:
                _settle(on_done, done)
        elif kind == protocol.PONG:
            self._last_pong = time.monotonic()
        elif kind in (protocol.READY, protocol.INIT_FAILED):
            self._on_handshake(frame)

    def _on_handshake(self, frame: list[Any]) -> None:
        """READY or INIT_FAILED: the first frame, naming the worker's protocol version."""
        if self._ready is None or self._ready.done():
            return
        try:
            protocol.check_version(frame[1], f"worker {self.label}")
        except protocol.ProtocolMismatch as exc:
            log.error("%s", exc)
            self._ready.set_exception(internal(str(exc)))
            self.kill()
            return
        if frame[0] == protocol.READY:
            self._ready.set_result(protocol.Ready.unpack(frame))
        else:
            failed = protocol.InitFailed.unpack(frame)
            self._ready.set_exception(ServeError.from_tuple((failed.code, failed.message)))

    def on_channel_closed(self) -> None:
        # EOF usually comes a moment before the exit status: give the sentinel a short while
        # to report why (signal, exit code), then fail in-flight work regardless.
        asyncio.get_running_loop().call_later(0.5, self._fail_inflight,
                                              "closed its control channel")

    def _on_sentinel(self) -> None:
        assert self._process is not None
        asyncio.get_running_loop().remove_reader(self._process.sentinel)
        self._process.join(0)
        code = self._process.exitcode
        self._exited = True
        if code is not None and code < 0:
            reason = f"was killed by signal {signal.Signals(-code).name}"
        else:
            reason = f"exited with code {code}"
        self._fail_inflight(reason)
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(unavailable(f"worker {self.label} {reason} while "
                                                  f"initializing"))
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        if self._transport is not None:
            self._transport.close()
        if self._fd_socket is not None:
            self._fd_socket.close()
        spec = self.spec
        for lane in range(spec.lanes):
            remove_owner_arenas(spec.supervisor_pid, f"{spec.arena_owner}o{lane}")
        with contextlib.suppress(ValueError):
            self._process.close()
        if not self._stopping and self.became_ready:
            log.error("worker %s (pid %s) %s", self.label, self.pid, reason)
        self._on_exit(self, reason)

    def _death_error(self, reason: str) -> ServeError:
        return unavailable(f"worker for model instance '{self.label}' {reason} while "
                           f"executing the request; the instance is being restarted")

    def _fail_inflight(self, reason: str) -> None:
        inflight, self._inflight = self._inflight, {}
        for on_done in inflight.values():
            _settle(on_done, self._death_error(reason))

    async def _watch(self, interval: float, hang_secs: float) -> None:
        """Heartbeat: the worker sends a pong every interval from its own thread; a worker
        silent for ``hang_secs`` is hung (its interpreter makes no progress) and is killed."""
        self._last_pong = time.monotonic()
        while not self._exited:
            await asyncio.sleep(interval)
            if time.monotonic() - self._last_pong > hang_secs:
                log.error("worker %s sent no heartbeat for %.0fs; killing it",
                          self.label, hang_secs)
                self.kill()
                return


def _settle(on_done: DoneCallback, result: protocol.Done | BaseException) -> None:
    """A failing callback must not stop the reader from handling the frames after it."""
    try:
        on_done(result)
    except Exception:
        log.exception("handling a worker's answer failed")
