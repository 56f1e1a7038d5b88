"""Start an aiohttp application on a TCP address (the HTTP door, /metrics)."""

from __future__ import annotations

from aiohttp import web


async def start_site(app: web.Application, address: str, port: int,
                     shutdown_timeout: float = 60.0, reuse_address: bool = False,
                     reuse_port: bool = False) -> tuple[web.AppRunner, int]:
    """The running application's runner and the port it bound (the free one chosen when
    ``port`` is 0). Nothing is left open if it cannot listen."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False,
                           shutdown_timeout=shutdown_timeout)
    await runner.setup()
    site = web.TCPSite(runner, address, port, reuse_address=reuse_address or None,
                       reuse_port=reuse_port or None)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    # aiohttp keeps the listening server there.
    sockets = getattr(site._server, "sockets", None) or ()
    return runner, int(sockets[0].getsockname()[1]) if sockets else port
