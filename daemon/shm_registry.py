"""Client-registered shared-memory regions (system and CUDA) with bounds checks and refcounts.

The supervisor does not map a client's segment to serve requests: it checks the segment's size
when the region is registered and the bounds of every reference, then forwards references to
workers, which map. (The response cache alone maps regions it copies cached outputs into:
daemon/region_writer.py.)
A region unregistered while requests use it stays until the last request releases it.
"""

from __future__ import annotations

import itertools
import os
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from shmserve.daemon.errors import (
    already_exists,
    internal,
    invalid_argument,
    not_found,
    unavailable,
)
from shmserve.workers.shm import is_reserved_key

CUDA_HANDLE_SIZE = 64
# Names of regions private to one owner (a local channel): invisible to everyone else.
PRIVATE_PREFIX = "@"
_ids = itertools.count(1)


def canonical_key(key: str) -> str:
    """The key as ``shm_open`` resolves it: glibc skips *every* leading slash.

    Checks must run on this form: "//shmserve_arena_..." opens the same segment as
    "/shmserve_arena_...", so a check on the raw text could be bypassed.
    """
    return "/" + key.lstrip("/")


@dataclass(slots=True, eq=False)
class Region:
    name: str
    kind: str                 # "system" | "cuda"
    key: str                  # POSIX shm key (system)
    offset: int               # registration offset inside the segment (system)
    byte_size: int
    owner: str                # client id the region was registered under ("" = anonymous)
    device_id: int = 0
    raw_handle: bytes = b""
    region_id: int = 0
    users: int = 0
    unregistered: bool = False
    fd: int = -1              # a sealed memfd (local channel; key ""), closed once released


@dataclass(frozen=True, slots=True)
class ShmPolicy:
    """Who may register what (docs/security.md). gRPC and HTTP carry no identity, so a
    registration through them is allowed only when the server was started to trust its
    network clients with shared memory, and then only for segments owned by the server's own
    user unless foreign owners are allowed too. A local channel knows its peer's uid
    (SO_PEERCRED) and registers only that user's segments (root's channels any)."""

    allow_client_shm: bool = False
    allow_foreign_owners: bool = False
    key_prefix: str | None = None


# Longest POSIX shm name Linux takes: NAME_MAX (255) bytes after the leading slash.
MAX_KEY_BYTES = 255


