"""The core's end of the frontend processes' channels (``--grpc-frontends N``).

A frontend process (daemon/frontend_process) is a privileged local-channel client: the
supervisor opens its channel on a socketpair made at the frontend's start, never on the
local socket, so only these channels accept the frontend operations
(daemon/frontend_process/records.py):

- ``items``: an inference request the frontend already parsed into ``RequestItems``, with
  regions named in the anonymous (gRPC) scope, submitted to the core as the in-process gRPC
  door would; answered like any local-channel request, by the worker directly when it can.
- ``rpc``: a non-inference gRPC call, run by the core's own gRPC door (injected as
  ``forward``: this door does not import another), so registration, model control,
  statistics, metadata and health answer the same whichever process took the call.
- ``ready``: the frontend serves its port.

Everything else (ping, cancel, hello) is the local channel's. Closing the channel (the
frontend died) cancels its requests in flight, as for any channel.
"""

from __future__ import annotations

import asyncio
import logging
import mmap
import os
from collections.abc import Awaitable, Callable
from typing import Any

from shmserve.daemon.core import Core
from shmserve.daemon.errors import ServeError, invalid_argument
from shmserve.daemon.frontend.local import LocalChannel, LocalFrontend, _ChannelReply
from shmserve.daemon.frontend.local_fds import FdDoor, register_memfd
from shmserve.daemon.frontend_process.records import (
    OP_ITEMS,
    OP_READY,
    OP_RPC,
    FrontendInfer,
    FrontendReady,
    RpcAnswer,
    RpcCall,
    ring_place,
)
from shmserve.daemon.frontend_process.spill import SPILL_BYTES, write_outputs_memfd
from shmserve.daemon.infer_request import RequestItems
from shmserve.daemon.request import InferRequest, OutputTensor
from shmserve.protos import local_messages as messages
from shmserve.protos.local_ring import ChannelLayout

log = logging.getLogger("shmserve.frontends")

#: Runs one forwarded call in the core's gRPC door: the serialized response, or ServeError.
Forward = Callable[[RpcCall], Awaitable[bytes]]
CATCH_UP_SECS = 2.0


