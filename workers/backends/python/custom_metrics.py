"""``pb_utils.MetricFamily`` / ``pb_utils.Metric``: a model's own Prometheus metrics.

One registry per worker process (a worker runs one model instance). Updates only touch this
process's memory and bump ``generation``; the worker's reporter thread (workers/reporter.py)
sends a snapshot to the supervisor when the generation moved, and the supervisor adds the
families of every live instance to ``/metrics`` (daemon/metrics.py).

As in Triton, a family is identified by its name (the same name with another kind or
description is an error) and a metric by its family and labels: two ``Metric`` objects with
the same labels share one value.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Mapping, Sequence
from typing import Any

COUNTER = 0
GAUGE = 1
HISTOGRAM = 2
KIND_NAMES = {COUNTER: "counter", GAUGE: "gauge", HISTOGRAM: "histogram"}

_lock = threading.Lock()
_families: dict[str, MetricFamily] = {}
generation = 0  # bumped on every change; the reporter compares it


def _changed() -> None:
    global generation
    generation += 1


class _Value:
    __slots__ = ("buckets", "count", "counts", "sum", "value")

    def __init__(self, buckets: list[float] | None) -> None:
        self.value = 0.0
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1) if buckets is not None else []
        self.sum = 0.0
        self.count = 0


class MetricFamily:
    """``MetricFamily(name, description, kind)``, kind one of COUNTER, GAUGE, HISTOGRAM."""

    COUNTER = COUNTER
    GAUGE = GAUGE
    HISTOGRAM = HISTOGRAM

    def __new__(cls, name: str, description: str, kind: int) -> MetricFamily:
        from .triton_python_backend_utils import TritonModelException
        if kind not in KIND_NAMES:
            raise TritonModelException(f"Unknown metric family kind: {kind!r}")
        if not name:
            raise TritonModelException("Metric family name must not be empty")
        with _lock:
            existing = _families.get(name)
            if existing is not None:
                if existing._kind != kind or existing._description != description:
                    raise TritonModelException(
                        f"Metric family '{name}' already exists with a different kind or "
                        f"description")
                return existing
            family = super().__new__(cls)
            family._name = name
            family._description = description
            family._kind = kind
            family._metrics = {}
            _families[name] = family
            _changed()
        return family

    def __init__(self, name: str, description: str, kind: int) -> None:
        pass  # set up once, in __new__ (a second construction returns the same family)

    _name: str
    _description: str
    _kind: int
    _metrics: dict[tuple[tuple[str, str], ...], _Value]

    def Metric(self, labels: Mapping[str, str] | None = None,  # Triton's spelling
               buckets: Sequence[float] | None = None) -> Metric:
        return Metric(self, labels or {}, buckets)


class Metric:
    """One labelled metric of a family: ``increment``, ``set``, ``observe``, ``value``."""

    __slots__ = ("_family", "_value")

    def __init__(self, family: MetricFamily, labels: Mapping[str, str],
                 buckets: Sequence[float] | None = None) -> None:
        from .triton_python_backend_utils import TritonModelException
        if family._kind == HISTOGRAM:
            if buckets is None:
                raise TritonModelException("Missing required buckets for histogram metric")
            bounds = [float(b) for b in buckets]
            if bounds != sorted(bounds):
                raise TritonModelException("Histogram buckets must be in increasing order")
        elif buckets is not None:
            raise TritonModelException("Buckets are only allowed for histogram metrics")
        else:
            bounds = None
        key = tuple(sorted((str(k), str(v)) for k, v in labels.items()))
        with _lock:
            value = family._metrics.get(key)
            if value is None:
                value = family._metrics[key] = _Value(bounds)
                _changed()
        self._family = family
        self._value = value

    def _require(self, allowed: tuple[int, ...], action: str) -> None:
        from .triton_python_backend_utils import TritonModelException
        if self._family._kind not in allowed:
            names = " or ".join(KIND_NAMES[k].upper() for k in allowed)
            raise TritonModelException(
                f"Failed to {action} metric '{self._family._name}': only supported for "
                f"{names} metrics, this one is a {KIND_NAMES[self._family._kind].upper()}")

    def increment(self, value: float) -> None:
        self._require((COUNTER, GAUGE), "increment")
        if self._family._kind == COUNTER and value < 0:
            from .triton_python_backend_utils import TritonModelException
            raise TritonModelException(
                f"Failed to increment metric '{self._family._name}': a COUNTER cannot be "
                f"incremented by a negative value ({value})")
        with _lock:
            self._value.value += float(value)
            _changed()

    def set(self, value: float) -> None:
        self._require((GAUGE,), "set")
        with _lock:
            self._value.value = float(value)
            _changed()

    def observe(self, value: float) -> None:
        self._require((HISTOGRAM,), "observe")
        held = self._value
        assert held.buckets is not None
        with _lock:
            held.counts[bisect.bisect_left(held.buckets, float(value))] += 1
            held.sum += float(value)
            held.count += 1
            _changed()

    def value(self) -> float:
        self._require((COUNTER, GAUGE), "get the value of")
        return self._value.value


def snapshot() -> list[Any]:
    """Every family as the Report frame carries it (see workers/protocol.py ``Report``)."""
    with _lock:
        out: list[Any] = []
        for family in _families.values():
            metrics = []
            for key, held in family._metrics.items():
                labels = [list(pair) for pair in key]
                if family._kind == HISTOGRAM:
                    metrics.append([labels, [held.buckets, list(held.counts), held.sum,
                                             held.count]])
                else:
                    metrics.append([labels, held.value])
            out.append([family._name, family._description, KIND_NAMES[family._kind], metrics])
        return out
