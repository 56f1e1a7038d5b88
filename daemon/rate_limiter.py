"""Triton's rate limiter (``--rate-limit=execution_count``): an instance runs a batch only
while the resources its instance group names (``rate_limiter { resources [...] }``) are free.

A resource is counted per device (a GPU instance's GPU; CPU instances share device 0 as in
Triton) unless the config marks it ``global``. ``--rate-limit-resource=NAME:COUNT[:DEVICE]``
says how many there are (on that device, or on every device without one); otherwise there are
as many as the most any one instance asks for, so each instance can run alone. A batch holds
its instance's resources from the moment it is sent until its instance answers it; a
scheduler that finds them taken is woken when some are released. ``priority`` is accepted
and not weighed: instances take turns as their batches come.
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
        self._waiting: list[Callable[[], None]] = []
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

    def can_run(self, plan: InstancePlan) -> bool:
        return all(self._used.get(key, 0) + count <= self._available(key)
                   for key, count in _needs(plan))

    def acquire(self, plan: InstancePlan) -> None:
        for key, count in _needs(plan):
            self._used[key] = self._used.get(key, 0) + count

    def release(self, plan: InstancePlan) -> None:
        needs = _needs(plan)
        for key, count in needs:
            self._used[key] = max(self._used.get(key, 0) - count, 0)
        if needs and self._waiting and not self._wake_scheduled:
            self._wake_scheduled = True
            asyncio.get_running_loop().call_soon(self._wake)

    def wait(self, dispatch: Callable[[], None]) -> None:
        """Call ``dispatch`` once resources were released."""
        if dispatch not in self._waiting:
            self._waiting.append(dispatch)

    def _wake(self) -> None:
        self._wake_scheduled = False
        waiting, self._waiting = self._waiting, []
        for dispatch in waiting:
            dispatch()
