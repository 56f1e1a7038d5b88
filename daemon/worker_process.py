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
from typing import Any, ClassVar

from shmserve.daemon.errors import ServeError, internal, unavailable
from shmserve.daemon.worker_limits import SUSPECT_SHARE, WorkerLimits
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
    #: Takes the supervisor's end of each new worker's BLS socket (daemon/frontend/bls.py);
    #: set by the supervisor. None: workers get no BLS socket (BLS calls fail UNAVAILABLE).
    bls_door: ClassVar[Callable[[socket.socket], None] | None] = None

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
        self._stage = "worker start"        # the initialize hook running, while initializing
        self._execution_timeout = 0.0
        self._head_since = 0.0              # when the oldest batch in flight began executing
        self._kill_reason: str | None = None  # why the supervisor killed it, if it did
        self.unresponsive = False           # heartbeat late: not serving, about to be killed
        # Decoupled models' responses (Partial frames) go here (set by the dispatcher).
        self.on_partial: Callable[[list[Any]], None] | None = None
        self.report: protocol.Report | None = None  # the model's last word on itself
        self.pid: int | None = None
        self.concurrency = 1                # frames it takes at once (its Ready says)

    # --- lifecycle ----------------------------------------------------------------------
    async def start(self, limits: WorkerLimits) -> None:
        """Start the process and wait until its initialize hooks finished (or failed, or
        overran ``limits.init_timeout_secs``: then it is killed and the error names the
        stage)."""
        loop = asyncio.get_running_loop()
        parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        # Local-channel fds for direct answers travel on their own socket, so the control
        # socket's hot path stays plain recv().
        fd_parent, fd_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        fd_parent.setblocking(False)
        self._fd_socket = fd_parent
        door = WorkerProcess.bls_door
        bls_parent, bls_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM) \
            if door is not None else (None, None)
        from shmserve.workers.main import run_worker
        process = fork_context().Process(target=run_worker,
                                         args=(child_sock, self.spec, fd_child, bls_child),
                                         name=f"shmserve-worker-{self.label}", daemon=True)
        self._ready = loop.create_future()
        try:
            await loop.run_in_executor(None, process.start)
        except BaseException:
            parent_sock.close()
            fd_parent.close()
            if bls_parent is not None:
                bls_parent.close()
            raise
        finally:
            child_sock.close()
            fd_child.close()
            if bls_child is not None:
                bls_child.close()
        if door is not None and bls_parent is not None:
            door(bls_parent)
        self._process = process
        self.pid = process.pid
        parent_sock.setblocking(False)
        transport, _ = await loop.create_unix_connection(lambda: _ControlProtocol(self),
                                                         sock=parent_sock)
        self._transport = transport
        loop.add_reader(process.sentinel, self._on_sentinel)
        ready = self._ready
        try:
            await asyncio.wait_for(asyncio.shield(ready), limits.init_timeout_secs or None)
        except TimeoutError:
            error = unavailable(
                f"worker for model instance '{self.label}' did not finish initializing within "
                f"the initialization timeout of {limits.init_timeout_secs:g}s (stuck in "
                f"{self._stage}); it was killed")
            if not ready.done():
                ready.set_exception(error)
                ready.exception()  # retrieved here: raised below
            self._kill_reason = "was killed after the initialization timeout"
            self.kill()
            await self.wait_exit(5.0)
            raise error from None
        except BaseException:
            await self.wait_exit(5.0)
            raise
        self._execution_timeout = limits.execution_timeout_secs
        self._heartbeat = loop.create_task(self._watch(limits))

    async def stop(self, timeout: float) -> None:
        """Ask the worker to finalize and exit; kill it if it does not within ``timeout``."""
        if self._exited:
            return
        self._stopping = True
        self._send(protocol.STOP_FRAME)
        if not await self.wait_exit(timeout):
            log.warning("worker %s did not stop in %.1fs; killing it", self.label, timeout)
            self._kill_reason = f"was killed when it did not stop within {timeout:.1f}s"
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
        if self._execution_timeout and not self._inflight:
            self._head_since = time.monotonic()
        self._inflight[batch_id] = on_done
        # protocol.Exec(batch_id, requests, lane, each).pack(), without the object
        self._send([protocol.EXEC, batch_id, requests, lane, each])
        return batch_id

    def withdraw(self, batch_id: int, index: int, streaming: bool = False) -> None:
        """The caller of request ``index`` of a sent batch gave up: the worker skips it unless
        it already started (it still answers for it, so its regions stay pinned till then).
        A decoupled request (``streaming``) is cancelled for its model even after its frame
        was answered."""
        if batch_id in self._inflight or (streaming and not self._exited):
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

    def trim_arenas(self) -> None:
        """The instance is idle: it shrinks its grown output arenas and unmaps ours."""
        if not self._exited:
            self._send(protocol.TRIM_FRAME)

    def follow_log(self, switches: list[Any]) -> None:
        """The server's log settings changed (packed LogSwitches)."""
        if not self._exited:
            self._send(switches)

    def end_sequences(self, correlation_ids: list[int | str]) -> None:
        """The supervisor ended these sequences (idle): the worker drops their state."""
        if not self._exited:
            self._send(protocol.EndSequences(correlation_ids).pack())

    def _send(self, frame: list[Any]) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(protocol.encode(frame))

    # --- events from the worker ---------------------------------------------------------
    def on_frame(self, frame: list[Any]) -> None:
        kind = frame[0]
        if kind == protocol.DONE:
            done = protocol.Done.unpack(frame)
            on_done = self._inflight.pop(done.batch, None)
            if self._execution_timeout and self._inflight:
                self._head_since = time.monotonic()  # the next batch starts now
            if on_done is not None:
                _settle(on_done, done)
        elif kind == protocol.PARTIAL:
            if self.on_partial is not None:
                try:
                    self.on_partial(frame)
                except Exception:
                    log.exception("handling a worker's partial response failed")
        elif kind == protocol.PONG:
            self._last_pong = time.monotonic()
            if self.unresponsive:
                self.unresponsive = False
                log.warning("worker %s answers its heartbeat again", self.label)
        elif kind in (protocol.READY, protocol.INIT_FAILED):
            self._on_handshake(frame)
        elif kind == protocol.STAGE:
            self._stage = protocol.Stage.unpack(frame).name
        elif kind == protocol.REPORT:
            self.report = protocol.Report.unpack(frame)

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
            ready = protocol.Ready.unpack(frame)
            self.concurrency = max(1, int(ready.concurrency))
            self._ready.set_result(ready)
        else:
            failed = protocol.InitFailed.unpack(frame)
            self._ready.set_exception(ServeError.from_tuple((failed.code, failed.message)))

    def on_channel_closed(self) -> None:
        # EOF usually comes a moment before the exit status: give the sentinel a short while
        # to report why (signal, exit code), then fail in-flight work regardless.
        asyncio.get_running_loop().call_later(0.5, self._fail_inflight,
                                              self._kill_reason or "closed its control channel")

    def _on_sentinel(self) -> None:
        assert self._process is not None
        asyncio.get_running_loop().remove_reader(self._process.sentinel)
        self._process.join(0)
        code = self._process.exitcode
        self._exited = True
        if self._kill_reason is not None:
            reason = self._kill_reason
        elif code is not None and code < 0:
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
        for lane in range(max(spec.lanes, self.concurrency)):
            remove_owner_arenas(spec.supervisor_pid, f"{spec.arena_owner}o{lane}")
        with contextlib.suppress(ValueError):
            self._process.close()
        if not self._stopping and self.became_ready:
            log.error("worker %s (pid %s) %s", self.label, self.pid, reason)
        self._on_exit(self, reason)

    def _death_error(self, reason: str) -> ServeError:
        then = ("the model is being unloaded" if self._stopping
                else "the instance is being restarted")
        return unavailable(f"worker for model instance '{self.label}' {reason} while "
                           f"executing the request; {then}")

    def _fail_inflight(self, reason: str) -> None:
        inflight, self._inflight = self._inflight, {}
        for on_done in inflight.values():
            _settle(on_done, self._death_error(reason))

    async def _watch(self, limits: WorkerLimits) -> None:
        """Heartbeat: the worker sends a pong every ``heartbeat_secs`` from its own thread;
        a worker silent for half the heartbeat timeout stops counting as serving, one silent
        for the whole timeout is hung (stopped, or its interpreter makes no progress) and is
        killed. A batch executing longer than the execution timeout is hung too: killed, so
        the instance is replaced and its requests fail."""
        self._last_pong = time.monotonic()
        timeout = limits.heartbeat_timeout_secs
        interval = limits.watch_interval
        while not self._exited:
            before = time.monotonic()
            await asyncio.sleep(interval)
            now = time.monotonic()
            if now - before > 2 * interval + 0.5:
                continue  # our own loop was stalled: the pongs it holds are read first
            silent = now - self._last_pong
            if silent > timeout:
                log.error("worker %s sent no heartbeat for %.1fs (timeout %gs); killing it",
                          self.label, silent, timeout)
                self._kill_reason = (f"was killed after sending no heartbeat for "
                                     f"{timeout:g}s")
                self.kill()
                return
            if silent > timeout * SUSPECT_SHARE and not self.unresponsive:
                self.unresponsive = True
                log.warning("worker %s sent no heartbeat for %.1fs; not ready until it does",
                            self.label, silent)
            limit = self._execution_timeout
            if limit and self._inflight and now - self._head_since > limit:
                log.error("worker %s executed a batch for more than the execution timeout of "
                          "%gs; killing it", self.label, limit)
                self._kill_reason = (f"was killed after a batch exceeded the execution "
                                     f"timeout of {limit:g}s")
                self.kill()
                return


def _settle(on_done: DoneCallback, result: protocol.Done | BaseException) -> None:
    """A failing callback must not stop the reader from handling the frames after it."""
    try:
        on_done(result)
    except Exception:
        log.exception("handling a worker's answer failed")
