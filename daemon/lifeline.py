"""The embedding program's lifeline: a pipe whose write end that program holds.

``--lifeline-fd`` names the read end, inherited at start. Nothing is ever written to it; when
the program ends, however it ends (exit, exception, SIGKILL), the kernel closes the write end
and the read end reports end of file: the supervisor then drains and exits as on SIGTERM, and
its fork server and workers follow it (workers/lineage.py). A pipe rather than
PR_SET_PDEATHSIG on the supervisor: that signal fires when the *thread* that started the
child ends, and an embedding program may start the server from a short-lived thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import os

LIFELINE_ENDED = "lifeline closed"


def watch_lifeline(loop: asyncio.AbstractEventLoop, fd: int,
                   events: asyncio.Queue[str]) -> None:
    """Put ``LIFELINE_ENDED`` on ``events`` once ``fd`` reaches end of file (or fails)."""

    def readable() -> None:
        try:
            data = os.read(fd, 4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            return  # nobody should write; ignore it rather than exit on noise
        loop.remove_reader(fd)
        with contextlib.suppress(OSError):
            os.close(fd)
        events.put_nowait(LIFELINE_ENDED)

    os.set_blocking(fd, False)
    loop.add_reader(fd, readable)