class FrontendChannel(LocalChannel):
    """One frontend process's channel; counts the calls it forwarded."""

    links: FrontendLinks
    requests = 0  # inference and forwarded calls received
    spills = 0    # answers sent in a memfd (their fd tags)
    settled = 0   # inference requests answered, by us or (Done read) by a worker
    _catching_up: list[tuple[int, asyncio.Future[None]]] | None = None

    def settle(self, reply: _ChannelReply) -> bool:
        if not super().settle(reply):
            return False
        self._one_settled()
        return True

    def _one_settled(self) -> None:
        self.settled += 1
        waiting = self._catching_up
        if waiting:
            for entry in [e for e in waiting if e[0] <= self.settled]:
                waiting.remove(entry)
                if not entry[1].done():
                    entry[1].set_result(None)

    async def _caught_up(self, answered: int) -> None:
        """Until every answer the frontend had received is accounted for here (a direct
        answer's Done frame follows it by microseconds; the wait is bounded regardless)."""
        if self.settled >= answered:
            return
        future = asyncio.get_running_loop().create_future()
        if self._catching_up is None:
            self._catching_up = []
        entry = (answered, future)
        self._catching_up.append(entry)
        try:
            await asyncio.wait_for(future, CATCH_UP_SECS)
        except TimeoutError:
            pass
        finally:
            if entry in self._catching_up:
                self._catching_up.remove(entry)

    def _handle(self, message: dict[str, Any]) -> None:
        op = message["op"]
        if op == OP_ITEMS:
            self.requests += 1
            self._infer_items(message)
        elif op == OP_RPC:
            self.requests += 1
            self._forward(message)
        elif op == OP_READY:
            self.links.on_ready(self, FrontendReady.from_message(message))
            self._reply(messages.ok_reply(message["id"]))
        else:
            super()._handle(message)

    # The frontend renders answers itself: error and end replies carry the model version
    # a local client does not need (gRPC puts it in stream responses).
    def answer_error(self, reply: _ChannelReply, error: ServeError) -> None:
        if isinstance(reply, _FrontendReply):
            reply.drop_spill()
        if self.settle(reply):
            self._reply(_versioned(messages.error_reply(reply.request_id, error.code.name,
                                                        error.message), reply))

    def answer_end(self, reply: _ChannelReply) -> None:
        if self.settle(reply):
            self._reply(_versioned(messages.end_reply(reply.request_id, False), reply))

    def answer_more(self, reply: _ChannelReply, outputs: list[OutputTensor] | None,
                    error: ServeError | None) -> None:
        if error is None and outputs is not None and _payload(outputs) > SPILL_BYTES:
            if reply.request_id in self._inflight:
                message = self._spilled(reply, outputs)
                message["more"] = True
                self._reply(message)
        elif error is None and reply.request is not None and reply.request.ring is not None:
            if reply.request_id in self._inflight:
                message = messages.infer_reply(reply.request_id, str(reply.request.version),
                                               _ringed(reply.request, outputs or []))
                message["more"] = True
                self._reply(message)
        elif error is None:
            super().answer_more(reply, outputs, None)
        elif reply.request_id in self._inflight:
            message = _versioned(messages.error_reply(reply.request_id, error.code.name,
                                                      error.message), reply)
            message["more"] = True
            self._reply(message)

    def _infer_items(self, message: dict[str, Any]) -> None:
        request_id = message["id"]
        try:
            infer = FrontendInfer.from_message(message, self.owner)
        except (KeyError, TypeError, ValueError) as exc:
            self._one_settled()
            self._reply_error(request_id, invalid_argument(
                f"malformed frontend request: {exc}"))
            return
        reply = _FrontendReply(self, request_id)
        self._inflight[request_id] = reply  # it may be answered before submit returns
        core = self.links.core
        spill = ""
        try:
            if infer.spill is not None:
                # The request's large inputs: a private region for it alone, unregistered
                # at once (the request pins it until done).
                tag, size = infer.spill
                name = FrontendInfer.spill_name(tag)
                register_memfd(core, self._fd_door, self._region_prefix,
                               {"name": name, "fd": tag, "offset": 0, "byte_size": size},
                               self.owner)
                spill = self._region_prefix + name
            core.submit(infer.model, infer.version, _items_of(infer), reply, infer.streaming)
        except ServeError as exc:
            if self._inflight.pop(request_id, None) is not None:
                self._one_settled()
            self._reply_error(request_id, exc)
        except Exception as exc:
            if self._inflight.pop(request_id, None) is not None:
                self._one_settled()
            log.exception("frontend infer failed")
            self._reply(messages.error_reply(request_id, "INTERNAL",
                                             f"{type(exc).__name__}: {exc}"))
        finally:
            if spill:
                core.registry.unregister("system", spill, self.owner)

    # Outputs past SPILL_BYTES go back in a memfd (spill.py): a ring holds half its size.
    def answer(self, reply: _ChannelReply, outputs: list[OutputTensor]) -> None:
        if _payload(outputs) <= SPILL_BYTES:
            request = reply.request
            if request is None or request.ring is None:
                super().answer(reply, outputs)
            elif self.settle(reply):
                self._reply(messages.infer_reply(reply.request_id, str(request.version),
                                                 _ringed(request, outputs)))
        elif self.settle(reply):
            self._reply(self._spilled(reply, outputs))

    def _spilled(self, reply: _ChannelReply, outputs: list[OutputTensor]) -> dict[str, Any]:
        assert reply.request is not None
        prepared = reply.take_spill() if isinstance(reply, _FrontendReply) else None
        if self._fd_door is None:
            if prepared is not None:
                os.close(prepared[0])
            return messages.error_reply(reply.request_id, "INTERNAL", "no fd door")
        if prepared is None:  # not prepared on a thread: written here (smaller, or cached)
            fd, places = write_outputs_memfd("shmserve-frontend-out", outputs)
        else:
            fd, places = prepared
        try:
            self.spills += 1
            self._fd_door.give(fd, self.spills)
        except OSError as exc:
            return messages.error_reply(reply.request_id, "UNAVAILABLE",
                                        f"cannot pass the answer's memfd: {exc}")
        finally:
            os.close(fd)
        request = reply.request
        message = messages.infer_reply(
            reply.request_id, str(request.version),
            [[o.name, o.datatype, o.shape, place, ring_place(request, o)]
             for o, place in zip(outputs, places, strict=True)])
        message["spill"] = self.spills
        return message

    def _forward(self, message: dict[str, Any]) -> None:
        request_id = message["id"]
        try:
            call = RpcCall.from_message(message)
        except (KeyError, TypeError, ValueError) as exc:
            self._reply_error(request_id, invalid_argument(f"malformed frontend call: {exc}"))
            return
        task = asyncio.get_running_loop().create_task(self._run(request_id, call))
        self.links.running.add(task)
        task.add_done_callback(self.links.running.discard)

    async def _run(self, request_id: int, call: RpcCall) -> None:
        try:
            await self._caught_up(call.answered)
            answer = RpcAnswer(await self.links.forward(call))
        except ServeError as exc:
            self._reply_error(request_id, exc)
        except Exception as exc:
            log.exception("forwarded %s failed", call.rpc)
            self._reply(messages.error_reply(request_id, "INTERNAL",
                                             f"{type(exc).__name__}: {exc}"))
        else:
            self._reply(answer.message(request_id))


