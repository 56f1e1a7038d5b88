"""The BLS door: requests a worker's model sends into the core (``InferenceRequest.exec``).

A worker-originated request is a local-channel request (daemon/frontend/local.py): every
worker gets one end of a socketpair at start (``WorkerProcess``), this door holds the other,
and when the worker first sends ``CONNECT`` on it the door opens a local channel over it
exactly as for a client that connected to the local socket (rings in a memfd, a fd door for
the worker's memfd regions, direct answers from the target worker). So BLS requests are
validated, batched, counted and answered like any other request, and their tensors travel
by region reference: no bytes of a large tensor pass through here. It works whether or not
the local socket (--local-socket) is served. A worker's channel also takes the python
backend's model loading API (``pb_utils.load_model``, ``unload_model``, ``is_model_ready``:
the "model" operation), which clients' local channels do not.
"""

from __future__ import annotations

import asyncio
import logging
import socket

from shmserve.daemon.core import Core
from shmserve.daemon.frontend.local import LocalFrontend
from shmserve.daemon.operations import Operations

log = logging.getLogger("shmserve.bls")


class BlsDoor:
    def __init__(self, core: Core, grpc_address: str, ring_bytes: int, stall_secs: float,
                 direct_rings: int, direct_ring_bytes: int) -> None:
        # Never started: it listens on no path, it only opens channels on worker sockets.
        self._channels = LocalFrontend(core, "", grpc_address, ring_bytes=ring_bytes,
                                       stall_secs=stall_secs, direct_rings=direct_rings,
                                       direct_ring_bytes=direct_ring_bytes,
                                       model_control=Operations(core))
        self._waiting: set[socket.socket] = set()
        self._opening: set[asyncio.Task[None]] = set()

    def adopt(self, sock: socket.socket) -> None:
        """Our end of a new worker's BLS socket: its channel is opened when it asks."""
        sock.setblocking(False)
        self._waiting.add(sock)
        asyncio.get_running_loop().add_reader(sock.fileno(), self._asked, sock)

    def _asked(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(sock.fileno())
        self._waiting.discard(sock)
        try:
            asked = sock.recv(1)
        except OSError:
            asked = b""
        if not asked:  # the worker exited without using BLS
            sock.close()
            return
        task = loop.create_task(self._open(sock))
        self._opening.add(task)
        task.add_done_callback(self._opening.discard)

    async def _open(self, sock: socket.socket) -> None:
        try:
            await self._channels.open_channel(sock)
        except OSError as exc:
            log.warning("cannot open a worker's BLS channel: %s", exc)
            sock.close()

    async def stop(self) -> None:
        loop = asyncio.get_running_loop()
        for sock in list(self._waiting):
            loop.remove_reader(sock.fileno())
            sock.close()
        self._waiting.clear()
        await self._channels.stop()
