"""Request tracing in Triton's "triton" mode: sampled requests' timestamps, as JSON, in the
trace file.

Settings come from ``--trace-config`` (tritonserver's syntax: ``level=TIMESTAMPS``,
``rate=N``, ``count=N``, ``triton,file=PATH``, ``triton,log-frequency=N``) and change at run
time through the trace API (gRPC TraceSetting, HTTP ``/v2[/models/<m>]/trace/setting``), for
the server or for one model; a model's setting falls back, field by field, to the server's.
One request in ``rate`` is traced while ``count`` allows (-1: no limit). A trace records
REQUEST_START and QUEUE_START when the core accepts the request, COMPUTE_START,
COMPUTE_INPUT_END, COMPUTE_OUTPUT_START and COMPUTE_END from its instance's execution (the
worker's own durations, counted back from when its answer arrived), and REQUEST_END when the
request is done; all on the monotonic clock, in nanoseconds. The steps of a traced ensemble
request are traced too, as its children (``parent_id``), outside the rate and count.

The file is a JSON array as Triton writes it: for each trace an object with its id, model
name, version and request id, then one object per timestamp. Traces gather in memory and are
written on a thread: to ``<file>.<n>`` every ``log-frequency`` traces (and when ``count``
traces were collected), else to ``<file>`` when the server stops.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
from dataclasses import dataclass, field, replace
from typing import Any

from shmserve.daemon.errors import invalid_argument, unimplemented
from shmserve.daemon.trace_config import LEVELS, MIN_TRACE_COUNT, TraceConfig

log = logging.getLogger("shmserve.trace")

@dataclass(slots=True)
class Trace:
    id: int
    model: str
    version: int
    request_id: str
    parent_id: int = 0        # an ensemble step's: the ensemble request's trace
    timestamps: list[tuple[str, int]] = field(default_factory=list)

    def mark(self, name: str, ns: int | None = None) -> None:
        self.timestamps.append((name, time.monotonic_ns() if ns is None else ns))

    def objects(self) -> list[dict[str, Any]]:
        head: dict[str, Any] = {"id": self.id, "model_name": self.model,
                                "model_version": self.version}
        if self.request_id:
            head["request_id"] = self.request_id
        if self.parent_id:
            head["parent_id"] = self.parent_id
        return [head, *({"id": self.id, "timestamps": [{"name": name, "ns": ns}]}
                         for name, ns in self.timestamps)]


@dataclass(slots=True)
class _Sampler:
    """A setting's running state: requests seen and traces left (count)."""

    seen: int = 0
    left: int = -1


