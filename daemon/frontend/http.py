"""The HTTP/REST door: the KServe v2 REST protocol with Triton's extensions, on aiohttp.

It holds the core (inference) and the door-neutral operations (daemon/operations.py) and
nothing of another door. Errors answer ``{"error": "<text>"}`` with the text the gRPC door
sends and the status Triton's HTTP endpoint uses for the code (see ``HTTP_STATUS``); a body
that is not JSON is a 400 (Triton 2.51 answers 500 there; the client's request is what is
wrong). Endpoints: docs/http.md.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import zlib
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from aiohttp import web
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

from shmserve.daemon.aiohttp_site import start_site
from shmserve.daemon.core import Core
from shmserve.daemon.core_access import CoreAccess
from shmserve.daemon.errors import ServeError, internal, invalid_argument
from shmserve.daemon.frontend.http_infer import (
    HEADER_LENGTH,
    HttpInfer,
    binary_rule,
    compact_json,
    parse_generate,
    parse_infer,
    render_generate,
    render_response,
    split_body,
)
from shmserve.daemon.header_forward import Headers, forwarder, with_headers
from shmserve.daemon.infer_request import RequestItems
from shmserve.daemon.operations import Operations
from shmserve.daemon.reply import FutureReply, Reply
from shmserve.daemon.request import InferRequest, OutputTensor
from shmserve.daemon.restrictions import Restriction, restriction_for
from shmserve.daemon.stream_budget import StreamBudget
from shmserve.workers.shm import Pieces

log = logging.getLogger("shmserve.http")

# Triton's HTTP status for each error code (http_server.cc HttpCodeFromError).
HTTP_STATUS = {
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 413,
}
JSON_TYPE = "application/json"
BINARY_TYPE = "application/octet-stream"
# Responses up to this size are sent as one joined body; larger ones write the outputs' bytes
# as they are, after the JSON header.
SMALL_RESPONSE = 64 << 10
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_response(status: int, message: str) -> web.Response:
    return web.Response(status=status, content_type=JSON_TYPE,
                        body=json.dumps({"error": message}).encode())


def _json(value: Any) -> web.Response:
    return web.Response(content_type=JSON_TYPE,
                        body=compact_json(value).encode())


def message_json(message: Message) -> dict[str, Any]:
    """A protobuf message as Triton's HTTP endpoint writes it: proto field names, every
    field, and 64-bit integers as JSON numbers (protobuf's printer makes them strings)."""
    value: dict[str, Any] = MessageToDict(message, preserving_proto_field_name=True,
                                          always_print_fields_with_no_presence=True)
    return _numbers(message, value)


def _numbers(message: Message, value: dict[str, Any]) -> dict[str, Any]:
    for field in message.DESCRIPTOR.fields:
        name = field.name
        if name not in value:
            continue
        if field.message_type is not None:
            if field.message_type.GetOptions().map_entry:
                entry_value = field.message_type.fields_by_name["value"]
                if entry_value.message_type is not None:
                    mapping = getattr(message, name)
                    value[name] = {k: _numbers(mapping[k], v) for k, v in value[name].items()}
                continue
            items = getattr(message, name)
            if field.label == field.LABEL_REPEATED:
                value[name] = [_numbers(m, v) for m, v in zip(items, value[name], strict=True)]
            else:
                value[name] = _numbers(items, value[name])
        elif field.cpp_type in (field.CPPTYPE_INT64, field.CPPTYPE_UINT64):
            raw = value[name]
            value[name] = [int(v) for v in raw] if isinstance(raw, list) else int(raw)
    return value


class _OneResponseReply(FutureReply):
    """generate: exactly one response, also from a decoupled model (which may send it with
    the final flag or before the final flag alone); more, or none, is an error."""

    __slots__ = ("response",)

    def __init__(self, future: asyncio.Future[list[OutputTensor]]) -> None:
        super().__init__(future)
        self.response: list[OutputTensor] | None = None

    def send(self, response: list[OutputTensor], final: bool) -> None:
        if self.response is not None:
            self.fail(invalid_argument("generate expects exactly one response, the model sent "
                                       "more; use generate_stream"))
            return
        self.response = response
        if final:
            super().send(response, True)

    def end(self) -> None:
        if self.response is None:
            self.fail(invalid_argument("generate expects exactly one response, the model sent "
                                       "none"))
        else:
            super().send(self.response, True)


class _EventReply(Reply):
    """A generate_stream request's reply: each response rendered as a server-sent event. A
    client that lets more than ``limit`` events wait gets an error event and the end."""

    __slots__ = ("budget", "overflowed", "queue")

    def __init__(self, budget: StreamBudget) -> None:
        self.request = None
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.budget = budget
        self.overflowed = False

    def _put(self, event: bytes, final: bool) -> None:
        if self.overflowed:
            return
        if not self.budget.admit(len(event)):
            self.overflowed = True
            while not self.queue.empty():
                self.queue.get_nowait()
            event = _event({"error": f"the client reads its responses slower than they are "
                                     f"produced: more than {self.budget.describe()} were "
                                     f"waiting; the stream was ended"})
            final = True
        self.queue.put_nowait(event)
        if final:
            self.queue.put_nowait(None)

    async def next_event(self) -> bytes | None:
        event = await self.queue.get()
        if event is not None and not self.overflowed:
            self.budget.released(len(event))
        return event

    def send(self, response: list[OutputTensor], final: bool) -> None:
        assert self.request is not None
        self._put(b"data: " + render_generate(self.request, response) + b"\n\n", final)

    def send_error(self, error: ServeError, final: bool) -> None:
        self._put(_event({"error": error.message}), final)

    def fail(self, error: ServeError) -> None:
        self.send_error(error, True)

    def end(self) -> None:
        if not self.overflowed:
            self.queue.put_nowait(None)


def _event(value: dict[str, Any]) -> bytes:
    return b"data: " + compact_json(value).encode() + b"\n\n"


def _errors(handler: Handler, restriction: Restriction | None) -> Handler:
    """The handler with its errors answered as Triton's, behind its group's restriction
    (--http-restricted-api) if it has one."""
    refusal = None if restriction is None else \
        f"This API is restricted, expecting header '{restriction.header}'"

    async def handle(request: web.Request) -> web.StreamResponse:
        if restriction is not None and not restriction.allows(request.headers.get):
            return error_response(403, refusal or "")
        try:
            return await handler(request)
        except ServeError as exc:
            return error_response(HTTP_STATUS.get(exc.code, 400), exc.message)
        except web.HTTPRequestEntityTooLarge as exc:
            return error_response(413, f"the request body is larger than the server's limit "
                                       f"(--http-max-body-bytes): {exc.text}")
        except web.HTTPException:
            raise
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("HTTP request failed")
            return error_response(500, f"{type(exc).__name__}: {exc}")

    return handle


class HttpDoor:
    def __init__(self, core: CoreAccess) -> None:
        # In a frontend process (--grpc-frontends) ``core`` is the link to the core: only
        # inference runs there, everything else is forwarded (frontend_process/http_proxy.py).
        self.core = core
        self._operations: Operations | None = None
        self._forward = forwarder(core.settings.http_header_forward_pattern)
        self.max_body = core.settings.http_max_body_bytes
        self._runner: web.AppRunner | None = None
        self.bound_port: int | None = None
        # asyncio.get_running_loop() costs a getpid syscall per call in CPython 3.11.
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def operations(self) -> Operations:
        if self._operations is None:
            if not isinstance(self.core, Core):
                raise internal("this operation runs in the core process only")
            self._operations = Operations(self.core)
        return self._operations

    # --- life -------------------------------------------------------------------------
    def application(self) -> web.Application:
        app = web.Application(client_max_size=self.max_body, handler_args={
            "max_line_size": self.core.settings.http_max_header_bytes,
            "max_field_size": self.core.settings.http_max_header_bytes,
            # aiohttp closes a connection whose handler still waits for a complete request
            # this long after the connection opened or after its last response.
            "keepalive_timeout": self.core.settings.http_idle_secs})
        get, post = web.get, web.post
        model = "/v2/models/{model}"
        versioned = "/v2/models/{model}/versions/{version}"
        groups: list[tuple[str, list[web.RouteDef]]] = [
            ("health", [get("/v2/health/live", self.live), get("/v2/health/ready", self.ready)]),
            ("metadata", [get("/v2", self.server_metadata)]),
            ("statistics", [get("/v2/models/stats", self.statistics)]),
            ("model-repository", [
                post("/v2/repository/index", self.repository_index),
                post("/v2/repository/models/{model}/load", self.load),
                post("/v2/repository/models/{model}/unload", self.unload)]),
            ("shared-memory", [
                get("/v2/systemsharedmemory/status", self.system_status),
                get("/v2/systemsharedmemory/region/{region}/status", self.system_status),
                post("/v2/systemsharedmemory/region/{region}/register", self.system_register),
                post("/v2/systemsharedmemory/unregister", self.system_unregister),
                post("/v2/systemsharedmemory/region/{region}/unregister",
                     self.system_unregister),
                get("/v2/cudasharedmemory/status", self.cuda_status),
                get("/v2/cudasharedmemory/region/{region}/status", self.cuda_status),
                post("/v2/cudasharedmemory/region/{region}/register", self.cuda_register),
                post("/v2/cudasharedmemory/unregister", self.cuda_unregister),
                post("/v2/cudasharedmemory/region/{region}/unregister", self.cuda_unregister)]),
            ("logging", [get("/v2/logging", self.logging), post("/v2/logging", self.logging)]),
            ("trace", [get("/v2/trace/setting", self.trace),
                       post("/v2/trace/setting", self.trace)]),
        ]
        for prefix in (model, versioned):
            # aiohttp tries a path's dynamic routes in the order they were added:
            # inference, the one route per request under load, first.
            groups += [
                ("inference", [post(f"{prefix}/infer", self.infer),
                               post(f"{prefix}/generate", self.generate),
                               post(f"{prefix}/generate_stream", self.generate_stream)]),
                ("metadata", [get(prefix, self.model_metadata)]),
                ("health", [get(f"{prefix}/ready", self.model_ready)]),
                ("model-config", [get(f"{prefix}/config", self.model_config)]),
                ("statistics", [get(f"{prefix}/stats", self.statistics)]),
                ("trace", [get(f"{prefix}/trace/setting", self.trace),
                           post(f"{prefix}/trace/setting", self.trace)]),
            ]
        rules = self.core.settings.http_restricted_apis
        routes = [web.route(r.method, r.path, _errors(r.handler, restriction_for(rules, group)))
                  for group, defs in groups for r in defs]
        routes.append(web.route("*", "/{path:.*}", _errors(self.unknown_path, None)))
        app.add_routes(routes)
        return app

    async def start(self, address: str, port: int) -> int:
        self._runner, self.bound_port = await start_site(
            self.application(), address, port,
            shutdown_timeout=self.core.settings.exit_timeout_secs, reuse_address=True,
            reuse_port=self.core.settings.reuse_http_port)
        return self.bound_port

    async def stop(self) -> None:
        """Stop accepting, let requests in progress finish (up to --exit-timeout-secs),
        close. The core has drained by then: requests arriving meanwhile got 503."""
        if self._runner is not None:
            await self._runner.shutdown()
            await self._runner.cleanup()
            self._runner = None

    # --- helpers ------------------------------------------------------------------------
    @staticmethod
    async def _body_json(request: web.Request) -> dict[str, Any]:
        body = await request.read()
        if not body:
            return {}
        try:
            value = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise invalid_argument(f"failed to parse the request JSON buffer: {exc}") from None
        if not isinstance(value, dict):
            raise invalid_argument("failed to parse the request JSON buffer: the request "
                                   "must be a JSON object")
        return value

    @staticmethod
    def _version(request: web.Request) -> str:
        return request.match_info.get("version", "")

    async def unknown_path(self, request: web.Request) -> web.StreamResponse:
        return error_response(404, f"Not Found: {request.method} {request.path[:256]}")

    # --- health and metadata ------------------------------------------------------------
    async def live(self, request: web.Request) -> web.StreamResponse:
        return web.Response(status=200 if self.operations.server_live() else 400)

    async def ready(self, request: web.Request) -> web.StreamResponse:
        return web.Response(status=200 if self.operations.server_ready() else 400)

    async def model_ready(self, request: web.Request) -> web.StreamResponse:
        ready = self.operations.model_ready(request.match_info["model"], self._version(request))
        return web.Response(status=200 if ready else 400)

    async def server_metadata(self, request: web.Request) -> web.StreamResponse:
        return _json(message_json(self.operations.server_metadata()))

    async def model_metadata(self, request: web.Request) -> web.StreamResponse:
        return _json(message_json(self.operations.model_metadata(
            request.match_info["model"], self._version(request))))

    async def model_config(self, request: web.Request) -> web.StreamResponse:
        return _json(message_json(self.operations.model_config(
            request.match_info["model"], self._version(request))))

    async def statistics(self, request: web.Request) -> web.StreamResponse:
        return _json(message_json(self.operations.model_statistics(
            request.match_info.get("model", ""), self._version(request))))

    # --- repository ---------------------------------------------------------------------
    async def repository_index(self, request: web.Request) -> web.StreamResponse:
        body = await self._body_json(request)
        index = self.operations.repository_index(bool(body.get("ready", False)))
        return _json([{key: value for key, value in message_json(entry).items() if value != ""
                       or key == "name"} for entry in index.models])

    async def load(self, request: web.Request) -> web.StreamResponse:
        body = await self._body_json(request)
        parameters = body.get("parameters", {})
        if not isinstance(parameters, dict):
            raise invalid_argument("'parameters' must be a JSON object")
        loaded: list[tuple[str, Any, str]] = []
        for key, value in parameters.items():
            if key.startswith("file:") and isinstance(value, str):
                try:
                    loaded.append((key, base64.b64decode(value, validate=True), "bytes_param"))
                except (binascii.Error, ValueError):
                    raise invalid_argument(f"load parameter '{key}' must be base64") from None
            elif key == "config" and isinstance(value, str):
                loaded.append((key, value, "string_param"))
            else:
                loaded.append((key, value, _parameter_kind(value)))
        await self.operations.load_model(request.match_info["model"], loaded)
        return web.Response()

    async def unload(self, request: web.Request) -> web.StreamResponse:
        parameters = (await self._body_json(request)).get("parameters", {})
        dependents = parameters.get("unload_dependents", False) \
            if isinstance(parameters, dict) else None
        if not isinstance(dependents, bool):
            raise invalid_argument("'unload_dependents' must be a boolean in the object "
                                   "'parameters'")
        await self.operations.unload_model(request.match_info["model"], dependents)
        return web.Response()

    # --- shared memory (the anonymous scope, like tritonclient over gRPC) ---------------
    async def system_status(self, request: web.Request) -> web.StreamResponse:
        status = self.operations.system_shm_status(request.match_info.get("region", ""))
        return _json([message_json(region) for region in status.regions.values()])

    async def system_register(self, request: web.Request) -> web.StreamResponse:
        body = await self._body_json(request)
        key = body.get("key")
        offset, byte_size = body.get("offset", 0), body.get("byte_size", -1)
        if not isinstance(key, str) or not _count(offset) or not _count(byte_size):
            raise invalid_argument("a system shared-memory registration needs 'key' (string), "
                                   "'offset' and 'byte_size' (non-negative integers)")
        self.operations.system_shm_register(request.match_info["region"], key, offset,
                                            byte_size, "")
        return web.Response()

    async def system_unregister(self, request: web.Request) -> web.StreamResponse:
        self.operations.shm_unregister("system", request.match_info.get("region", ""), "")
        return web.Response()

    async def cuda_status(self, request: web.Request) -> web.StreamResponse:
        status = self.operations.cuda_shm_status(request.match_info.get("region", ""))
        return _json([message_json(region) for region in status.regions.values()])

    async def cuda_register(self, request: web.Request) -> web.StreamResponse:
        body = await self._body_json(request)
        handle = body.get("raw_handle")
        encoded = handle.get("b64") if isinstance(handle, dict) else None
        device_id, byte_size = body.get("device_id", 0), body.get("byte_size", -1)
        if not isinstance(encoded, str) or not _count(device_id) or not _count(byte_size):
            raise invalid_argument("a CUDA shared-memory registration needs 'raw_handle' "
                                   "({\"b64\": ...}), 'device_id' and 'byte_size' "
                                   "(non-negative integers)")
        try:
            raw = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise invalid_argument("'raw_handle' of a CUDA shared-memory registration must "
                                   "be base64") from None
        self.operations.cuda_shm_register(request.match_info["region"], raw, device_id,
                                          byte_size, "")
        return web.Response()

    async def cuda_unregister(self, request: web.Request) -> web.StreamResponse:
        self.operations.shm_unregister("cuda", request.match_info.get("region", ""), "")
        return web.Response()

    # --- logging and trace --------------------------------------------------------------
    async def logging(self, request: web.Request) -> web.StreamResponse:
        updates = []
        if request.method == "POST":
            body = await self._body_json(request)
            for key, value in body.items():
                kind = "uint32_param" if _count(value) else _parameter_kind(value)
                updates.append((key, value, kind))
        return _json(self.operations.update_log_settings(updates))

    async def trace(self, request: web.Request) -> web.StreamResponse:
        """Triton's trace setting: values are strings (trace_level a list of them), null
        clears a field."""
        updates: dict[str, list[str] | None] = {}
        if request.method == "POST":
            for key, value in (await self._body_json(request)).items():
                if value is None:
                    updates[key] = None
                elif isinstance(value, list):
                    updates[key] = [str(item) for item in value]
                else:
                    updates[key] = [str(value)]
        answer = self.operations.trace_setting(request.match_info.get("model", ""), updates)
        return _json({key: values if key == "trace_level" else values[0]
                      for key, values in answer.items()})

    async def _run(self, model: str, version: str, parse: Callable[[], RequestItems],
                   one_of_many: bool = False) -> tuple[InferRequest, list[OutputTensor]]:
        """``one_of_many``: a decoupled model may answer, with exactly one response."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        future: asyncio.Future[list[OutputTensor]] = loop.create_future()
        reply = _OneResponseReply(future) if one_of_many else FutureReply(future)
        internal = self.core.submit(model, version, parse, reply, streaming=one_of_many)
        try:
            return internal, await future
        except asyncio.CancelledError:
            self.core.cancel(internal)  # the client went away
            raise
        finally:
            # The request and its reply point at each other: unlinked, reference counting
            # frees the request (tensors, outputs, body views) when the handler returns
            # instead of leaving a cycle per request to the garbage collector.
            reply.request = None

    async def generate(self, request: web.Request) -> web.StreamResponse:
        """Triton's generate extension, one response (generate_stream: the streaming issue)."""
        model, version = request.match_info["model"], self._version(request)
        body = await self._body_json(request)
        config = self.operations.model_config(model, version)
        headers = self._headers(request)
        internal, outputs = await self._run(
            model, version, lambda: with_headers(parse_generate(model, body, config), headers),
            one_of_many=True)
        return web.Response(body=render_generate(internal, outputs), content_type=JSON_TYPE)

    async def generate_stream(self, request: web.Request) -> web.StreamResponse:
        """Triton's generate_stream: each response as a server-sent event (``data: {...}``),
        an error as ``data: {"error": ...}``; the stream ends after the final response."""
        model, version = request.match_info["model"], self._version(request)
        body = await self._body_json(request)
        config = self.operations.model_config(model, version)
        settings = self.core.settings
        events = _EventReply(StreamBudget(settings.stream_max_pending_responses,
                                          settings.stream_max_pending_bytes))
        headers = self._headers(request)
        internal = self.core.submit(
            model, version, lambda: with_headers(parse_generate(model, body, config), headers),
            events, streaming=True)
        answer = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8",
                                             "Cache-Control": "no-cache"})
        try:
            await answer.prepare(request)
            while (event := await events.next_event()) is not None:
                await answer.write(event)
        except BaseException:  # the client went away (or the server is closing)
            self.core.cancel(internal)
            raise
        if events.overflowed:
            self.core.cancel(internal)
        await answer.write_eof()
        return answer

    # --- inference ----------------------------------------------------------------------
    def _headers(self, request: web.Request) -> Headers | None:
        """The request's headers to forward as request parameters (None without a
        pattern)."""
        if self._forward is None:
            return None
        return self._forward.pick(request.headers.items())

    async def infer(self, request: web.Request) -> web.StreamResponse:
        model, version = request.match_info["model"], self._version(request)
        body = await read_body(request, self.max_body)
        header_length = request.headers.get(HEADER_LENGTH)
        headers = self._headers(request)
        parsed: list[HttpInfer] = []

        def parse() -> RequestItems:
            # Called by the core once the model is known (an unknown model is a 404 first).
            header, binary = split_body(body, header_length)
            parsed.append(parse_infer(model, header, binary))
            return with_headers(parsed[0].items, headers)

        internal, outputs = await self._run(model, version, parse)
        head, parts = render_response(internal, outputs, binary_rule(parsed[0]))
        if "Accept-Encoding" in request.headers:
            encoding = _pick_encoding(request.headers["Accept-Encoding"])
            if encoding is not None:
                return _compressed(head, parts, encoding)
        if not parts:
            return web.Response(body=head, content_type=JSON_TYPE)
        size = len(head)
        for part in parts:
            size += len(part)
        if size <= SMALL_RESPONSE:  # one write beats several for small answers
            return web.Response(body=b"".join([head, *parts]), headers={
                "Content-Type": BINARY_TYPE, HEADER_LENGTH: str(len(head))})
        response = web.StreamResponse(headers={HEADER_LENGTH: str(len(head))})
        response.content_type = BINARY_TYPE
        response.content_length = size
        await response.prepare(request)
        await response.write(head)
        for part in parts:
            await response.write(part)  # the output's bytes as the worker wrote them
        await response.write_eof()
        return response


