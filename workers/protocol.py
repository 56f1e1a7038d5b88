"""Control frames between the supervisor and a worker.

Frames are msgpack maps streamed over a Unix socketpair (msgpack is self-delimiting, so no
length prefix is needed). Tensor bytes never travel in a frame unless they are tiny; a frame
names them with a *tensor reference*:

    TensorRef = [name, datatype, shape, where, location, offset, nbytes]

``where`` is one of:
    INLINE  -- ``location`` holds the bytes themselves (tiny tensors only)
    ARENA   -- ``location`` is the POSIX shm key of a per-instance arena segment
    SYSTEM  -- ``location`` is [region_id, shm_key]: a client-registered system region
    CUDA    -- ``location`` is [region_id, raw_handle, device_id]: a client CUDA IPC region
``offset`` is absolute inside the segment/allocation and ``nbytes`` the tensor's byte size.

Frame types (key ``t``):
    supervisor -> worker: EXEC, CANCEL, RELEASE, PING, STOP, ATTACH, DETACH
    worker -> supervisor: READY, INIT_FAILED, DONE, PONG

EXEC ``{b: frame id, reqs: [request...], lane, each}`` runs its requests as one batch, or with
``each`` one execution per request; large outputs go to the output arena of pipeline ``lane``.
DONE ``{b, res: [result per request], x: [[request indices, input ns, infer ns, output ns]
per execution]}`` answers it. A request may carry ``ch: [channel id, request id]``: the worker
then answers its client through the local channel itself (see direct_answers.py) and its DONE
result is ``{d: 1}``. ATTACH ``{ch, base, cap}`` comes with the channel's fds on the fd socket;
DETACH ``{ch}`` drops them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack

INLINE = "i"
ARENA = "a"
SYSTEM = "s"
CUDA = "c"

EXEC = "exec"
CANCEL = "cancel"   # skip request "i" of batch "b" if it has not started
RELEASE = "release"
PING = "ping"
STOP = "stop"
READY = "ready"
INIT_FAILED = "init_failed"
DONE = "done"
PONG = "pong"
ATTACH = "attach"
DETACH = "detach"
ANSWERED: dict[str, int] = {"d": 1}  # a DONE result: answered through the local channel

# Tensors at or below this size travel inside the frame: cheaper than touching shared memory.
INLINE_LIMIT = 64 * 1024


@dataclass(slots=True)
class TensorRef:
    name: str
    datatype: str
    shape: list[int]
    where: str
    location: Any
    offset: int = 0
    nbytes: int = 0

    def pack(self) -> list[Any]:
        return [self.name, self.datatype, self.shape, self.where, self.location, self.offset,
                self.nbytes]

    @classmethod
    def unpack(cls, raw: list[Any]) -> TensorRef:
        return cls(raw[0], raw[1], list(raw[2]), raw[3], raw[4], raw[5], raw[6])



def packed_inline(name: str, datatype: str, shape: list[int], data: bytes) -> list[Any]:
    """``TensorRef(..., INLINE, data, 0, len(data)).pack()`` without building the object
    (the per-request path for small tensors)."""
    return [name, datatype, shape, INLINE, data, 0, len(data)]


def encode(frame: dict[str, Any]) -> bytes:
    return msgpack.packb(frame, use_bin_type=True)


def new_unpacker() -> msgpack.Unpacker:
    # Large tensors never travel inline, but a batch of tiny ones may add up.
    return msgpack.Unpacker(raw=False, max_buffer_size=1 << 31)


def error_tuple(code: str, message: str) -> list[str]:
    """Errors cross the process boundary as [grpc status code name, message]."""
    return [code, message]
