"""The response cache: Triton's ``response_cache { enable: true }`` per model, one cache per
server (``--cache-config local,size=BYTES``), least recently used entries evicted past the size.

A response is keyed on the model, its version, the request's input tensors (name, datatype,
shape and bytes, hashed where they lie: the door's buffer, or a client's shared-memory region
read in chunks) and the names of the outputs it asked for. An entry holds the outputs as
immutable ``bytes``: a response the worker sent inline or through its arena is already such a
copy the supervisor owns, so the cache keeps a reference to it; an output the worker wrote
into a client's region is read back once, on the miss. Where a hit's outputs go is decided per
request (cached_infer.py): the bytes, or a copy into the request's own region.

Unlike Triton's key (model, version, input names and bytes), shapes, datatypes and requested
outputs are part of ours: [2,3] and [3,2] of the same bytes are different requests.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

from shmserve.daemon.request import InferRequest, InputTensor
from shmserve.daemon.shm_registry import Region
from shmserve.workers.shm import Pieces

# What an entry costs beside its output bytes (names, shapes, bookkeeping), roughly.
ENTRY_OVERHEAD = 128
OUTPUT_OVERHEAD = 64
HASH_CHUNK = 1 << 20


def cache_size(entries: Iterable[tuple[str, str, str]]) -> int:
    """The size in bytes of the cache --cache-config configured (settings.py parses it; the
    last ``size`` given wins); 0: no cache."""
    size = 0
    for _, key, value in entries:
        if key == "size":
            size = int(value)
    return size


@dataclass(frozen=True, slots=True)
class CachedOutput:
    name: str
    datatype: str
    shape: tuple[int, ...]
    data: bytes


@dataclass(frozen=True, slots=True)
class CacheEntry:
    outputs: tuple[CachedOutput, ...]

    @property
    def nbytes(self) -> int:
        return ENTRY_OVERHEAD + sum(OUTPUT_OVERHEAD + len(o.name) + len(o.data)
                                    for o in self.outputs)


class ResponseCache:
    """Entries by key, least recently used first; at most ``capacity`` bytes in all."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0
        self.evictions = 0
        self._entries: OrderedDict[bytes, tuple[CacheEntry, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, key: bytes) -> CacheEntry | None:
        found = self._entries.get(key)
        if found is None:
            return None
        self._entries.move_to_end(key)
        return found[0]

    def insert(self, key: bytes, entry: CacheEntry) -> bool:
        """Keep ``entry``, evicting the least recently used ones to make room. False: it is
        larger than the whole cache (nothing is evicted for it) or ``key`` is held already."""
        size = entry.nbytes
        if size > self.capacity or key in self._entries:
            return False
        while self.used + size > self.capacity:
            _, (_, evicted) = self._entries.popitem(last=False)
            self.used -= evicted
            self.evictions += 1
        self._entries[key] = (entry, size)
        self.used += size
        return True


# --- keys ----------------------------------------------------------------------------------
class Uncacheable(Exception):
    """The request's inputs cannot be hashed (a CUDA region, or a region that shrank)."""


def input_bytes(request: InferRequest) -> int:
    return sum(tensor.nbytes for tensor in request.inputs)


def request_key(request: InferRequest, model_outputs: Iterable[str]) -> bytes:
    """The request's cache key (a request that names no output asks for ``model_outputs``,
    all of them). Raises Uncacheable. Reads the regions its inputs lie in: call it off the
    event loop for large inputs."""
    if any(output.region is not None and output.region.kind != "system"
           for output in request.outputs):
        raise Uncacheable("outputs into CUDA shared memory are not cached")
    digest = hashlib.sha256()
    digest.update(f"{request.model}\0{request.version}\0".encode())
    for tensor in sorted(request.inputs, key=_name):
        digest.update(f"{tensor.name}\0{tensor.datatype}\0{tensor.shape}\0{tensor.nbytes}\0"
                      .encode())
        if tensor.region is None:
            data = tensor.data
            for part in data.parts if isinstance(data, Pieces) else (data or b"",):
                digest.update(part)
        else:
            _hash_region(digest, tensor)
    names = [f"{output.name}\0{output.class_count}" if output.class_count else output.name
             for output in request.outputs] or model_outputs
    digest.update("\0".join(sorted(names)).encode())
    return digest.digest()


def _name(tensor: InputTensor) -> str:
    return tensor.name


def _hash_region(digest: hashlib._Hash, tensor: InputTensor) -> None:
    """Hash an input in a client's system region through a small reused buffer: pread, not a
    mapping, so a client that shrinks its segment gets a short read, not a SIGBUS in the
    supervisor."""
    region = tensor.region
    assert region is not None
    fd = open_region(region, writable=False)
    try:
        buffer = bytearray(min(HASH_CHUNK, max(tensor.nbytes, 1)))
        view = memoryview(buffer)
        position = region.offset + tensor.offset
        left = tensor.nbytes
        while left:
            try:
                count = os.preadv(fd, [view[:min(left, len(buffer))]], position)
            except OSError as exc:
                raise Uncacheable(f"input '{tensor.name}': {exc.strerror}") from None
            if count <= 0:
                raise Uncacheable(f"input '{tensor.name}' lies outside its shared memory "
                                  f"segment")
            digest.update(view[:count])
            position += count
            left -= count
    finally:
        os.close(fd)


# --- client regions --------------------------------------------------------------------------
def open_region(region: Region, writable: bool) -> int:
    """A file descriptor of a client's system region (the caller closes it). Raises
    Uncacheable for a CUDA region or one that cannot be opened any more."""
    if region.kind != "system":
        raise Uncacheable("CUDA shared memory is not cached")
    try:
        if region.fd >= 0:
            return os.dup(region.fd)
        flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_NOFOLLOW | os.O_CLOEXEC
        return os.open("/dev/shm" + region.key, flags)
    except OSError as exc:
        raise Uncacheable(f"shared memory region '{region.name}': {exc.strerror}") from None


def read_region(fd: int, position: int, nbytes: int) -> bytes:
    """``nbytes`` at ``position`` of a region's file; raises Uncacheable on a short read."""
    try:
        data = os.pread(fd, nbytes, position) if nbytes else b""
    except OSError as exc:
        raise Uncacheable(f"reading an output back: {exc.strerror}") from None
    if len(data) != nbytes:
        raise Uncacheable("output lies outside its shared memory segment")
    return data


def write_region(fd: int, position: int, data: bytes) -> None:
    """Copy ``data`` into a region's file at ``position``; never past the segment's end (a
    pwrite there would grow a segment the client shrank)."""
    if position + len(data) > os.fstat(fd).st_size:
        raise OSError("the output lies outside its shared memory segment")
    view = memoryview(data)
    done = 0
    while done < len(data):
        done += os.pwrite(fd, view[done:], position + done)
