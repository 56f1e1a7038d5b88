"""The HTTP library pick (docs/http.md): bare servers answering a canned reply, and a loader.

    python -m bench.http_library bare aiohttp PORT      # a bare aiohttp server
    python -m bench.http_library bare httptools PORT    # a bare httptools protocol (uvicorn's way)
    python -m bench.http_library load PORT CONCURRENCY [SECONDS]

The loader keeps CONCURRENCY keep-alive connections busy with `simple`'s JSON infer request and
prints requests per second; point it at a bare server or at shmserve's --http-port.
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

import uvloop

_ROW = ",".join(str(i) for i in range(16))
REQUEST_BODY = ('{"inputs":[{"name":"INPUT0","datatype":"INT32","shape":[1,16],"data":[' + _ROW
                + ']},{"name":"INPUT1","datatype":"INT32","shape":[1,16],"data":[' + _ROW
                + ']}]}').encode()
REQUEST = (b"POST /v2/models/simple/infer HTTP/1.1\r\nHost: bench\r\n"
           b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n"
           % len(REQUEST_BODY)) + REQUEST_BODY
CANNED = b'{"model_name":"simple","model_version":"1","outputs":[]}'


def bare_aiohttp(port: int) -> None:
    from aiohttp import web

    async def infer(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=CANNED, content_type="application/json")

    app = web.Application()
    app.router.add_post("/v2/models/{model}/infer", infer)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None,
                loop=uvloop.new_event_loop())


def bare_httptools(port: int) -> None:
    import httptools

    answer = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
              % len(CANNED)) + CANNED

    class Protocol(asyncio.Protocol):
        def connection_made(self, transport: Any) -> None:
            self.transport = transport
            self.parser = httptools.HttpRequestParser(self)
            self.body: list[bytes] = []

        def data_received(self, data: bytes) -> None:
            self.parser.feed_data(data)

        def on_body(self, body: bytes) -> None:
            self.body.append(body)

        def on_message_complete(self) -> None:
            self.transport.write(answer)
            self.body = []

    async def serve() -> None:
        server = await asyncio.get_running_loop().create_server(Protocol, "127.0.0.1", port)
        await server.serve_forever()

    uvloop.run(serve())


async def _connection(port: int, stop: float, counts: list[int]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    done = 0
    while time.monotonic() < stop:
        writer.write(REQUEST)
        head = await reader.readuntil(b"\r\n\r\n")
        status = head.split(b" ", 2)[1]
        if status != b"200":
            raise RuntimeError(f"answered {status.decode()}")
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length"))
        await reader.readexactly(length)
        done += 1
    counts.append(done)
    writer.close()


async def load(port: int, concurrency: int, seconds: float) -> float:
    counts: list[int] = []
    stop = time.monotonic() + seconds
    await asyncio.gather(*(_connection(port, stop, counts) for _ in range(concurrency)))
    return sum(counts) / seconds


def main(argv: list[str]) -> int:
    if len(argv) >= 3 and argv[0] == "bare":
        {"aiohttp": bare_aiohttp, "httptools": bare_httptools}[argv[1]](int(argv[2]))
        return 0
    if len(argv) >= 3 and argv[0] == "load":
        seconds = float(argv[3]) if len(argv) > 3 else 3.0
        rate = uvloop.run(load(int(argv[1]), int(argv[2]), seconds))
        print(f"c{argv[2]}: {rate:.0f} req/s")
        return 0
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
