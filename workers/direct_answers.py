"""Answers a worker writes straight to a local-channel client (no hop through the supervisor).

The supervisor *attaches* a channel to a worker before it sends the worker that channel's
first request: it passes the channel's memfd and a duplicate of its end of the client's socket
over the worker's fd socket, and names the direct ring this worker owns (one producer per
ring). A request tagged ``[channel id, request id]`` is then answered here: the reply goes into
the ring and one doorbell byte per channel wakes the client after the frame. The supervisor
still gets the DONE frame (statistics, lanes, bookkeeping), with ``{"d": 1}`` for each request
answered this way. Anything that cannot be delivered (no such channel, ring full, message too
large) simply goes back in DONE and the supervisor answers it as before.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import socket
import struct
from dataclasses import dataclass
from typing import Any

import msgpack

from shmserve.protos.local_messages import DOORBELL, infer_reply
from shmserve.protos.local_ring import HEADER, MessageTooLarge, Ring, RingFull
from shmserve.workers.protocol import INLINE

log = logging.getLogger("shmserve.worker")
_SEND_FLAGS = int(socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)

_REPLY_OVERHEAD = 4096  # a reply's bytes besides its outputs' (names, shapes, ids)


@dataclass(slots=True, eq=False)  # hashed by identity
class _Channel:
    memory: mmap.mmap
    ring: Ring
    doorbell: socket.socket


class DirectAnswers:
    def __init__(self, fd_socket: socket.socket | None) -> None:
        self._fd_socket = fd_socket
        self._channels: dict[int, _Channel] = {}
        self._unrung: set[_Channel] = set()
        self._packer = msgpack.Packer(use_bin_type=True)

    def attach(self, channel_id: int, ring_base: int, capacity: int) -> None:
        """Take the fds the supervisor sent with this ATTACH frame (already in the socket).

        The ring's capacity comes from the supervisor, never from the shared header: the client
        can write that memory, and a capacity it chose would aim our writes past the ring.
        """
        if self._fd_socket is None:
            return
        payload, fds, _, _ = socket.recv_fds(self._fd_socket, 64, 2)
        try:
            if len(fds) != 2 or int(payload or b"0") != channel_id:
                log.error("attach of channel %d got %r with %d fds", channel_id, payload,
                          len(fds))
                return
            size = os.fstat(fds[0]).st_size
            if ring_base + HEADER + capacity > size:
                log.error("channel %d: ring beyond its memory (%d bytes)", channel_id, size)
                return
            memory = mmap.mmap(fds[0], size)
            doorbell = socket.socket(fileno=os.dup(fds[1]))
        finally:
            for fd in fds:
                os.close(fd)
        self.detach(channel_id)
        self._channels[channel_id] = _Channel(memory, Ring(memory, ring_base, capacity), doorbell)

    def detach(self, channel_id: int) -> None:
        channel = self._channels.pop(channel_id, None)
        if channel is None:
            return
        self._unrung.discard(channel)
        channel.ring.release()
        channel.doorbell.close()
        with contextlib.suppress(BufferError):
            channel.memory.close()

    def fits(self, tag: list[int], payload: int) -> bool:
        """Whether a reply carrying ``payload`` bytes of outputs inline could go into the
        tagged channel's direct ring (at most half of it); a larger one goes through the
        lane's arena, never inline through the supervisor's socket."""
        channel = self._channels.get(tag[0])
        return channel is not None and payload + _REPLY_OVERHEAD <= channel.ring.capacity // 2

    def deliver(self, tag: list[int], model_version: str, outputs: list[list[Any]]) -> bool:
        """Publish the reply to tagged request ``tag`` ([channel id, request id]) whose
        ``outputs`` are packed TensorRefs (inline bytes, or written to a client region)."""
        channel = self._channels.get(tag[0])
        if channel is None:
            return False
        reply = infer_reply(tag[1], model_version,
                            [[o[0], o[1], o[2], o[4] if o[3] == INLINE else None]
                             for o in outputs])
        try:
            channel.ring.put(self._packer.pack(reply))
        except (RingFull, MessageTooLarge):
            return False
        except (ValueError, IndexError, struct.error) as exc:
            # Only a client scribbling over its own ring gets here: it loses direct answers.
            log.warning("channel %d: direct ring unusable (%s); answering through the "
                        "supervisor", tag[0], exc)
            self.detach(tag[0])
            return False
        self._unrung.add(channel)
        return True

    def ring_doorbells(self) -> None:
        """One doorbell per channel answered since the last call."""
        for channel in self._unrung:
            # Full: doorbells are queued already. Broken: the client is gone, the supervisor
            # detaches the channel once it notices.
            with contextlib.suppress(OSError):
                channel.doorbell.send(DOORBELL, _SEND_FLAGS)
        self._unrung.clear()

    def close_all(self) -> None:
        for channel_id in list(self._channels):
            self.detach(channel_id)
