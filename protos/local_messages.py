"""The local channel's messages: what client, daemon and workers put into its rings.

Every message is a msgpack map (packed with ``use_bin_type=True``) in a ring of
``local_ring.py``; after publishing, the producer sends ``DOORBELL`` on the channel's Unix
socket.

Handshake (on the socket, once): the server sends ``HANDSHAKE_LENGTH`` (u32, little endian)
and a ``server_hello`` map, with the channel's memfd and its *fd door* as SCM_RIGHTS
(``[memfd, door]``; a client that knows no door closes the second fd)::

    {"v": PROTOCOL_VERSION, "channel": id, "ring_bytes": n, "size": memfd bytes,
     "direct": [direct rings, bytes per direct ring], "grpc": "host:port", "fd_door": 1}

The fd door is one end of a SOCK_SEQPACKET socketpair, private to the channel. Over it the
client passes the memfds of its regions: one datagram each, ``FD_TAG`` (u64, little endian,
a number the client chose, unique on the channel) with exactly one fd as SCM_RIGHTS, sent
before the "register" message that names that tag (daemon/frontend/local_fds.py checks it:
sealed against shrinking, not against writes, open read-write, big enough).

Requests (client -> server, request ring); every one carries ``"id"`` (the client's number,
echoed in the reply) and ``"op"``:

    infer       "model", "version", "rid" (request id), "in", "out", "p" (parameters),
                "t" (deadline in seconds, optional), "s" (True: a stream's request,
                which may have several replies: decoupled models)
                "in":  [name, datatype, shape, INPUT_REGION, region, offset, byte size]
                       or [name, datatype, shape, INPUT_BYTES, bytes]
                "out": [name] or [name, region, offset, byte size]
    register    "name", "key", "offset", "byte_size"      (a system region, channel scope)
                or "name", "fd", "offset", "byte_size"    (a sealed memfd passed over the fd
                door under tag "fd"; status shows it with key "")
    unregister  "name" ("" = all of the channel's)
    status      "name" ("" = all)
    ping
    hello       "direct": True -- the client reads the direct rings (``client_hello``)
    cancel      "target": the id of a request the client gave up (a stream closed early):
                it is dropped or cancelled for its model, and gets no further reply
    model       (BLS channels only: a worker's pb_utils.load_model / unload_model /
                is_model_ready) "action" ("load", "unload" or "ready"), "name",
                "version" (ready), "config" (load: JSON text, "" = none), "files"
                (load: {"file:<path>": bytes}), "dependents" (unload) -- ``ModelControl``

Replies (server or worker -> client, response ring or a direct ring):

    infer       {"id", "model_version", "out": [[name, datatype, shape, bytes or None]]}
                (None: the output was written into the requested region)
    status      {"id", "regions": [[name, key, offset, byte size], ...]}
    model       {"id", "ready": bool} for "ready"; {"id"} otherwise
    others      {"id"}
    refused     {"id", "err": [grpc status code name, message]}  (``error_reply``)

A streamed request ("s") of a decoupled model has any number of replies: those with
``"more": True`` (an infer reply or an error reply) are followed by others; the last is an
infer or error reply without "more", or ``{"id", "end": True, "empty": bool}`` (the final flag
alone; "empty": the request asked for an empty final response).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

PROTOCOL_VERSION = 2
HANDSHAKE_LENGTH = struct.Struct("<I")
DOORBELL = b"\x01"
FD_TAG = struct.Struct("<Q")

OP_INFER = "infer"
OP_REGISTER = "register"
OP_UNREGISTER = "unregister"
OP_STATUS = "status"
OP_PING = "ping"
OP_HELLO = "hello"
OP_CANCEL = "cancel"
OP_MODEL = "model"

INPUT_REGION = "r"   # the input's bytes lie in a registered region
INPUT_BYTES = "b"    # the bytes travel in the message (the server reads any marker but "r" so)


def server_hello(channel: int, ring_bytes: int, size: int, direct_rings: int,
                 direct_bytes: int, grpc_address: str, fd_door: bool = False
                 ) -> dict[str, Any]:
    hello: dict[str, Any] = {"v": PROTOCOL_VERSION, "channel": channel,
                             "ring_bytes": ring_bytes, "size": size,
                             "direct": [direct_rings, direct_bytes], "grpc": grpc_address}
    if fd_door:
        hello["fd_door"] = 1
    return hello


def client_hello() -> dict[str, Any]:
    """The client's first message: it reads the direct rings (workers may answer into them)."""
    return {"op": OP_HELLO, "id": 0, "direct": True}


def infer_reply(request_id: int, model_version: str, outputs: list[list[Any]]
                ) -> dict[str, Any]:
    """``outputs``: [name, datatype, shape, bytes or None] each."""
    return {"id": request_id, "model_version": model_version, "out": outputs}


def error_reply(request_id: int, code: str, message: str) -> dict[str, Any]:
    return {"id": request_id, "err": [code, message]}


def end_reply(request_id: int, empty: bool) -> dict[str, Any]:
    """A streamed request's final flag alone (``empty``: show it as an empty response)."""
    return {"id": request_id, "end": True, "empty": empty}


def status_reply(request_id: int, regions: list[list[Any]]) -> dict[str, Any]:
    return {"id": request_id, "regions": regions}


def ok_reply(request_id: int) -> dict[str, Any]:
    return {"id": request_id}


def ready_reply(request_id: int, ready: bool) -> dict[str, Any]:
    """The answer to a "model" operation asking whether a model is ready."""
    return {"id": request_id, "ready": ready}


MODEL_ACTIONS = ("load", "unload", "ready")


@dataclass(frozen=True, slots=True)
class ModelControl:
    """A worker's model-control call (the "model" operation): Triton's python-backend model
    loading API, which only explicit model control mode allows."""

    action: str
    name: str
    version: str = ""
    config: str = ""
    files: dict[str, bytes] = field(default_factory=dict)
    dependents: bool = False

    def message(self) -> dict[str, Any]:
        """The request (the channel sets its "id")."""
        return {"op": OP_MODEL, "action": self.action, "name": self.name,
                "version": self.version, "config": self.config, "files": self.files,
                "dependents": self.dependents}

    @classmethod
    def from_message(cls, message: dict[str, Any]) -> ModelControl:
        """Raises TypeError or ValueError for a malformed message."""
        action, name, version = message["action"], message["name"], message["version"]
        config, files, dependents = message["config"], message["files"], message["dependents"]
        if action not in MODEL_ACTIONS:
            raise ValueError(f"unknown model action {action!r}")
        if not all(type(value) is str for value in (name, version, config)) \
                or type(dependents) is not bool or not isinstance(files, dict) \
                or not all(type(k) is str and type(v) is bytes for k, v in files.items()):
            raise TypeError("malformed model control message")
        return cls(action, name, version, config, files, dependents)
