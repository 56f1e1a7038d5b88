"""CPU accounting from /proc: a server's process tree, and the whole host.

Used to show, next to each figure, how many cores the server, the load generator and anything
else on the host were using: on a shared 2-core box that is the difference between "the server
is slow" and "something else was running".
"""

from __future__ import annotations

import os
from dataclasses import dataclass

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            text = handle.read()
    except OSError:
        return None
    # The command name may contain spaces; fields after it are space separated.
    return text[text.rfind(")") + 2:].split()


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat_fields(int(entry))
        if fields is None:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
    return children


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU of ``pid`` alone (its threads, not its children)."""
    fields = _stat_fields(pid)
    return sum(int(value) for value in fields[11:13]) / _TICK if fields else float("nan")


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU of ``pid`` and its live descendants (and reaped children's)."""
    children = _children_map()
    total = 0
    stack = [pid]
    seen: set[int] = set()
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        fields = _stat_fields(current)
        if fields is None:
            continue
        # utime, stime, cutime, cstime are fields 14-17 (1-based) -> 11..14 after the name.
        total += sum(int(value) for value in fields[11:15])
        stack.extend(children.get(current, []))
    return total / _TICK


def host_busy_seconds() -> tuple[float, float]:
    """(busy CPU seconds summed over cores, wall-clock ticks as seconds) since boot."""
    with open("/proc/stat") as handle:
        values = [int(v) for v in handle.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    total = sum(values[:8])
    return (total - idle) / _TICK, total / _TICK


@dataclass(slots=True)
class CpuSample:
    server_s: float
    server_main_s: float
    host_busy_s: float
    host_total_s: float


class CpuMeter:
    """Samples before/after a measurement; reports average cores used in between."""

    def __init__(self, server_pid: int | None) -> None:
        self.server_pid = server_pid

    def sample(self) -> CpuSample:
        server = tree_cpu_seconds(self.server_pid) if self.server_pid else float("nan")
        main = process_cpu_seconds(self.server_pid) if self.server_pid else float("nan")
        busy, total = host_busy_seconds()
        return CpuSample(server, main, busy, total)

    @staticmethod
    def cores(before: CpuSample, after: CpuSample, wall_s: float) -> dict[str, float]:
        if wall_s <= 0:
            return {}
        ncpu = os.cpu_count() or 1
        host_total = after.host_total_s - before.host_total_s
        host_busy = after.host_busy_s - before.host_busy_s
        # /proc/stat sums over cores: scale to "cores busy on average".
        busy = host_busy / host_total * ncpu if host_total > 0 else float("nan")
        return {"server_cpu_cores": (after.server_s - before.server_s) / wall_s,
                "server_main_cpu_cores": (after.server_main_s - before.server_main_s) / wall_s,
                "host_busy_cores": busy}
