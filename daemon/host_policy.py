"""tritonserver's host policies: ``--host-policy=<name>,numa-node=<n>`` and
``--host-policy=<name>,cpu-cores=<list>`` pin the workers of the instances whose group names
that policy (``instance_group { host_policy: "<name>" }``; by default ``cpu`` for CPU
instances and ``gpu_<device>`` for GPU ones, as in Triton) to those CPUs. A NUMA node's CPUs
come from sysfs. The affinity is set in the worker before anything else runs. Standard
library only (the settings table imports it)."""

from __future__ import annotations

import argparse
from collections.abc import Iterable

SETTINGS = ("numa-node", "cpu-cores")
NODE_CPUS = "/sys/devices/system/node/node{}/cpulist"


def parse_cpu_list(text: str) -> list[int]:
    """``0-3,8,10-11`` -> [0, 1, 2, 3, 8, 10, 11]."""
    cpus: set[int] = set()
    for part in text.replace(":", ",").split(","):
        part = part.strip()
        if not part:
            continue
        first, _, last = part.partition("-")
        low, high = int(first), int(last or first)
        if low < 0 or high < low:
            raise ValueError(part)
        cpus.update(range(low, high + 1))
    if not cpus:
        raise ValueError(text)
    return sorted(cpus)


def parse_host_policy(text: str) -> tuple[str, str, str]:
    """(policy, setting, value)."""
    name, _, rule = text.partition(",")
    setting, sep, value = rule.partition("=")
    if not name or not sep:
        raise argparse.ArgumentTypeError(
            f"expected <policy_name>,<setting>=<value>, got '{text}'")
    if setting not in SETTINGS:
        raise argparse.ArgumentTypeError(
            f"unsupported host policy setting '{setting}' (shmserve has {', '.join(SETTINGS)})")
    try:
        if setting == "numa-node":
            if int(value) < 0:
                raise ValueError(value)
        else:
            parse_cpu_list(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid {setting} '{value}' in '{text}'") from None
    return name, setting, value


def default_policy(kind: str, device_id: int) -> str:
    return f"gpu_{device_id}" if kind == "KIND_GPU" else "cpu"


def policy_cpus(policies: Iterable[tuple[str, str, str]], name: str) -> list[int] | None:
    """The CPUs of policy ``name`` (those of its NUMA node and its cpu-cores, both when both
    are given), or None when it sets none. Raises ValueError for a node that does not
    exist."""
    chosen: set[int] | None = None
    for policy, setting, value in policies:
        if policy != name:
            continue
        if setting == "cpu-cores":
            cpus = set(parse_cpu_list(value))
        else:
            try:
                with open(NODE_CPUS.format(int(value))) as node:
                    cpus = set(parse_cpu_list(node.read()))
            except OSError:
                raise ValueError(f"host policy '{name}': NUMA node {value} does not exist on "
                                 f"this host") from None
        chosen = cpus if chosen is None else chosen & cpus
    return sorted(chosen) if chosen is not None else None


def check_policies(policies: list[tuple[str, str, str]], usable: set[int]) -> str | None:
    """Why the policies cannot be applied on this host (a missing NUMA node, CPUs this
    process may not use), or None."""
    for name in dict.fromkeys(policy for policy, _, _ in policies):
        try:
            cpus = policy_cpus(policies, name)
        except ValueError as exc:
            return str(exc)
        if cpus is not None and (not cpus or not set(cpus) <= usable):
            return (f"host policy '{name}': CPUs {cpus} are not all among this process's "
                    f"{sorted(usable)}")
    return None
