"""The ``checksum`` repository agent, compatible with Triton's checksum_repository_agent.

Configured in config.pbtxt::

    model_repository_agents {
      agents [
        {
          name: "checksum",
          parameters [
            { key: "MD5:1/model.py", value: "<lowercase hex md5>" },
            { key: "SHA256:1/weights.bin", value: "<lowercase hex sha256>" }
          ]
        }
      ]
    }

Each parameter key is ``<ALGO>:<path relative to the model directory>`` and the value the
lowercase hex digest. Triton supports MD5 only (the algorithm name is case-insensitive);
we add SHA256. On LOAD every listed file of the current repository location is hashed (in
chunks, never read whole) and the first problem fails the load with Triton's exact text
(triton-inference-server/checksum_repository_agent ``src/checksum.cc``):

* ``failed to parse key: <key>`` — the key has no ``:``
* ``Unsupported checksum algorithm: <algo>`` — the algorithm as written
* ``failed to open text file for read <relative path>: <strerror>``
* ``Mismatched MD5 hash for file <relative path>, expect: <value>, got: <digest>``

As in Triton the digest is compared with the value exactly (lowercase hex). Unlike Triton,
a path that is absolute or leaves the model directory is refused (as "failed to open text
file for read <path>: path escapes the model directory"), so a config cannot probe files
outside its model (checked on the path as written; symlinks inside the model directory
are followed). Other actions are ignored.
"""

from __future__ import annotations

import errno
import hashlib
import os
from collections.abc import Callable
from typing import Any

from .base import Action, AgentContext, AgentError, RepoAgent

__all__ = ["ALGORITHMS", "CHUNK_SIZE", "ChecksumAgent", "file_digest"]

CHUNK_SIZE = 1 << 20

#: lowercase algorithm name → (name used in messages, hash constructor)
ALGORITHMS: dict[str, tuple[str, Callable[[], Any]]] = {
    "md5": ("MD5", hashlib.md5),
    "sha256": ("SHA256", hashlib.sha256),
}


def file_digest(path: str, algorithm: str, chunk_size: int = CHUNK_SIZE) -> str:
    """Lowercase hex digest of a file, read in ``chunk_size`` pieces."""
    _display, factory = ALGORITHMS[algorithm.lower()]
    hasher = factory()
    buffer = bytearray(chunk_size)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buffer)
            if not n:
                break
            hasher.update(view[:n])
    return str(hasher.hexdigest())


def _escapes(relative: str) -> bool:
    """True when ``relative`` is absolute or climbs out of the model directory (lexically;
    symlinks inside the model directory are the repository owner's business)."""
    if os.path.isabs(relative):
        return True
    normal = os.path.normpath(relative)
    return normal == os.pardir or normal.startswith(os.pardir + os.sep)


def _open_error(relative: str, reason: str) -> AgentError:
    return AgentError(f"failed to open text file for read {relative}: {reason}")


class ChecksumAgent(RepoAgent):
    """Verify model files against digests given as agent parameters (acts on LOAD only)."""

    def handle(self, action: Action, model: AgentContext) -> None:
        if action is not Action.LOAD:
            return
        location = model.location
        for key, value in model.parameters.items():
            algo, sep, relative = key.partition(":")
            if not sep:
                raise AgentError(f"failed to parse key: {key}")
            known = ALGORITHMS.get(algo.lower())
            if known is None:
                raise AgentError(f"Unsupported checksum algorithm: {algo}")
            display, _factory = known

            if _escapes(relative):
                raise _open_error(relative, "path escapes the model directory")
            full = os.path.join(location, relative)
            try:
                digest = file_digest(full, algo)
            except OSError as exc:
                code = exc.errno if exc.errno is not None else errno.EIO
                raise _open_error(relative, os.strerror(code)) from exc
            if digest != value:
                raise AgentError(
                    f"Mismatched {display} hash for file {relative}, expect: {value}, got: {digest}"
                )
