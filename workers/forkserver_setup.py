"""Imported by the fork server at start (it is on the preload list) and run by every worker.

Group-wide signals (Ctrl-C in a terminal, `timeout`, systemd's KillMode=control-group) must not
kill the fork server or the workers before the supervisor has drained: only the supervisor acts
on SIGTERM/SIGINT/SIGHUP. Workers still exit when the supervisor goes away (EOF on the control
socket, PR_SET_PDEATHSIG) and the supervisor kills them with SIGKILL when it has to.
"""

from __future__ import annotations

import signal


def ignore_group_signals() -> None:
    for name in ("SIGTERM", "SIGINT", "SIGHUP"):
        signal.signal(getattr(signal, name), signal.SIG_IGN)


ignore_group_signals()
