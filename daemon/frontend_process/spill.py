"""Large payloads between a frontend process and the core: in a sealed memfd, not the rings.

A ring message can hold at most half its ring. Past ``SPILL_BYTES`` a request's large inputs
are written once into a sealed memfd that the frontend passes over its channel's fd door: the
core registers it as a private region for that request alone, and the worker maps it, as any
memfd region (no byte passes through the supervisor). An answer's outputs past
``SPILL_BYTES`` come back the same way, in a memfd the supervisor passes the other way.
"""

from __future__ import annotations

import fcntl
import mmap
import os
from collections.abc import Sequence

from shmserve.daemon.request import OutputTensor
from shmserve.workers.shm import Pieces

SPILL_BYTES = 1 << 20
SMALL_TENSOR_BYTES = 4 << 10  # smaller inputs of a large request stay inline
_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


def write_memfd(name: str, parts: Sequence[bytes | memoryview | Pieces]
                ) -> tuple[int, list[int]]:
    """A sealed memfd holding ``parts`` one after the other, and where each starts."""
    offsets: list[int] = []
    total = 0
    for part in parts:
        offsets.append(total)
        total += len(part)
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, max(total, 1))
        for part, offset in zip(parts, offsets, strict=True):
            for view in part.parts if isinstance(part, Pieces) else (memoryview(part),):
                written = 0
                while written < len(view):
                    written += os.pwrite(fd, view[written:], offset + written)
                offset += len(view)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
    except BaseException:
        os.close(fd)
        raise
    return fd, offsets


def map_memfd(fd: int) -> memoryview:
    """The memfd's bytes, read-only; the mapping lives as long as a slice of it does. Closes
    ``fd``."""
    try:
        return memoryview(mmap.mmap(fd, os.fstat(fd).st_size, prot=mmap.PROT_READ))
    finally:
        os.close(fd)


def write_outputs_memfd(name: str, outputs: Sequence[OutputTensor]
                        ) -> tuple[int, list[list[int] | None]]:
    """A sealed memfd holding the outputs' bytes one after the other, pending ones read from
    the worker's output arena straight into it (their one copy here; on a thread: see
    Reply.prepare); and each output's [offset, bytes] in it (None: it has none)."""
    places: list[list[int] | None] = []
    total = 0
    for output in outputs:
        if output.pending or output.data is not None:
            places.append([total, output.nbytes])
            total += output.nbytes
        else:
            places.append(None)
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, max(total, 1))
        with mmap.mmap(fd, max(total, 1)) as memory:
            view = memoryview(memory)
            try:
                for output, place in zip(outputs, places, strict=True):
                    if place is not None:
                        output.copy_into(view[place[0]:place[0] + place[1]])
            finally:
                view.release()
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
    except BaseException:
        os.close(fd)
        raise
    return fd, places
