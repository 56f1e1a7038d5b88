"""Triton's rate limiter (``--rate-limit=execution_count``): an instance runs a batch only
while the resources its instance group names (``rate_limiter { resources [...] }``) are free.

A resource is counted per device (a GPU instance's GPU; CPU instances share device 0 as in
Triton) unless the config marks it ``global``. ``--rate-limit-resource=NAME:COUNT[:DEVICE]``
says how many there are (on that device, or on every device without one); otherwise there are
as many as the most any one instance asks for, so each instance can run alone. A batch holds
its instance's resources from the moment it is sent until its instance answers it; a
scheduler that finds them taken is woken when some are released. Among instances waiting for
resources, the one with the fewest batches run times its ``priority`` goes first, so priority
2 gets half the turns of priority 1, as in Triton; an instance that just finished does not
jump that queue.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable

from shmserve.daemon.model_config import InstancePlan

GLOBAL = -1  # the device of a global resource
ResourceKey = tuple[str, int]   # (name, device or GLOBAL)


def _needs(plan: InstancePlan) -> list[tuple[ResourceKey, int]]:
    return [((name.lower(), GLOBAL if is_global else plan.device_id), count)
            for name, is_global, count in plan.resources]


class RateLimiter:
    def __init__(self, given: Iterable[tuple[str, int, int | None]]) -> None:
        self._given: dict[tuple[str, int | None], int] = {
            (name, device): count for name, count, device in given}
        self._largest: dict[ResourceKey, int] = {}   # the most one instance asks for
        self._used: dict[ResourceKey, int] = {}
        # Instances waiting for resources: id(plan) -> (plan, its scheduler's dispatch).
        self._waiting: dict[int, tuple[InstancePlan, Callable[[], None]]] = {}
        self._runs: dict[int, int] = {}   # id(plan) -> batches it ran
        self._wake_scheduled = False

    def register(self, plans: Iterable[InstancePlan]) -> None:
        """A model's instances: what they ask for raises the default availability."""
        for plan in plans:
            for key, count in _needs(plan):
                self._largest[key] = max(self._largest.get(key, 0), count)

    def _available(self, key: ResourceKey) -> int:
        name, device = key
        given = self._given.get((name, device if device != GLOBAL else None))
        if given is None and device != GLOBAL:
            given = self._given.get((name, None))
        return given if given is not None else self._largest.get(key, 0)

    def _weight(self, plan: InstancePlan) -> int:
        """Its claim among waiting instances: batches run times priority (lowest first), so
        that priority 2 gets half the turns of priority 1, as Triton's."""
        return self._runs.get(id(plan), 0) * max(plan.priority, 1)

    def can_run(self, plan: InstancePlan) -> bool:
        """Its resources are free, and no instance waiting for them has a better claim (an
        instance that just finished does not jump the queue)."""
        needs = _needs(plan)
        if not all(self._used.get(key, 0) + count <= self._available(key)
                   for key, count in needs):
            return False
        if not needs or not self._waiting:
            return True
        weight = self._weight(plan)
        return all(self._weight(other) >= weight for key, (other, _) in self._waiting.items()
                   if key != id(plan))

    def acquire(self, plan: InstancePlan) -> None:
        needs = _needs(plan)
        for key, count in needs:
            self._used[key] = self._used.get(key, 0) + count
        if needs:
            self._runs[id(plan)] = self._runs.get(id(plan), 0) + 1
            self._waiting.pop(id(plan), None)

    def release(self, plan: InstancePlan) -> None:
        needs = _needs(plan)
        for key, count in needs:
            self._used[key] = max(self._used.get(key, 0) - count, 0)
        if needs and self._waiting and not self._wake_scheduled:
            self._wake_scheduled = True
            asyncio.get_running_loop().call_soon(self._wake)

    def wait(self, plan: InstancePlan, dispatch: Callable[[], None]) -> None:
        """Call ``dispatch`` once resources were released (``plan``'s turn may come)."""
        self._waiting.setdefault(id(plan), (plan, dispatch))

    def _wake(self) -> None:
        """Released resources: the waiting instances' schedulers try again, best claim
        first (one that still cannot run waits again; one with nothing left to send does
        not)."""
        self._wake_scheduled = False
        waiting = sorted(self._waiting.values(), key=lambda entry: self._weight(entry[0]))
        self._waiting = {}  # who still needs resources registers again from dispatch
        for _, dispatch in waiting:
            dispatch()