class _FrontendReply(_ChannelReply):
    """A frontend's request: large outputs go from the worker's arena into the answer's
    memfd on the dispatcher's thread (``prepare``), not through bytes on the loop."""

    __slots__ = ("_spill",)

    def __init__(self, channel: LocalChannel, request_id: int) -> None:
        super().__init__(channel, request_id)
        self._spill: tuple[int, list[list[int] | None]] | None = None

    def prepare(self, response: list[OutputTensor]) -> None:
        if _payload(response) <= SPILL_BYTES:
            super().prepare(response)
            return
        self._spill = write_outputs_memfd("shmserve-frontend-out", response)

    def take_spill(self) -> tuple[int, list[list[int] | None]] | None:
        spill, self._spill = self._spill, None
        return spill

    def drop_spill(self) -> None:
        spill = self.take_spill()
        if spill is not None:
            os.close(spill[0])

    def __del__(self) -> None:  # prepared, and never answered (cancelled meanwhile)
        self.drop_spill()


def _ringed(request: InferRequest, outputs: list[OutputTensor]) -> list[list[Any]]:
    """A response-ring request's output entries: each with its place in the ring (the
    frontend names it in the gRPC response, as the in-process door does)."""
    return [[o.name, o.datatype, o.shape, o.data, ring_place(request, o)] for o in outputs]


def _payload(outputs: list[OutputTensor]) -> int:
    return sum(o.nbytes for o in outputs)


def _versioned(message: dict[str, Any], reply: _ChannelReply) -> dict[str, Any]:
    if reply.request is not None:
        message["model_version"] = str(reply.request.version)
    return message


def _items_of(infer: FrontendInfer) -> Callable[[], RequestItems]:
    def items() -> RequestItems:
        if infer.parse_error is not None:
            raise infer.parse_error
        assert infer.items is not None
        return infer.items

    return items


class FrontendLinks(LocalFrontend):
    """Opens the frontend processes' channels (never listens on a path)."""

    def __init__(self, core: Core, forward: Forward, grpc_address: str, ring_bytes: int,
                 stall_secs: float, direct_rings: int, direct_ring_bytes: int) -> None:
        super().__init__(core, "", grpc_address, ring_bytes=ring_bytes, stall_secs=stall_secs,
                         direct_rings=direct_rings, direct_ring_bytes=direct_ring_bytes)
        self.forward = forward
        self.running: set[asyncio.Task[None]] = set()
        #: Called with a frontend's channel once it serves (set by the pool).
        self.ready_callback: Callable[[FrontendChannel, FrontendReady], None] | None = None

    def make_channel(self, channel_id: int, memfd: int, memory: mmap.mmap,
                     rings: ChannelLayout, peer: tuple[int, int, int],
                     fd_door: FdDoor | None) -> LocalChannel:
        channel = FrontendChannel(self, channel_id, memfd, memory, rings, peer, fd_door)
        channel.links = self
        return channel

    def on_ready(self, channel: FrontendChannel, ready: FrontendReady) -> None:
        if self.ready_callback is not None:
            self.ready_callback(channel, ready)