async def read_body(request: web.Request, limit: int) -> bytes | Pieces:
    """The whole body, as the chunks it arrived in (``Pieces``: a binary tensor in it is then
    copied once, into the arena) or, in one chunk, as it is. Compressed and chunked bodies
    take aiohttp's way, which enforces the limit on the decompressed size."""
    length = request.content_length
    if length is not None and length > limit:
        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=length)
    if length is None or "Content-Encoding" in request.headers:
        return await request.read()
    chunks: list[bytes] = []
    filled = 0
    while filled < length:
        chunk = await request.content.readany()
        if not chunk:
            break
        if filled + len(chunk) > length:  # (aiohttp stops at Content-Length; be sure)
            chunk = chunk[:length - filled]
        chunks.append(chunk)
        filled += len(chunk)
    if filled != length:
        raise invalid_argument(f"the request body ended after {filled} of the {length} bytes "
                               f"its Content-Length declares")
    if len(chunks) == 1:
        return chunks[0]
    return Pieces([memoryview(chunk) for chunk in chunks])


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _parameter_kind(value: Any) -> str:
    """The protobuf parameter field a JSON value corresponds to (for error texts)."""
    if isinstance(value, bool):
        return "bool_param"
    if isinstance(value, int):
        return "int64_param"
    if isinstance(value, str):
        return "string_param"
    return type(value).__name__


def _pick_encoding(accept: str) -> str | None:
    """gzip or deflate when the client accepts one (in its order of preference), else None."""
    choices = []
    for item in accept.split(","):
        name, _, quality = item.strip().partition(";q=")
        name = name.strip().lower()
        try:
            weight = float(quality) if quality else 1.0
        except ValueError:
            weight = 0.0
        if name in ("gzip", "deflate") and weight > 0:
            choices.append((-weight, name))
    return min(choices)[1] if choices else None


def _compressed(head: bytes, parts: list[bytes | memoryview], encoding: str) -> web.Response:
    if encoding == "gzip":
        compressor = zlib.compressobj(wbits=31)
    else:
        compressor = zlib.compressobj()
    body = b"".join([compressor.compress(head), *(compressor.compress(p) for p in parts),
                     compressor.flush()])
    headers = {"Content-Encoding": encoding}
    if parts:
        headers[HEADER_LENGTH] = str(len(head))
    return web.Response(body=body, headers=headers,
                        content_type=JSON_TYPE if not parts else BINARY_TYPE)
