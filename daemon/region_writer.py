"""Copies of cached outputs into clients' system regions (a cache hit whose output goes to shared
memory), at memcpy speed.

A region is mapped once, on its first use, and kept mapped until it is released (the registry
says so through ``forget``): a pwrite into a tmpfs file walks the page cache page by page and
costs several memcpys, and a fresh mapping per copy costs its page faults every time.

The supervisor maps only what no one but the server's own user could shrink under it (a
shrunk segment makes the next access a SIGBUS): a local channel's memfd, sealed against
shrinking, and POSIX segments owned by the server's user (whose owner could end the server
anyway), whose size is checked again before every copy. Segments of other users
(--shm-allow-foreign-owners) are written with pwrite, never mapped.
"""

from __future__ import annotations

import contextlib
import mmap
import os
from dataclasses import dataclass

import numpy as np

from shmserve.daemon.response_cache import Uncacheable, open_region, write_region
from shmserve.daemon.shm_registry import Region
from shmserve.workers.copying import copy_bytes


@dataclass(slots=True)
class _Mapped:
    fd: int
    mapping: mmap.mmap
    view: np.ndarray          # uint8 over the whole mapping
    sealed: bool              # a sealed memfd: its size cannot change


class RegionWriter:
    def __init__(self) -> None:
        self._mapped: dict[int, _Mapped] = {}

    def prepare(self, region: Region) -> None:
        """Map ``region`` if it may be and is not yet (on the event loop: no copy here)."""
        if region.region_id in self._mapped or region.kind != "system":
            return
        fd = open_region(region, writable=True)
        try:
            info = os.fstat(fd)
            length = region.offset + region.byte_size
            sealed = region.fd >= 0
            if (not sealed and info.st_uid != os.geteuid()) or info.st_size < length:
                os.close(fd)
                return
            mapping = mmap.mmap(fd, length, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except (OSError, ValueError):
            os.close(fd)
            return
        self._mapped[region.region_id] = _Mapped(
            fd, mapping, np.frombuffer(mapping, dtype=np.uint8), sealed)

    def write(self, region: Region, position: int, data: bytes) -> None:
        """Copy ``data`` to ``position`` of the region's segment (any thread; the region stays
        registered meanwhile: the request holding it is not finished). Raises OSError or
        Uncacheable."""
        mapped = self._mapped.get(region.region_id)
        end = position + len(data)
        if mapped is None:
            fd = open_region(region, writable=True)
            try:
                write_region(fd, position, data)
            finally:
                os.close(fd)
            return
        if end > len(mapped.view):
            raise Uncacheable("the output lies outside its shared memory region")
        if not mapped.sealed and os.fstat(mapped.fd).st_size < end:
            raise OSError("the client shrank its shared memory segment")
        copy_bytes(mapped.view[position:end], data)

    def forget(self, region_ids: list[int]) -> None:
        """The regions were released: unmap them."""
        for region_id in region_ids:
            mapped = self._mapped.pop(region_id, None)
            if mapped is not None:
                del mapped.view
                with contextlib.suppress(BufferError):  # a view still alive: the GC unmaps
                    mapped.mapping.close()
                os.close(mapped.fd)

    def close(self) -> None:
        self.forget(list(self._mapped))