class ShmRegistry:
    def __init__(self, on_released: Callable[[list[int]], None],
                 policy: ShmPolicy | None = None, gpu_ids: list[int] | None = None) -> None:
        self._regions: dict[str, Region] = {}
        self._on_released = on_released
        self._policy = policy or ShmPolicy()
        self._key_prefix = canonical_key(self._policy.key_prefix) \
            if self._policy.key_prefix else None
        self._gpu_ids = gpu_ids or []

    # --- registration -------------------------------------------------------------------
    def register_system(self, name: str, key: str, offset: int, byte_size: int,
                        owner: str = "", peer_uid: int | None = None) -> None:
        """``peer_uid``: the connected user of a local channel; None for gRPC and HTTP."""
        self._check_door(name, peer_uid)
        self._check_new_name(name)
        if name.startswith(PRIVATE_PREFIX) and not owner.startswith("local:"):
            raise invalid_argument(f"cannot register shared memory region '{name}' - names "
                                   f"beginning with '{PRIVATE_PREFIX}' are reserved")
        canonical = checked_key(name, key)
        if is_reserved_key(canonical):
            raise invalid_argument(
                f"cannot register shared memory region '{name}' - shm key '{key}' uses a "
                f"prefix reserved for the server")
        if self._key_prefix and not canonical.startswith(self._key_prefix):
            raise invalid_argument(
                f"cannot register shared memory region '{name}' - shm key '{key}' does not "
                f"start with the allowed prefix '{self._key_prefix}'")
        segment_uid, segment_size = _segment_owner_and_size(canonical, key)
        self._check_segment_owner(name, key, segment_uid, peer_uid)
        if offset < 0 or byte_size <= 0 or offset + byte_size > segment_size:
            raise invalid_argument(f"failed to register shared memory region '{name}': "
                                   f"invalid args")
        self._add(Region(name, "system", canonical, offset, byte_size, owner))

    def _check_door(self, name: str, peer_uid: int | None) -> None:
        if peer_uid is None and not self._policy.allow_client_shm:
            raise unavailable(
                f"cannot register shared memory region '{name}' - client shared memory is "
                f"disabled on this server (start it with --allow-client-shm to register "
                f"regions over gRPC or HTTP; co-located clients can use the local channel)")

    def _check_segment_owner(self, name: str, key: str, segment_uid: int,
                             peer_uid: int | None) -> None:
        if peer_uid is None:
            if segment_uid == os.geteuid() or self._policy.allow_foreign_owners:
                return
            raise invalid_argument(
                f"cannot register shared memory region '{name}' - shm key '{key}' belongs to "
                f"another user than the server's (start the server with "
                f"--shm-allow-foreign-owners to allow it)")
        if peer_uid not in (0, segment_uid):
            raise invalid_argument(f"cannot register shared memory region '{name}' - shm key "
                                   f"'{key}' belongs to another user")

    def register_memfd(self, name: str, fd: int, offset: int, byte_size: int,
                       owner: str) -> None:
        """A local channel's sealed memfd (checked by frontend/local_fds.py). The registry owns
        ``fd`` once this returns and closes it when the region is released."""
        self._check_new_name(name)
        if not name.startswith(PRIVATE_PREFIX) or not owner.startswith("local:"):
            raise invalid_argument(f"cannot register shared memory region '{name}' - memfd "
                                   f"regions belong to a local channel")
        self._add(Region(name, "system", "", offset, byte_size, owner, fd=fd))

    def add_internal_memfd(self, label: str, fd: int, byte_size: int) -> Region:
        """A region of the server's own (a sealed memfd): never listed, never reachable by a
        client's name; requests reach it only through ``acquire(internal=...)``. The
        registry owns ``fd``; ``drop_internal`` releases it once no request uses it."""
        region = Region(label, "system", "", 0, byte_size, "", fd=fd)
        region.region_id = next(_ids)
        return region

    def drop_internal(self, region: Region) -> None:
        region.unregistered = True
        if region.users == 0:
            self._released(region)

    def register_cuda(self, name: str, raw_handle: bytes, device_id: int, byte_size: int,
                      owner: str = "", peer_uid: int | None = None) -> None:
        self._check_door(name, peer_uid)
        self._check_new_name(name)
        if len(raw_handle) != CUDA_HANDLE_SIZE or byte_size <= 0 or device_id < 0:
            raise invalid_argument(f"failed to register shared memory region '{name}': "
                                   f"invalid args")
        if device_id not in self._gpu_ids:
            raise invalid_argument(f"failed to register shared memory region '{name}': "
                                   f"invalid args (no GPU {device_id} on this host)")
        self._add(Region(name, "cuda", "", 0, byte_size, owner, device_id, bytes(raw_handle)))

    def _visible(self, region: Region | None, owner: str) -> Region | None:
        if region is not None and region.name.startswith(PRIVATE_PREFIX) and \
                region.owner != owner:
            return None
        return region

    def _check_new_name(self, name: str) -> None:
        if name in self._regions:
            raise already_exists(f"shared memory region '{name}' already in manager")

    def _add(self, region: Region) -> None:
        region.region_id = next(_ids)
        self._regions[region.name] = region

    def unregister(self, kind: str, name: str, owner: str = "") -> None:
        """Empty name: every region of that kind registered by the same owner."""
        if name:
            region = self._visible(self._regions.get(name), owner)
            if region is not None and region.kind == kind:
                self._retire(region)
            return
        for region in [r for r in self._regions.values() if r.kind == kind and r.owner == owner]:
            self._retire(region)

    def _retire(self, region: Region) -> None:
        del self._regions[region.name]
        region.unregistered = True
        if region.users == 0:
            self._released(region)

    def status(self, kind: str, name: str, owner: str = "") -> list[Region]:
        if name:
            region = self._visible(self._regions.get(name), owner)
            if region is None or region.kind != kind:
                label = "system" if kind == "system" else "CUDA"
                raise not_found(f"Unable to find {label} shared memory region: '{name}'")
            return [region]
        return [r for r in self._regions.values()
                if r.kind == kind and self._visible(r, owner) is not None]

    # --- use by requests ----------------------------------------------------------------
    def acquire(self, name: str, offset: int, byte_size: int, owner: str = "",
                internal: Mapping[str, Region] | None = None) -> Region:
        """Check a request's reference and pin the region until ``release``. ``internal``:
        the server's own regions this request may use besides the registered ones (an
        ensemble's intermediate tensors)."""
        region = internal.get(name) if internal else None
        if region is None:
            region = self._visible(self._regions.get(name), owner)
        if region is None:
            raise not_found(f"Unable to find shared memory region: '{name}'")
        if offset < 0 or offset >= region.byte_size:
            raise invalid_argument(f"Invalid offset for shared memory region: '{name}'")
        if byte_size < 0 or offset + byte_size > region.byte_size:
            raise invalid_argument(
                f"Invalid offset + byte size for shared memory region: '{name}'")
        region.users += 1
        return region

    def release(self, region: Region) -> None:
        region.users -= 1
        if region.users == 0 and region.unregistered:
            self._released(region)

    def _released(self, region: Region) -> None:
        if region.fd >= 0:
            os.close(region.fd)
            region.fd = -1
        self._on_released([region.region_id])

    def __len__(self) -> int:
        return len(self._regions)

    def counts(self) -> dict[tuple[str, str], int]:
        """(kind, owner) -> registered regions; owner "" is the anonymous gRPC scope."""
        counts: dict[tuple[str, str], int] = {}
        for region in self._regions.values():
            key = (region.kind, region.owner)
            counts[key] = counts.get(key, 0) + 1
        return counts


def checked_key(name: str, key: str) -> str:
    """The canonical form of a client's shm key, checked before any library or system call
    sees it (an embedded NUL crashes posix_ipc; a slash would make a path out of the key).
    Keys shm_open itself would refuse get shm_open's answer, as Triton reports it."""
    canonical = canonical_key(key)
    body = canonical[1:]
    if not body or "\x00" in key:
        raise invalid_argument(f"cannot register shared memory region '{name}' - invalid shm "
                               f"key {printable(key)}")
    if "/" in body or body in (".", "..") or \
            len(body.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
        raise internal(f"Unable to open shared memory region: {printable(key)}")
    return canonical


def printable(text: str, limit: int = 400) -> str:
    """A client-supplied string safe to quote in an error: control characters escaped and
    long texts cut."""
    shown = text if len(text) <= limit else text[:limit] + "..."
    return repr(shown) if not shown.isprintable() else f"'{shown}'"


def _segment_owner_and_size(canonical: str, key: str) -> tuple[int, int]:
    """Open the segment as shm_open would (no symlinks) and read its owner and size from
    the open file, so what is checked is what was opened."""
    try:
        fd = os.open("/dev/shm" + canonical,
                     os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except (OSError, ValueError):
        raise internal(f"Unable to open shared memory region: '{key}'") from None
    try:
        info = os.fstat(fd)
    finally:
        os.close(fd)
    if not stat.S_ISREG(info.st_mode):
        raise internal(f"Unable to open shared memory region: '{key}'")
    return info.st_uid, info.st_size
