"""Prometheus metrics on --metrics-port (Triton's metric names), served from the event loop.

GET /metrics returns the text exposition format (aiohttp, as the HTTP door); anything else is
404. Counters are read from the schedulers' statistics when scraped; the host's CPU and GPU
figures come from the last poll (host_metrics.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from aiohttp import web

from shmserve.daemon.aiohttp_site import start_site
from shmserve.daemon.host_metrics import HostMetrics
from shmserve.daemon.latency_metrics import FIRST_RESPONSE_BUCKETS_MS, LatencyOptions
from shmserve.daemon.models import ModelManager
from shmserve.daemon.response_cache import ResponseCache
from shmserve.daemon.shm_registry import ShmRegistry
from shmserve.daemon.statistics import ModelStats
from shmserve.workers.protocol import Report

log = logging.getLogger("shmserve.metrics")
DEFAULT_LATENCY = LatencyOptions()

_COUNTERS: list[tuple[str, str, str]] = [
    ("nv_inference_request_success", "Number of successful inference requests", "success"),
    ("nv_inference_request_failure", "Number of failed inference requests", "fail"),
]
_DURATIONS: list[tuple[str, str, str]] = [
    ("nv_inference_request_duration_us", "Cumulative inference request duration in us",
     "success"),
    ("nv_inference_queue_duration_us", "Cumulative inference queuing duration in us", "queue"),
    ("nv_inference_compute_input_duration_us", "Cumulative compute input duration in us",
     "compute_input"),
    ("nv_inference_compute_infer_duration_us", "Cumulative compute inference duration in us",
     "compute_infer"),
    ("nv_inference_compute_output_duration_us", "Cumulative inference compute output duration "
     "in us", "compute_output"),
]

_CACHE_FAMILIES: list[tuple[str, str, str]] = [
    ("nv_cache_num_hits_per_model", "Number of cache hits per model", "cache_hit"),
    ("nv_cache_num_misses_per_model", "Number of cache misses per model", "cache_miss"),
    ("nv_cache_hit_duration_per_model", "Total cache hit duration per model, in "
     "microseconds", "cache_hit"),
    ("nv_cache_miss_duration_per_model", "Total cache miss (insert + lookup) duration per "
     "model, in microseconds", "cache_miss"),
]


def _labels(**labels: object) -> str:
    inner = ",".join(f'{key}="{str(value).replace(chr(34), "")}"'
                     for key, value in labels.items())
    return "{" + inner + "}"


def render(models: ModelManager, registry: ShmRegistry | None = None,
           cache: ResponseCache | None = None,
           latency: LatencyOptions = DEFAULT_LATENCY) -> str:
    versions = [(v.name, v.version, v.scheduler) for r in models.records()
                for v in r.versions.values()]
    # As Triton: cache metrics for the models that use the server's response cache.
    cached = [(v.name, v.version, v.scheduler.stats) for r in models.records()
              for v in r.versions.values() if cache is not None and
              v.config.response_cache.enable]
    lines: list[str] = []

    def family(name: str, help_text: str, kind: str,
               values: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        lines.extend(f"{name}{labels} {value:g}" for labels, value in values)

    def per_version(value_of: object) -> list[tuple[str, float]]:
        return [(_labels(model=name, version=version), value_of(s.stats))  # type: ignore[operator]
                for name, version, s in versions]

    for name, help_text, field in _COUNTERS:
        family(name, help_text, "counter",
               per_version(lambda stats, f=field: getattr(stats, f).count))
    family("nv_inference_count", "Number of inferences performed (batch elements)", "counter",
           per_version(lambda stats: stats.inference_count))
    family("nv_inference_exec_count", "Number of model executions performed", "counter",
           per_version(lambda stats: stats.execution_count))
    family("shmserve_inference_response_count", "Responses sent by decoupled models (each "
           "request may have any number)", "counter",
           per_version(lambda stats: stats.responses))
    family("nv_inference_pending_request_count", "Instantaneous number of pending requests",
           "gauge", per_version(lambda stats: max(stats.pending, 0)))
    if latency.counters:
        for name, help_text, field in _DURATIONS:
            family(name, help_text, "counter",
                   per_version(lambda stats, f=field: _us(stats, f)))
    if latency.summaries:
        _summaries(lines, versions, latency.quantiles)
    if latency.first_response_histogram:
        _first_response(lines, versions)
    for name, help_text, field in _CACHE_FAMILIES:
        family(name, help_text, "counter",
               [(_labels(model=model, version=version),
                 getattr(stats, field).count if name.startswith("nv_cache_num")
                 else _us(stats, field)) for model, version, stats in cached])
    if cache is not None:
        family("shmserve_response_cache_bytes", "Bytes the response cache holds (of its "
               "--cache-config size)", "gauge", [("", float(cache.used))])
        family("shmserve_response_cache_entries", "Responses the response cache holds",
               "gauge", [("", float(len(cache)))])
        family("shmserve_response_cache_evictions_total", "Responses evicted from the "
               "response cache to make room", "counter", [("", float(cache.evictions))])
    instances = []
    restarts = []
    crash_looping = []
    backoff = []
    for name, version, scheduler in versions:
        for slot in scheduler.instances:
            worker = slot.worker
            labels = dict(model=name, version=version, instance=slot.plan.name,
                          kind=slot.plan.kind,
                          device=slot.plan.device_id if slot.plan.kind == "KIND_GPU" else "cpu",
                          pid=worker.pid if worker is not None else "")
            instances.append((_labels(**labels), 1.0 if slot.alive else 0.0))
            instance = _labels(model=name, version=version, instance=slot.plan.name)
            restarts.append((instance, float(slot.generation - 1)))
            crash_looping.append((instance, 1.0 if slot.crash_looping else 0.0))
            backoff.append((instance, slot.backoff))
    family("shmserve_instance_up", "1 when the model instance's worker is alive; labels say "
           "where it runs", "gauge", instances)
    family("shmserve_instance_restarts_total", "Worker restarts of the model instance",
           "counter", restarts)
    family("shmserve_instance_crash_looping", "1 while the model instance keeps failing at "
           "start (before serving a request) and its restarts back off", "gauge",
           crash_looping)
    family("shmserve_instance_restart_backoff_seconds", "Delay before the model instance's "
           "pending restart (0 when none is waiting)", "gauge", backoff)
    _custom_families(lines, [slot.worker.report for _, _, scheduler in versions
                             for slot in scheduler.instances
                             if slot.worker is not None and slot.worker.report is not None])
    if registry is not None:
        family("shmserve_shared_memory_regions", "Registered shared-memory regions by kind and "
               "owner (a gRPC client id, or local:<channel>)", "gauge",
               [(_labels(kind=kind, owner=owner), float(count))
                for (kind, owner), count in sorted(registry.counts().items())])
    return "\n".join(lines) + "\n"


_SUMMARIES: list[tuple[str, str, str]] = [
    ("nv_inference_request_summary_us", "Summary of inference request duration in "
     "microseconds (includes cached requests)", "success"),
    ("nv_inference_queue_summary_us", "Summary of inference queuing duration in "
     "microseconds (includes cached requests)", "queue"),
    ("nv_inference_compute_input_summary_us", "Summary of compute input duration in "
     "microseconds (does not include cached requests)", "compute_input"),
    ("nv_inference_compute_infer_summary_us", "Summary of compute inference duration in "
     "microseconds (does not include cached requests)", "compute_infer"),
    ("nv_inference_compute_output_summary_us", "Summary of inference compute output duration "
     "in microseconds (does not include cached requests)", "compute_output"),
]


def _summaries(lines: list[str], versions: list[tuple[str, int, Any]],
               quantiles: tuple[float, ...]) -> None:
    for name, help_text, field in _SUMMARIES:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} summary")
        for model, version, scheduler in versions:
            summary = getattr(getattr(scheduler.stats, field), "summary", None)
            if summary is None:
                continue
            labels = f'model="{model}",version="{version}"'
            lines.append(f"{name}_count{{{labels}}} {summary.count}")
            lines.append(f"{name}_sum{{{labels}}} {summary.sum:g}")
            lines.extend(f'{name}{{{labels},quantile="{q:g}"}} {value:g}'
                         for q, value in summary.quantiles(quantiles))


def _first_response(lines: list[str], versions: list[tuple[str, int, Any]]) -> None:
    name = "nv_inference_first_response_histogram_ms"
    lines.append(f"# HELP {name} Duration from request to first response in milliseconds")
    lines.append(f"# TYPE {name} histogram")
    for model, version, scheduler in versions:
        histogram = scheduler.stats.first_response
        if histogram is None:
            continue
        labels = f'model="{model}",version="{version}"'
        lines.append(f"{name}_count{{{labels}}} {histogram.count}")
        lines.append(f"{name}_sum{{{labels}}} {histogram.sum:g}")
        for bound, count in zip(FIRST_RESPONSE_BUCKETS_MS, histogram.buckets, strict=True):
            lines.append(f'{name}{{{labels},le="{bound:g}"}} {count}')  # (cumulative)
        lines.append(f'{name}{{{labels},le="+Inf"}} {histogram.count}')


def _custom_families(lines: list[str], reports: list[Report]) -> None:
    """Models' own metrics (pb_utils.MetricFamily), as each live instance last reported them.
    Instances of one model share a family by name, as in Triton's one registry: counters and
    histograms add up across instances, a gauge shows the last instance's value."""
    families: dict[str, tuple[str, str, dict[str, Any]]] = {}
    for report in reports:
        for name, description, kind, metrics in report.metrics:
            _, _, values = families.setdefault(name, (description, kind, {}))
            for labels, value in metrics:
                key = _labels(**dict(labels)) if labels else ""
                if kind == "histogram":
                    bounds, counts, total, count = value
                    held = values.get(key)
                    if held is None:
                        values[key] = [bounds, list(counts), total, count]
                    else:
                        held[1] = [a + b for a, b in zip(held[1], counts, strict=False)]
                        held[2] += total
                        held[3] += count
                elif kind == "counter":
                    values[key] = values.get(key, 0.0) + value
                else:
                    values[key] = value
    for name, (description, kind, values) in families.items():
        lines.append(f"# HELP {name} {description}")
        lines.append(f"# TYPE {name} {kind}")
        for key, value in values.items():
            if kind != "histogram":
                lines.append(f"{name}{key} {value:g}")
                continue
            bounds, counts, total, count = value
            inner = key[1:-1]
            cumulative = 0
            for bound, bucket in zip([*bounds, float("inf")], counts, strict=False):
                cumulative += bucket
                le = "+Inf" if bound == float("inf") else f"{bound:g}"
                labels = "{" + (inner + "," if inner else "") + f'le="{le}"' + "}"
                lines.append(f"{name}_bucket{labels} {cumulative}")
            lines.append(f"{name}_sum{key} {total:g}")
            lines.append(f"{name}_count{key} {count}")