class Tracer:
    def __init__(self, config: TraceConfig) -> None:
        self._global = config
        self._models: dict[str, dict[str, Any]] = {}   # model -> its own fields
        self._samplers: dict[str, _Sampler] = {}        # "" for the global setting
        self._ids = itertools.count(1)
        self._pending: list[dict[str, Any]] = []
        self._in_pending = 0
        self._index = itertools.count(0)
        self._writes: set[asyncio.Future[None]] = set()
        self._active = self._any_active()

    def _any_active(self) -> bool:
        """Whether any setting traces at all (checked once per request when not)."""
        return any(config.level != ("OFF",) and config.file and config.rate
                   for config in [self._global, *map(self.setting, self._models)])

    # --- settings -----------------------------------------------------------------------
    def setting(self, model: str = "") -> TraceConfig:
        own = self._models.get(model, {}) if model else {}
        return replace(self._global, **own)

    def _sampler(self, model: str) -> _Sampler:
        key = model if model in self._models else ""
        sampler = self._samplers.get(key)
        if sampler is None:
            sampler = self._samplers[key] = _Sampler(left=self.setting(model).count)
        return sampler

    def update(self, model: str, updates: dict[str, list[str] | None]) -> None:
        """The trace API's update (None: back to the server's value for a model, Triton's
        defaults for the server). Raises ServeError with Triton's texts."""
        fields: dict[str, Any] = {}
        cleared: list[str] = []
        for key, values in updates.items():
            name = {"trace_level": "level", "trace_rate": "rate", "trace_count": "count",
                    "log_frequency": "log_frequency"}.get(key)
            if key == "trace_file":
                raise unimplemented("trace file location can not be updated through "
                                    "network protocol")
            if key == "trace_mode":
                if values is not None and values != ["triton"]:
                    raise invalid_argument(f"unsupported trace mode '{', '.join(values)}'")
                continue
            if name is None:
                raise invalid_argument(f"unknown trace setting '{key}'")
            if values is None:
                cleared.append(name)
            elif name == "level":
                fields[name] = _levels(values)
            else:
                fields[name] = _number(key, values)
        if model:
            own = self._models.setdefault(model, {})
            for name in cleared:
                own.pop(name, None)
            own.update(fields)
            if not own:
                del self._models[model]
        else:
            defaults = TraceConfig()
            self._global = replace(self._global, **fields,
                                   **{name: getattr(defaults, name) for name in cleared})
        if "count" in fields or "count" in cleared:
            self._samplers.pop(model if model in self._models else "", None)
        self._active = self._any_active()

    def answer(self, model: str = "") -> dict[str, list[str]]:
        """Every setting as the trace API answers it."""
        config = self.setting(model)
        return {"trace_level": list(config.level), "trace_rate": [str(config.rate)],
                "trace_count": [str(self._sampler(model).left)],
                "log_frequency": [str(config.log_frequency)], "trace_file": [config.file],
                "trace_mode": ["triton"]}

    # --- traces -------------------------------------------------------------------------
    def start(self, model: str, version: int, request_id: str,
              parent: Trace | None = None) -> Trace | None:
        """A trace for this request, if it is sampled; an ensemble step of a traced request
        is traced too, as its child, outside the rate and count."""
        if parent is not None:
            return self._new(model, version, request_id, parent.id)
        if not self._active:
            return None
        config = self.setting(model)
        if config.level == ("OFF",) or not config.file or config.rate == 0:
            return None
        sampler = self._sampler(model)
        sampler.seen += 1
        if sampler.left == 0 or (sampler.seen - 1) % config.rate:
            return None
        if sampler.left > 0:
            sampler.left -= 1
        return self._new(model, version, request_id, 0)

    def _new(self, model: str, version: int, request_id: str, parent_id: int) -> Trace:
        trace = Trace(next(self._ids), model, version, request_id, parent_id)
        now = time.monotonic_ns()
        trace.mark("REQUEST_START", now)
        trace.mark("QUEUE_START", now)
        return trace

    def end(self, trace: Trace) -> None:
        """The traced request is done: its objects join the file's."""
        trace.mark("REQUEST_END")
        config = self.setting(trace.model)
        self._pending.extend(trace.objects())
        if trace.parent_id:
            return  # written with its parent's batch of traces; not counted
        self._in_pending += 1
        exhausted = self._sampler(trace.model).left == 0
        if (config.log_frequency and self._in_pending >= config.log_frequency) or exhausted:
            self._flush(f"{config.file}.{next(self._index)}")

    def _flush(self, path: str) -> None:
        objects, self._pending, self._in_pending = self._pending, [], 0
        if not objects:
            return
        future = asyncio.get_running_loop().run_in_executor(None, _write, path, objects)
        self._writes.add(future)
        future.add_done_callback(self._writes.discard)

    async def close(self) -> None:
        """At stop: what is left goes to the trace file, and every write finishes."""
        config = self._global
        if self._pending and config.file:
            self._flush(f"{config.file}.{next(self._index)}" if config.log_frequency
                        else config.file)
        if self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)


def compute_marks(trace: Trace, input_ns: int, infer_ns: int, output_ns: int,
                  answered_ns: int | None = None) -> None:
    """An execution's timestamps, counted back from when its answer arrived."""
    end = time.monotonic_ns() if answered_ns is None else answered_ns
    output_start = end - output_ns
    input_end = output_start - infer_ns
    trace.mark("COMPUTE_START", input_end - input_ns)
    trace.mark("COMPUTE_INPUT_END", input_end)
    trace.mark("COMPUTE_OUTPUT_START", output_start)
    trace.mark("COMPUTE_END", end)


def _write(path: str, objects: list[dict[str, Any]]) -> None:
    try:
        with open(path, "w") as out:
            json.dump(objects, out, separators=(",", ":"))
    except OSError as exc:
        log.error("failed creating trace file %s: %s", path, exc)


def _levels(values: list[str]) -> tuple[str, ...]:
    if "OFF" in values:
        if len(values) != 1:
            raise invalid_argument("Expect only one trace level 'OFF' is specified")
        return ("OFF",)
    levels = tuple(level for level in ("TIMESTAMPS", "TENSORS") if level in values)
    unknown = [value for value in values if value not in LEVELS]
    if unknown or not levels:
        raise invalid_argument(f"Unable to parse 'trace_level', got: {', '.join(values)}")
    return levels


def _number(key: str, values: list[str]) -> int:
    text = values[0] if len(values) == 1 else ",".join(values)
    try:
        value = int(text)
    except ValueError:
        raise invalid_argument(f"Unable to parse '{key}', got: {text}") from None
    if key == "trace_count" and value < MIN_TRACE_COUNT:
        raise invalid_argument(f"Unable to parse 'trace_count'. Expecting value >= "
                               f"{MIN_TRACE_COUNT}, got:{text}")
    if key != "trace_count" and value < 0:
        raise invalid_argument(f"Unable to parse '{key}', got: {text}")
    return value

