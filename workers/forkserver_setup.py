"""Imported by the fork server at start (it is on the preload list) and run by every worker.

Group-wide signals (Ctrl-C in a terminal, `timeout`, systemd's KillMode=control-group) must not
kill the fork server or the workers before the supervisor has drained: only the supervisor acts
on SIGTERM/SIGINT/SIGHUP. The fork server dies with the supervisor and each worker with the fork
server (PR_SET_PDEATHSIG, workers/lineage.py); idle workers also exit on EOF of their control
socket, and the supervisor kills them with SIGKILL when it has to.
"""

from __future__ import annotations

import signal

from shmserve.workers.lineage import die_with_supervisor


def ignore_group_signals() -> None:
    for name in ("SIGTERM", "SIGINT", "SIGHUP"):
        signal.signal(getattr(signal, name), signal.SIG_IGN)


ignore_group_signals()
die_with_supervisor()  # module level: runs once, in the fork server (it preloads this module)
