"""The HTTP door in a frontend process: inference here, everything else proxied to the core.

``FrontendHttpDoor`` is the HTTP door itself (frontend/http.py: routes, limits, error
rendering) with ``RemoteCore`` for a core, listening on the HTTP port with SO_REUSEPORT like
the frontend's gRPC server. ``infer`` runs here (parsed in this process, answered from the
worker's direct ring). Every other route (health, metadata, statistics, the repository,
shared-memory registration, logging, trace, generate and generate_stream, unknown paths)
is proxied as it came to the core's own HTTP door on a private Unix socket
(core_http.py), so it answers the same whichever process took the connection.
"""

from __future__ import annotations

import aiohttp
from aiohttp import web

from shmserve.daemon.errors import unavailable
from shmserve.daemon.frontend.http import HttpDoor
from shmserve.daemon.frontend_process.remote_core import RemoteCore

# Per-connection headers, and those that describe the body as received (aiohttp hands the
# handler the body decompressed and de-chunked): not forwarded.
_HOP_HEADERS = frozenset({"connection", "keep-alive", "proxy-connection", "te", "trailer",
                          "transfer-encoding", "upgrade", "host", "content-length",
                          "content-encoding"})
_FORWARDED = ("unknown_path", "live", "ready", "server_metadata", "statistics",
              "repository_index", "load", "unload", "system_status", "system_register",
              "system_unregister", "cuda_status", "cuda_register", "cuda_unregister",
              "logging", "trace", "model_metadata", "model_ready", "model_config",
              "generate", "generate_stream")


class FrontendHttpDoor(HttpDoor):
    def __init__(self, core: RemoteCore, core_socket: str) -> None:
        super().__init__(core)
        self._core_socket = core_socket
        self._session: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None

    async def start_shared(self, address: str, port: int) -> None:
        """Listen on the HTTP port beside the other frontends (SO_REUSEPORT)."""
        runner = web.AppRunner(self.application(), access_log=None, handle_signals=False,
                               shutdown_timeout=self.core.settings.exit_timeout_secs)
        await runner.setup()
        site = web.TCPSite(runner, address, port, reuse_address=True, reuse_port=True)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner

    async def stop(self) -> None:
        await super().stop()
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def forward(self, request: web.Request) -> web.StreamResponse:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.UnixConnector(path=self._core_socket), auto_decompress=False,
                timeout=aiohttp.ClientTimeout(total=None))
        headers = {key: value for key, value in request.headers.items()
                   if key.lower() not in _HOP_HEADERS}
        body = await request.read() if request.can_read_body else None
        try:
            async with self._session.request(request.method, f"http://core{request.rel_url}",
                                             headers=headers, data=body,
                                             allow_redirects=False) as upstream:
                answer_headers = {key: value for key, value in upstream.headers.items()
                                  if key.lower() not in _HOP_HEADERS - {"content-encoding"}}
                if upstream.content_type != "text/event-stream":
                    return web.Response(status=upstream.status, headers=answer_headers,
                                        body=await upstream.read())
                answer = web.StreamResponse(status=upstream.status, headers=answer_headers)
                await answer.prepare(request)
                async for chunk in upstream.content.iter_any():
                    await answer.write(chunk)
                await answer.write_eof()
                return answer
        except aiohttp.ClientError as exc:
            raise unavailable(f"the server's core is not reachable: {exc}") from None


# Every route but inference goes to the core: its handler here is ``forward``.
for _name in _FORWARDED:
    setattr(FrontendHttpDoor, _name, FrontendHttpDoor.forward)