def _us(stats: ModelStats, field: str) -> float:
    return int(getattr(stats, field).ns / 1000)


class MetricsServer:
    """GET /metrics (aiohttp on the supervisor's loop); every other path is 404."""

    def __init__(self, models: ModelManager, address: str, port: int,
                 registry: ShmRegistry | None = None, cache: ResponseCache | None = None,
                 host: HostMetrics | None = None,
                 latency: LatencyOptions = DEFAULT_LATENCY) -> None:
        self._models = models
        self._registry = registry
        self._cache = cache
        self._host = host
        self._latency = latency
        self._address = address
        self._port = port
        self._runner: web.AppRunner | None = None
        self.port: int | None = None
        #: More exposition lines, rendered at each scrape (the frontend processes' counters).
        self.extra: Callable[[], list[str]] | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        self._runner, self.port = await start_site(app, self._address, self._port)
        if self._host is not None:
            await self._host.start()
        log.info("Started Metrics Service at %s:%d", self._address, self.port)

    async def _metrics(self, request: web.Request) -> web.Response:
        text = render(self._models, self._registry, self._cache, self._latency)
        if self._host is not None:
            text += "".join(line + "\n" for line in self._host.lines())
        if self.extra is not None:
            text += "".join(line + "\n" for line in self.extra())
        return web.Response(body=text.encode(),
                            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    async def stop(self) -> None:
        if self._host is not None:
            await self._host.stop()
        if self._runner is not None:
            await self._runner.cleanup()
