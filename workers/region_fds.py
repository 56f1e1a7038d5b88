"""Memfd regions reach a worker by fd: a REGION frame, its fd on the fd socket (protocol.py)."""

from __future__ import annotations

import logging
import os
import socket

from shmserve.workers.protocol import region_fd_tag
from shmserve.workers.shm import SegmentCache

log = logging.getLogger("shmserve.worker")


def adopt_region_fd(fd_socket: socket.socket | None, regions: SegmentCache,
                    region_id: int) -> None:
    """Take the fd the supervisor sent with REGION ``region_id`` (already in the socket) and
    map it. A failure is logged; requests naming the region then fail with a clear error."""
    if fd_socket is None:
        return
    payload, fds, _, _ = socket.recv_fds(fd_socket, 64, 1)
    if payload != region_fd_tag(region_id) or len(fds) != 1:
        log.error("region %d: got %r with %d fds", region_id, payload, len(fds))
        for fd in fds:
            os.close(fd)
        return
    try:
        regions.adopt(region_id, fds[0])
    except (OSError, ValueError) as exc:
        log.error("region %d: cannot map its memfd: %s", region_id, exc)
