"""Per model-version counters in Triton's ModelStatistics shape."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns


@dataclass(slots=True)
class BatchStat:
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


@dataclass(slots=True)
class ResponseStat:
    """Triton's InferResponseStatistics for the k-th response of decoupled requests. The
    worker does not time a response's infer and output apart: ``compute_infer`` and
    ``success`` hold the time since the request's previous response (or since it arrived)."""

    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    empty_response: Duration = field(default_factory=Duration)
    cancel: Duration = field(default_factory=Duration)


@dataclass(slots=True)
class ModelStats:
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    cache_hit: Duration = field(default_factory=Duration)
    cache_miss: Duration = field(default_factory=Duration)
    inference_count: int = 0
    execution_count: int = 0
    last_inference_ms: int = 0
    pending: int = 0
    responses: int = 0  # responses sent by decoupled models (unary answers not counted)
    batches: dict[int, BatchStat] = field(default_factory=dict)
    response_stats: dict[int, ResponseStat] = field(default_factory=dict)
    # --metrics-config histogram_latencies=true: latency_metrics.FirstResponseHistogram
    first_response: Any = None

    def record_response(self, index: int, kind: str, duration_ns: int) -> None:
        """The ``index``-th response of a decoupled request: kind success, fail or
        empty_response (the final flag alone)."""
        stat = self.response_stats.get(index)
        if stat is None:
            stat = self.response_stats[index] = ResponseStat()
        getattr(stat, kind).add(duration_ns)
        if kind == "success":
            stat.compute_infer.add(duration_ns)
            stat.compute_output.add(0)
        if kind != "empty_response":
            self.responses += 1

    def record_batch(self, batch_size: int, requests: int, timings: list[int]) -> None:
        compute_input, compute_infer, compute_output = timings
        self.execution_count += 1
        self.inference_count += batch_size
        # Triton counts compute durations once per request in the batch.
        self.compute_input.add(compute_input * requests, requests)
        self.compute_infer.add(compute_infer * requests, requests)
        self.compute_output.add(compute_output * requests, requests)
        stat = self.batches.setdefault(batch_size, BatchStat())
        stat.compute_input.add(compute_input)
        stat.compute_infer.add(compute_infer)
        stat.compute_output.add(compute_output)
        self.last_inference_ms = int(time.time() * 1000)

    def record_request(self, ok: bool, duration_ns: int) -> None:
        (self.success if ok else self.fail).add(duration_ns)
