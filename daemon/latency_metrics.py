"""Latency metrics beyond the counters, as tritonserver's ``--metrics-config``:
``summary_latencies=true`` adds per-model summaries (quantiles over a sliding window, with
``_count`` and ``_sum``) of request, queue and compute times, ``summary_quantiles=q:e,...``
chooses the quantiles, ``counter_latencies=false`` drops the ``*_duration_us`` counters, and
``histogram_latencies=true`` adds ``nv_inference_first_response_histogram_ms``.

A summary keeps its observations in five age buckets spanning the last 60 s (Prometheus'
default window), each a reservoir of at most 1,024 samples, so its memory is bounded
whatever the request rate; quantiles are read from the merged reservoirs when scraped (the
error terms of ``summary_quantiles`` are accepted; the reservoir sets the precision).
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from shmserve.daemon.statistics import Duration, ModelStats

DEFAULT_QUANTILES = (0.5, 0.9, 0.95, 0.99, 0.999)
FIRST_RESPONSE_BUCKETS_MS = (100.0, 500.0, 2000.0, 5000.0)
WINDOW_S = 60.0
AGE_BUCKETS = 5
RESERVOIR = 1024


@dataclass(frozen=True, slots=True)
class LatencyOptions:
    counters: bool = True
    summaries: bool = False
    quantiles: tuple[float, ...] = DEFAULT_QUANTILES
    first_response_histogram: bool = False


def parse_metrics_config(text: str) -> tuple[str, str]:
    """One ``--metrics-config KEY=VALUE``."""
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected <setting>=<value>, got '{text}'")
    if key in ("summary_latencies", "counter_latencies", "histogram_latencies"):
        if value.lower() not in ("true", "false"):
            raise argparse.ArgumentTypeError(f"expected true or false for {key}, got "
                                             f"'{value}'")
    elif key == "summary_quantiles":
        _quantiles(value)
    else:
        raise argparse.ArgumentTypeError(f"unknown metrics setting '{key}'")
    return key, value


def _quantiles(value: str) -> tuple[float, ...]:
    quantiles = []
    for pair in value.split(","):
        quantile, _, _error = pair.partition(":")
        try:
            number = float(quantile)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid summary quantile '{pair}'") from None
        if not 0.0 <= number <= 1.0:
            raise argparse.ArgumentTypeError(f"summary quantile out of [0, 1]: '{pair}'")
        quantiles.append(number)
    return tuple(quantiles)


def options_from(entries: Iterable[tuple[str, str]]) -> LatencyOptions:
    values = dict(entries)
    return LatencyOptions(
        counters=values.get("counter_latencies", "true").lower() == "true",
        summaries=values.get("summary_latencies", "false").lower() == "true",
        quantiles=(_quantiles(values["summary_quantiles"])
                   if "summary_quantiles" in values else DEFAULT_QUANTILES),
        first_response_histogram=values.get("histogram_latencies", "false").lower() == "true")


@dataclass(slots=True)
class _AgeBucket:
    started: float
    seen: int = 0
    samples: list[float] = field(default_factory=list)


class SlidingSummary:
    """Quantiles of the last WINDOW_S seconds; count and sum since start."""

    __slots__ = ("_buckets", "count", "sum")

    def __init__(self) -> None:
        self._buckets: list[_AgeBucket] = [_AgeBucket(time.monotonic())]
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float, weight: int = 1) -> None:
        self.count += weight
        self.sum += value * weight
        bucket = self._current()
        for _ in range(min(weight, RESERVOIR)):
            bucket.seen += 1
            if len(bucket.samples) < RESERVOIR:
                bucket.samples.append(value)
            else:
                slot = random.randrange(bucket.seen)
                if slot < RESERVOIR:
                    bucket.samples[slot] = value

    def _current(self) -> _AgeBucket:
        now = time.monotonic()
        width = WINDOW_S / AGE_BUCKETS
        newest = self._buckets[-1]
        if now - newest.started >= width:
            newest = _AgeBucket(now)
            self._buckets.append(newest)
            self._buckets = [b for b in self._buckets if now - b.started < WINDOW_S]
        return newest

    def quantiles(self, wanted: Iterable[float]) -> list[tuple[float, float]]:
        now = time.monotonic()
        values = sorted(v for b in self._buckets if now - b.started < WINDOW_S
                        for v in b.samples)
        if not values:
            return [(q, 0.0) for q in wanted]
        last = len(values) - 1
        return [(q, values[min(last, round(q * last))]) for q in wanted]


class ObservedDuration(Duration):
    """A Duration whose additions are also observed by a summary, in microseconds (an add of
    ``ns`` over ``count`` requests observes their mean ``count`` times)."""

    __slots__ = ("summary",)

    def __init__(self) -> None:
        super().__init__()
        self.summary = SlidingSummary()

    def add(self, ns: int, count: int = 1) -> None:
        Duration.add(self, ns, count)
        if count:
            self.summary.observe(ns / count / 1000.0, count)


class FirstResponseHistogram:
    """Milliseconds from a request's arrival to its first response."""

    __slots__ = ("buckets", "count", "sum")

    def __init__(self) -> None:
        self.buckets = [0] * len(FIRST_RESPONSE_BUCKETS_MS)
        self.count = 0
        self.sum = 0.0

    def observe(self, ms: float) -> None:
        self.count += 1
        self.sum += ms
        for index, bound in enumerate(FIRST_RESPONSE_BUCKETS_MS):
            if ms <= bound:
                self.buckets[index] += 1


SUMMARY_FIELDS = ("success", "queue", "compute_input", "compute_infer", "compute_output")


def instrument(stats: ModelStats, options: LatencyOptions) -> None:
    """Give a model's fresh statistics the summaries and histogram ``options`` ask for."""
    if options.summaries:
        for name in SUMMARY_FIELDS:
            setattr(stats, name, ObservedDuration())
    if options.first_response_histogram:
        stats.first_response = FirstResponseHistogram()
