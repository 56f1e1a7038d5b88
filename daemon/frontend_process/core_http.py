"""The core's HTTP door on a private Unix socket, for the frontend processes' proxied calls
(http_proxy.py): with --grpc-frontends N > 1 the frontends serve the HTTP port."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile

from aiohttp import web

from shmserve.daemon.core import Core
from shmserve.daemon.frontend.http import HttpDoor


class CoreHttp:
    def __init__(self, core: Core) -> None:
        self._door = HttpDoor(core)
        self._settings = core.settings
        self._directory = ""
        self._runner: web.AppRunner | None = None
        self.path = ""

    async def start(self) -> str:
        """Listen in a new directory only this user can enter; the socket's path."""
        self._directory = tempfile.mkdtemp(prefix="shmserve-http-")
        os.chmod(self._directory, 0o700)
        self.path = os.path.join(self._directory, "core.sock")
        runner = web.AppRunner(self._door.application(), access_log=None,
                               handle_signals=False,
                               shutdown_timeout=self._settings.exit_timeout_secs)
        await runner.setup()
        try:
            await web.UnixSite(runner, self.path).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        return self.path

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.shutdown()
            await self._runner.cleanup()
            self._runner = None
        if self._directory:
            with contextlib.suppress(OSError):
                shutil.rmtree(self._directory)
            self._directory = ""
