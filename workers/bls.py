"""BLS: requests a model sends from its own worker into the core.

The worker is a client of its supervisor's core over a local channel of its own (the same
shared-memory ring protocol as ``local://`` clients, daemon/frontend/local.py): the supervisor
gives every worker one end of a socketpair at start (daemon/frontend/bls.py holds the other),
and the first BLS call asks for the channel on it (one byte) and receives the rings like any
local client. A request then goes through ``Core.submit`` like any other: validation,
batching, statistics, Triton's error texts.

Tensor bytes never pass through the supervisor except tiny ones (at most ``INLINE_LIMIT``,
inline in the ring): a larger input is copied once into a sealed memfd registered on the
channel (the target worker maps it by fd), and every named output is requested into a sparse
memfd of its own (pages exist only where the target worker writes them), which the caller
reads in place. The answer itself comes from the target worker through the channel's direct
ring. A streamed request (``exec(decoupled=True)``, ``BlsStream``) names a response ring in a
sparse memfd of the caller's instead (protos/response_ring.py): each response's tensors are
written into the next slot and copied out as the caller iterates.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import contextvars
import fcntl
import itertools
import mmap
import os
import socket
import struct
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np

from shmserve.client._convert import read_reply_outputs
from shmserve.client.errors import ShmserveError
from shmserve.client.local_channel import LocalChannel, MessageTooLarge
from shmserve.protos import response_ring
from shmserve.protos.datatypes import to_numpy_dtype
from shmserve.workers.cuda_ipc import DeviceOutput
from shmserve.workers.protocol import INLINE_LIMIT
from shmserve.workers.tensors import output_bytes

#: The request parameter naming the instances a BLS request's callers hold while they wait:
#: "model|instance|instances of the model" entries, joined by ",".
CHAIN_PARAMETER = "shmserve_bls_chain"
#: The chain of the requests this execution serves (set by the worker around each execution).
current_chain: contextvars.ContextVar[str] = contextvars.ContextVar("bls_chain", default="")
#: Asks the supervisor for the channel on the BLS socket.
CONNECT = b"c"
#: Virtual size of each output's memfd: an output may be this large. Only written pages cost.
OUTPUT_CAPACITY = 1 << 32
#: A streamed request's response ring (protos/response_ring.py), a sparse memfd as well: a
#: response's tensors may take this much together.
STREAM_SLOT_BYTES = 1 << 30
STREAM_SLOTS = 2
_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
_names = itertools.count(1)
#: Regions (sparse, OUTPUT_CAPACITY each) a worker keeps registered from one BLS call to the
#: next, for inputs and outputs of at most POOLED_BYTES: creating, passing, registering,
#: mapping (here and in the called worker) and unregistering a memfd per tensor per call cost
#: more than a small model's execute. Larger tensors get regions of their own, as before.
POOLED_REGIONS = 8
POOLED_BYTES = 1 << 20


@dataclass(slots=True)
class BlsRequest:
    """What ``pb_utils.InferenceRequest`` hands over for ``exec``."""

    model_name: str
    model_version: int
    inputs: list[tuple[str, Any]]           # (name, array)
    requested_outputs: list[str]
    request_id: str = ""
    correlation_id: int | str = 0
    parameters: dict[str, Any] | None = None
    timeout_us: int = 0


@dataclass(slots=True)
class BlsResponse:
    """One response of a streamed BLS request: outputs, or ``error``; ``final`` on the last."""

    outputs: dict[str, np.ndarray]
    error: BlsError | None
    final: bool


class BlsError(Exception):
    """A BLS request failed: a gRPC status code name and Triton's message."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class _Memfd:
    """A sealed memfd mapped here; its fd is closed once passed to the server."""

    def __init__(self, size: int) -> None:
        self.name = f"bls_{os.getpid()}_{next(_names)}"
        self.size = size
        fd = os.memfd_create(self.name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
            self.memory = mmap.mmap(fd, size)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd

    def register(self, channel: LocalChannel) -> None:
        door = channel.fd_door
        if door is None:
            raise BlsError("UNAVAILABLE", "the server's BLS channel takes no memfd regions")
        try:
            tag = door.pass_fd(self.fd)
        finally:
            os.close(self.fd)
            self.fd = -1
        channel.submit({"op": "register", "name": self.name, "fd": tag, "offset": 0,
                        "byte_size": self.size}, _ignore)

    def unregister(self, channel: LocalChannel) -> None:
        if not channel.closed:
            channel.submit({"op": "unregister", "name": self.name}, _ignore)

    def viewed(self) -> bool:
        """Whether an array (an output handed to the model, or a view of one) still uses
        its memory: each holds a reference to the mapping; this object and the call's
        argument are the other two."""
        return sys.getrefcount(self.memory) > 2


class _RegionPool:
    """Registered regions kept for the next calls of a BLS client (see POOLED_REGIONS). A
    call takes one that no array of an earlier answer still views (the model may keep
    outputs as long as it likes) and gives it back once it was answered; a region of a call
    that failed (its request may still be running, e.g. past its timeout) is unregistered
    instead, as is one of a call whose tensors were large."""

    def __init__(self) -> None:
        self._free: list[_Memfd] = []
        self._lock = threading.Lock()

    def take(self, channel: LocalChannel) -> _Memfd:
        with self._lock:
            for index, region in enumerate(self._free):
                if not region.viewed():
                    return self._free.pop(index)
        region = _Memfd(OUTPUT_CAPACITY)
        region.register(channel)
        return region

    def give_back(self, channel: LocalChannel, regions: list[_Memfd], keep: bool) -> None:
        if not regions:
            return
        dropped = regions
        if keep and not channel.closed:
            with self._lock:
                room = POOLED_REGIONS - len(self._free)
                self._free.extend(regions[:max(room, 0)])
            dropped = regions[max(room, 0):]
        for region in dropped:
            region.unregister(channel)


def _ignore(reply: dict[str, Any] | None, error: ShmserveError | None) -> None:
    """Registration replies: a failed one fails the infer that names the region anyway."""


_Replies = deque[tuple[dict[str, Any] | None, ShmserveError | None]]


class BlsStream:
    """The responses of one streamed BLS request, in order, as they come; the last one is
    ``final``. Closing it before the final response cancels the request (the called model
    sees ``is_cancelled()``); it closes itself after the final one."""

    def __init__(self, channel: LocalChannel, request_id: int, replies: _Replies,
                 regions: list[_Memfd], deadline: float | None, ring: _Memfd) -> None:
        self._ring = ring
        self._ring_responses = 0  # responses taken out of the ring so far
        self._channel = channel
        self._request_id = request_id
        self._replies = replies
        self._regions = regions
        self._deadline = deadline
        self._done = False
        self._lock = threading.Lock()

    def __iter__(self) -> BlsStream:
        return self

    def __next__(self) -> BlsResponse:
        with self._lock:
            if self._done:
                raise StopIteration
            response = self._next()
            if response.final:
                self._finish(cancel=response.error is not None
                             and response.error.code == "DEADLINE_EXCEEDED")
            return response

    def _next(self) -> BlsResponse:
        replies = self._replies
        if not replies and not self._channel.wait(lambda: bool(replies), self._deadline):
            return BlsResponse({}, BlsError("DEADLINE_EXCEEDED", "Deadline Exceeded"), True)
        if not replies:
            return BlsResponse({}, BlsError("UNAVAILABLE", "the BLS channel to the server is "
                                                           "closed"), True)
        reply, error = replies.popleft()
        if error is not None or reply is None:
            return BlsResponse({}, BlsError(error.code.name if error else "UNAVAILABLE",
                                            error.message if error else "no reply"), True)
        final = not reply.get("more")
        if "end" in reply:  # the final flag alone: Triton's empty final response
            return BlsResponse({}, None, True)
        if "err" in reply:
            code, text = reply["err"]
            return BlsResponse({}, BlsError(code, text), final)
        try:
            return BlsResponse(read_reply_outputs(reply["out"], self._take(reply["out"])),
                               None, final)
        except ShmserveError as exc:
            return BlsResponse({}, BlsError(exc.code.name, exc.message), final)

    def _take(self, outputs: list[list[Any]]) -> dict[str, np.ndarray]:
        """Copies of the outputs the worker wrote into the ring's next slot, then the slot
        is handed back: the model may keep a response as long as it likes."""
        placed = [(name, datatype, shape) for name, datatype, shape, data in outputs
                  if data is None]
        if not placed:
            return {}
        sizes = [int(np.prod(shape, dtype=np.int64)) * to_numpy_dtype(datatype).itemsize
                 for _, datatype, shape in placed]
        offsets, _ = response_ring.output_offsets(sizes)
        start = response_ring.slot_offset(0, STREAM_SLOT_BYTES, STREAM_SLOTS,
                                          self._ring_responses)
        memory = self._ring.memory
        taken = {name: np.frombuffer(memory, np.uint8, size, start + at).copy()
                 for (name, _, _), at, size in zip(placed, offsets, sizes, strict=True)}
        self._ring_responses += 1
        struct.pack_into("<Q", memory, 0, self._ring_responses)
        return taken

    def close(self) -> None:
        with self._lock:
            if not self._done:
                self._finish(cancel=True)

    def _finish(self, cancel: bool) -> None:
        self._done = True
        if cancel:
            self._channel.cancel(self._request_id)
        for region in self._regions:
            region.unregister(self._channel)
        self._regions = []

    def __del__(self) -> None:
        if not self._done and not self._channel.closed:
            with contextlib.suppress(Exception):
                self.close()


class BlsClient:
    """One worker's door into the core; thread-safe (``async_exec`` runs in threads)."""

    def __init__(self, sock: socket.socket, model_name: str, instance_name: str,
                 instance_count: int) -> None:
        self._sock = sock
        self.model_name = model_name
        self.instance_name = instance_name
        self.instance_count = instance_count
        self._channel: LocalChannel | None = None
        self._lock = threading.Lock()
        self._pool = _RegionPool()
        #: The instance runs executions concurrently (async def execute): one awaiting a
        #: BLS answer leaves the instance free for others.
        self.concurrent = False

    def _open(self) -> LocalChannel:
        with self._lock:
            channel = self._channel
            if channel is None or channel.closed:
                if channel is not None:
                    raise BlsError("UNAVAILABLE", "the BLS channel to the server is closed")
                self._sock.settimeout(10.0)
                self._sock.sendall(CONNECT)
                channel = self._channel = LocalChannel.over(self._sock)
            return channel

    def check_target(self, model_name: str, blocking: bool) -> None:
        """Fail where Triton would hang: the only instance of a model waiting on itself
        (``blocking``: the caller holds the instance while it waits, as ``exec`` does; an
        awaited ``async_exec`` of a concurrent instance does not)."""
        if model_name == self.model_name and self.instance_count <= 1 \
                and (blocking or not self.concurrent):
            raise BlsError(
                "INVALID_ARGUMENT",
                f"BLS request to model '{model_name}' from its own only instance would "
                f"deadlock: the instance waits for itself (give the model more instances in "
                f"instance_group, or call another model)")

    def chain(self, model_name: str, blocking: bool) -> str:
        """The chain a request to ``model_name`` carries; raises BlsError when every instance
        of that model already waits in it (the request could never run: Triton hangs)."""
        chain = current_chain.get()
        if blocking or not self.concurrent:
            own = f"{self.model_name}|{self.instance_name}|{self.instance_count}"
            chain = f"{chain},{own}" if chain else own
        if not chain:
            return ""
        held: set[str] = set()
        instances = 0
        path: list[str] = []
        for entry in chain.split(","):
            parts = entry.rsplit("|", 2)
            if len(parts) != 3 or not parts[2].isdigit():
                continue  # not ours (a client may send any parameter): ignored
            model, instance, count = parts
            path.append(model)
            if model == model_name:
                held.add(instance)
                instances = int(count)
        if held and len(held) >= instances:
            raise BlsError(
                "UNAVAILABLE",
                f"BLS request to model '{model_name}' would deadlock: all {instances} "
                f"instance(s) of it wait for this chain of BLS calls "
                f"({' -> '.join([*path, model_name])}) to be answered (give '{model_name}' "
                f"more instances, or break the cycle)")
        return chain

    def channel(self) -> LocalChannel:
        """The channel into the core (opened on first use); raises BlsError."""
        try:
            return self._open()
        except (OSError, ShmserveError) as exc:
            raise BlsError("UNAVAILABLE", f"cannot open the BLS channel to the server: "
                                          f"{exc}") from None

    def _start(self, request: BlsRequest, blocking: bool) -> tuple[LocalChannel, str]:
        """Checks before a BLS call (target, deadlock chain), then the channel to send it on."""
        self.check_target(request.model_name, blocking)
        chain = self.chain(request.model_name, blocking)
        return self.channel(), chain

    def infer(self, request: BlsRequest, blocking: bool = True) -> dict[str, np.ndarray]:
        """Run ``request`` through the core; raises BlsError with Triton's code and text."""
        channel, chain = self._start(request, blocking)
        regions: list[_Memfd] = []
        pooled: list[_Memfd] = []
        keep = False
        try:
            message, region_outputs = self._message(channel, request, regions, pooled=pooled)
            if chain:
                message.setdefault("p", {})[CHAIN_PARAMETER] = chain
            timeout = request.timeout_us / 1e6 if request.timeout_us > 0 else None
            if timeout is not None:
                message["t"] = timeout
            try:
                reply = channel.call(message, timeout)
            except ShmserveError as exc:
                raise BlsError(exc.code.name, exc.message) from None
            except MessageTooLarge as exc:
                raise BlsError("RESOURCE_EXHAUSTED", f"BLS request to model "
                                                     f"'{request.model_name}': {exc}") from None
            try:
                outputs = read_reply_outputs(reply["out"], region_outputs)
            except ShmserveError as exc:
                raise BlsError(exc.code.name, exc.message) from None
            keep = all(array.dtype != object and array.nbytes <= POOLED_BYTES
                       for name, array in outputs.items() if name in region_outputs)
            return outputs
        finally:
            for region in regions:
                region.unregister(channel)
            self._pool.give_back(channel, pooled, keep)

    def stream(self, request: BlsRequest, blocking: bool = True) -> BlsStream:
        """Run ``request`` as a streamed request (``exec(decoupled=True)``): its responses in
        order, the last one ``final`` (an empty one when the model sent the final flag
        alone). A failure to send it raises BlsError; a failure after that is a response
        with ``error``. Closing the iterator early cancels the request."""
        channel, chain = self._start(request, blocking)
        regions: list[_Memfd] = []
        try:
            # The outputs go into a response ring of the caller's (each response in the next
            # slot, taken out before the slot is handed back): never through the supervisor.
            message, _ = self._message(channel, request, regions, output_regions=False)
            message["s"] = True
            ring = _Memfd(response_ring.ring_bytes(STREAM_SLOT_BYTES, STREAM_SLOTS))
            regions.append(ring)
            ring.register(channel)
            message.setdefault("p", {}).update({
                response_ring.REGION: ring.name, response_ring.OFFSET: 0,
                response_ring.SLOT_BYTES: STREAM_SLOT_BYTES,
                response_ring.SLOTS: STREAM_SLOTS})
            if chain:
                message.setdefault("p", {})[CHAIN_PARAMETER] = chain
            deadline = None
            if request.timeout_us > 0:
                message["t"] = request.timeout_us / 1e6
                deadline = time.monotonic() + request.timeout_us / 1e6
            replies: _Replies = deque()
            try:
                request_id = channel.submit(message, lambda reply, error: replies.append(
                    (reply, error)), deadline)
            except ShmserveError as exc:
                raise BlsError(exc.code.name, exc.message) from None
            except MessageTooLarge as exc:
                raise BlsError("RESOURCE_EXHAUSTED", f"BLS request to model "
                                                     f"'{request.model_name}': {exc}") from None
        except BaseException:
            for region in regions:
                region.unregister(channel)
            raise
        return BlsStream(channel, request_id, replies, regions, deadline, ring)

    def _message(self, channel: LocalChannel, request: BlsRequest, regions: list[_Memfd],
                 output_regions: bool = True, pooled: list[_Memfd] | None = None
                 ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """The infer message; the regions it uses are added to ``regions`` (its own, to
        unregister after the call) or, given ``pooled``, to that (the pool's)."""
        inputs: list[list[Any]] = []
        for name, value in request.inputs:
            try:
                datatype, shape, data = output_bytes(value)
            except (TypeError, ValueError) as exc:
                raise BlsError("INVALID_ARGUMENT", f"input '{name}': {exc}") from None
            nbytes = len(data)
            if nbytes <= INLINE_LIMIT:
                inputs.append([name, datatype, shape, "b", _host_bytes(data)])
                continue
            if pooled is not None and nbytes <= POOLED_BYTES:
                region = self._pool.take(channel)
                pooled.append(region)
            else:
                region = _Memfd(nbytes)
                regions.append(region)
            target = memoryview(region.memory)
            if isinstance(data, DeviceOutput):
                data.write_to(target[:nbytes])  # one device-to-host copy
            else:
                target[:nbytes] = data  # the one copy of the input's bytes
            target.release()
            if region.fd >= 0:
                region.register(channel)
            inputs.append([name, datatype, shape, "r", region.name, 0, nbytes])
        outputs: list[list[Any]] = []
        region_outputs: dict[str, np.ndarray] = {}
        for name in request.requested_outputs:
            if not output_regions:
                outputs.append([name])
                continue
            if pooled is not None:
                region = self._pool.take(channel)
                pooled.append(region)
            else:
                region = _Memfd(OUTPUT_CAPACITY)
                regions.append(region)
                region.register(channel)
            outputs.append([name, region.name, 0, OUTPUT_CAPACITY])
            region_outputs[name] = np.frombuffer(region.memory, dtype=np.uint8)
        message: dict[str, Any] = {"op": "infer", "model": request.model_name,
                                   "version": _version(request.model_version),
                                   "rid": request.request_id, "in": inputs, "out": outputs}
        parameters = dict(request.parameters or {})
        if request.correlation_id:
            parameters["sequence_id"] = request.correlation_id
        if parameters:
            message["p"] = parameters
        return message, region_outputs


def _host_bytes(data: memoryview | bytes | DeviceOutput) -> bytes:
    if isinstance(data, DeviceOutput):
        host = bytearray(len(data))
        data.write_to(memoryview(host))
        return bytes(host)
    return bytes(data)


def _version(version: int) -> str:
    return "" if version is None or int(version) < 0 else str(int(version))


_client: BlsClient | None = None


def install(sock: socket.socket | None, model_name: str, instance_name: str,
            instance_count: int) -> None:
    """Called once by the worker at start, before any hook runs."""
    global _client
    _client = BlsClient(sock, model_name, instance_name, instance_count) \
        if sock is not None else None


_waiters: concurrent.futures.ThreadPoolExecutor | None = None
_waiters_lock = threading.Lock()
#: Threads that wait for ``async_exec`` answers: they only wait, so many are cheap (the
#: loop's default executor has cpu + 4, which would bound the calls in flight).
WAITING_THREADS = 64


def waiters() -> concurrent.futures.ThreadPoolExecutor:
    global _waiters
    with _waiters_lock:
        if _waiters is None:
            _waiters = concurrent.futures.ThreadPoolExecutor(WAITING_THREADS,
                                                             thread_name_prefix="bls")
        return _waiters


def chain_of(parameters: list[dict[str, Any]]) -> str:
    """The BLS chain of an execution's requests (their parameters): the instances their
    callers hold. Empty for requests that no BLS call sent."""
    chains = [p[CHAIN_PARAMETER] for p in parameters if p and CHAIN_PARAMETER in p]
    return ",".join(chain for chain in chains if isinstance(chain, str))


def client() -> BlsClient:
    if _client is None:
        raise BlsError("UNAVAILABLE", "BLS is not available in this process (it runs only "
                                      "inside a shmserve worker)")
    return _client


def infer(request: BlsRequest, blocking: bool = True) -> dict[str, np.ndarray]:
    return client().infer(request, blocking)


def stream(request: BlsRequest, blocking: bool = True) -> BlsStream:
    return client().stream(request, blocking)


def set_concurrent(concurrent: bool) -> None:
    """The worker's backend runs executions concurrently (after its initialize hooks)."""
    if _client is not None:
        _client.concurrent = concurrent


__all__ = [
    "BlsClient",
    "BlsError",
    "BlsRequest",
    "BlsResponse",
    "BlsStream",
    "chain_of",
    "client",
    "current_chain",
    "infer",
    "install",
    "set_concurrent",
    "stream",
    "waiters",
]

