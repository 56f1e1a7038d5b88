"""``shmserve shm ls`` / ``shmserve shm clean``: find and remove segments of dead clients.

An administrator's command, so it lives with the daemon; the segment naming it reads is
the client's (``shmserve.client.regions``).

Client segments are named ``shmserve_client_<pid>_<n>_<hex>`` (see ``regions.segment_key``).
A segment's owner is alive when a process with that pid exists, is not a zombie, and started
before the segment was last changed (a pid reused by a younger process does not count).
Only segments whose owner is dead are removed. Liveness is judged in this host's (this PID
namespace's) view: containers that share /dev/shm but not the PID namespace must not run
``clean`` against each other's segments.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
from dataclasses import asdict, dataclass

from shmserve.client.regions import SEGMENT_PREFIX, SHM_DIR

SUMMARY = "list or remove shared-memory segments left by dead clients"
DESCRIPTION = ("List or remove shared-memory segments that shmserve clients created (named "
               "shmserve_client_<pid>_...).")

_NAME = re.compile(rf"^{SEGMENT_PREFIX}(\d+)_(\d+)_([0-9a-f]+)$")
# Slack for the coarse clocks involved (btime has 1 s resolution).
_START_SLACK_S = 2.0


@dataclass(frozen=True, slots=True)
class SegmentInfo:
    name: str
    path: str
    pid: int
    alive: bool
    size: int
    mtime: float


def _boot_time() -> float | None:
    try:
        with open("/proc/stat") as stat:
            for line in stat:
                if line.startswith("btime "):
                    return float(line.split()[1])
    except OSError:
        return None
    return None


def _process_state(pid: int) -> tuple[str, float | None] | None:
    """(state letter, start time as epoch seconds) from /proc, or None when unknown."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            text = stat.read()
    except OSError:
        return None
    fields = text[text.rfind(")") + 2:].split()
    if len(fields) < 20:
        return None
    boot = _boot_time()
    start = boot + int(fields[19]) / os.sysconf("SC_CLK_TCK") if boot is not None else None
    return fields[0], start


def owner_alive(pid: int, changed: float) -> bool:
    """Whether the process that created a segment last changed at ``changed`` still runs."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    except OSError:
        return True
    state = _process_state(pid)
    if state is None:
        return True
    letter, start = state
    if letter in ("Z", "X"):
        return False
    return not (start is not None and start > changed + _START_SLACK_S)


def list_segments(directory: str = SHM_DIR) -> list[SegmentInfo]:
    """Client segments in ``directory`` (default /dev/shm), oldest first."""
    found: list[SegmentInfo] = []
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    for name in names:
        match = _NAME.match(name)
        if match is None:
            continue
        path = os.path.join(directory, name)
        try:
            info = os.stat(path)
        except FileNotFoundError:
            continue
        pid = int(match.group(1))
        changed = max(info.st_mtime, info.st_ctime)
        found.append(SegmentInfo(name, path, pid, owner_alive(pid, changed), info.st_size,
                                 info.st_mtime))
    found.sort(key=lambda s: (s.mtime, s.name))
    return found


def _size_text(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"


def _ls(args: argparse.Namespace) -> int:
    segments = list_segments(args.dir)
    if args.json:
        print(json.dumps([asdict(s) for s in segments], indent=2))
        return 0
    if not segments:
        print(f"no shmserve client segments in {args.dir}")
        return 0
    width = max(len(s.name) for s in segments)
    print(f"{'SEGMENT':<{width}}  {'PID':>7}  {'OWNER':<5}  {'SIZE':>10}")
    for s in segments:
        print(f"{s.name:<{width}}  {s.pid:>7}  {'alive' if s.alive else 'dead':<5}  "
              f"{_size_text(s.size):>10}")
    dead = sum(not s.alive for s in segments)
    print(f"{len(segments)} segment(s), {dead} of a dead process"
          + (" (remove with: shmserve shm clean)" if dead else ""))
    return 0


def _clean(args: argparse.Namespace) -> int:
    failed = 0
    removed = 0
    for segment in list_segments(args.dir):
        if segment.alive:
            continue
        if args.dry_run:
            print(f"would remove {segment.path} (pid {segment.pid} is gone, "
                  f"{_size_text(segment.size)})")
            removed += 1
            continue
        try:
            os.unlink(segment.path)
        except FileNotFoundError:
            continue
        except OSError as exc:
            print(f"cannot remove {segment.path}: {exc.strerror}", file=sys.stderr)
            failed += 1
            continue
        removed += 1
        print(f"removed {segment.path} (pid {segment.pid} is gone, "
              f"{_size_text(segment.size)})")
    if removed == 0 and failed == 0:
        print("nothing to clean: no segment of a dead shmserve client")
    return 1 if failed else 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``shmserve shm``'s own commands, on the parser cli.py made for it."""
    commands = parser.add_subparsers(dest="shm_command", required=True, metavar="{ls,clean}")
    ls = commands.add_parser("ls", help="list client segments, their owner pid and whether it "
                                        "is alive")
    ls.add_argument("--json", action="store_true", help="print JSON")
    clean = commands.add_parser("clean", help="remove segments whose creating process is gone")
    clean.add_argument("--dry-run", action="store_true", help="only say what would be removed")
    for command in (ls, clean):
        command.add_argument("--dir", default=SHM_DIR, help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    with contextlib.suppress(BrokenPipeError):
        return _ls(args) if args.shm_command == "ls" else _clean(args)
    return 0


def main(argv: list[str]) -> int:
    """``shmserve shm ARGS`` on its own (tests, scripts)."""
    parser = argparse.ArgumentParser(prog="shmserve shm", description=DESCRIPTION)
    add_arguments(parser)
    return run(parser.parse_args(argv))
