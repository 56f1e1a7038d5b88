"""The host's own metrics on /metrics, with Triton's names: CPU utilization and memory
(``--allow-cpu-metrics``, read from /proc as Triton does) and, per GPU, utilization, memory
and power (``--allow-gpu-metrics``, from ``nvidia-smi``; Triton reads the same through DCGM).

They are polled every ``--metrics-interval-ms`` on a thread, never on the event loop; the
supervisor never loads CUDA or NVML for them. ``nv_energy_consumption`` is the power samples
integrated over time (joules since the server started), since nvidia-smi reports power, not
an energy counter.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import shutil
import subprocess
import time
from dataclasses import dataclass, field

log = logging.getLogger("shmserve.metrics")

GPU_QUERY = "uuid,utilization.gpu,memory.total,memory.used,power.draw,power.limit"
_MIB = 1 << 20


@dataclass(frozen=True, slots=True)
class CpuTimes:
    """The aggregate line of /proc/stat, in clock ticks."""

    busy: int   # user + nice + system + irq + softirq + steal
    idle: int   # idle + iowait


def read_cpu_times(path: str = "/proc/stat") -> CpuTimes | None:
    try:
        with open(path) as stat:
            first = stat.readline().split()
    except OSError:
        return None
    if len(first) < 9 or first[0] != "cpu":
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = (int(v) for v in first[1:9])
    return CpuTimes(user + nice + system + irq + softirq + steal, idle + iowait)


def cpu_utilization(new: CpuTimes, old: CpuTimes) -> float:
    """The share of non-idle time between two readings, 0.0 to 1.0 (Triton's formula)."""
    busy, idle = max(new.busy - old.busy, 0), max(new.idle - old.idle, 0)
    return busy / (busy + idle) if busy + idle else 0.0


def read_memory(path: str = "/proc/meminfo") -> tuple[int, int] | None:
    """(total, used) bytes, used being MemTotal - MemAvailable as in Triton."""
    values: dict[str, int] = {}
    try:
        with open(path) as meminfo:
            for line in meminfo:
                name, _, rest = line.partition(":")
                if name in ("MemTotal", "MemAvailable"):
                    values[name] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    total, available = values.get("MemTotal"), values.get("MemAvailable")
    if total is None or available is None or available > total:
        return None
    return total, total - available


@dataclass(frozen=True, slots=True)
class GpuSample:
    uuid: str
    utilization: float     # 0.0 to 1.0
    memory_total: float    # bytes
    memory_used: float     # bytes
    power: float           # watts (nan when the GPU does not report it)
    power_limit: float     # watts


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.nan   # "[N/A]", "[Not Supported]"


def parse_gpu_query(text: str) -> list[GpuSample]:
    """``nvidia-smi --query-gpu=GPU_QUERY --format=csv,noheader,nounits`` output."""
    samples = []
    for line in text.splitlines():
        fields = [part.strip() for part in line.split(",")]
        if len(fields) != 6 or not fields[0]:
            continue
        utilization, total, used, power, limit = (_number(v) for v in fields[1:])
        samples.append(GpuSample(fields[0], utilization / 100.0, total * _MIB, used * _MIB,
                                 power, limit))
    return samples


@dataclass(slots=True)
class _Snapshot:
    cpu_utilization: float | None = None
    memory: tuple[int, int] | None = None
    gpus: list[GpuSample] = field(default_factory=list)
    energy: dict[str, float] = field(default_factory=dict)   # joules by GPU uuid


class HostMetrics:
    """Polls the host every ``interval_s`` on a thread; ``lines()`` renders the last poll."""

    def __init__(self, cpu: bool, gpu: bool, interval_s: float) -> None:
        self._cpu = cpu
        self._smi = shutil.which("nvidia-smi") if gpu else None
        self._interval = max(interval_s, 0.05)
        self._snapshot = _Snapshot()
        self._last_cpu: CpuTimes | None = None
        self._last_power: dict[str, tuple[float, float]] = {}  # uuid -> (watts, when)
        self._energy: dict[str, float] = {}
        self._gpu_failure_logged = False
        self._task: asyncio.Task[None] | None = None

    @property
    def enabled(self) -> bool:
        return self._cpu or self._smi is not None

    async def start(self) -> None:
        if not self.enabled:
            return
        if self._smi is not None:
            log.info("Collecting GPU metrics with %s", self._smi)
        await asyncio.get_running_loop().run_in_executor(None, self._poll)
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self._interval)
            await loop.run_in_executor(None, self._poll)

    def _poll(self) -> None:
        """One reading of everything (on a thread): the new snapshot replaces the old one."""
        snapshot = _Snapshot()
        if self._cpu:
            times = read_cpu_times()
            if times is not None and self._last_cpu is not None:
                snapshot.cpu_utilization = cpu_utilization(times, self._last_cpu)
            elif times is not None:
                snapshot.cpu_utilization = 0.0
            self._last_cpu = times or self._last_cpu
            snapshot.memory = read_memory()
        if self._smi is not None:
            snapshot.gpus = self._query_gpus(self._smi)
            self._integrate_power(snapshot.gpus)
            snapshot.energy = dict(self._energy)
        self._snapshot = snapshot

    def _query_gpus(self, smi: str) -> list[GpuSample]:
        try:
            done = subprocess.run([smi, f"--query-gpu={GPU_QUERY}",
                                   "--format=csv,noheader,nounits"],
                                  capture_output=True, text=True, timeout=10, check=False)
        except (OSError, subprocess.SubprocessError) as exc:
            self._log_gpu_failure(str(exc))
            return []
        if done.returncode != 0:
            self._log_gpu_failure(f"exit {done.returncode}: {done.stderr.strip()[:200]}")
            return []
        return parse_gpu_query(done.stdout)

    def _log_gpu_failure(self, why: str) -> None:
        if not self._gpu_failure_logged:
            self._gpu_failure_logged = True
            log.warning("GPU metrics are not available: nvidia-smi failed (%s)", why)

    def _integrate_power(self, gpus: list[GpuSample]) -> None:
        now = time.monotonic()
        for gpu in gpus:
            previous = self._last_power.get(gpu.uuid)
            self._energy.setdefault(gpu.uuid, 0.0)
            if math.isnan(gpu.power):
                continue
            if previous is not None:
                watts, when = previous
                self._energy[gpu.uuid] += (watts + gpu.power) / 2 * (now - when)
            self._last_power[gpu.uuid] = (gpu.power, now)

    def lines(self) -> list[str]:
        """The exposition lines of the last poll (none for what is off or unreadable)."""
        snapshot = self._snapshot
        lines: list[str] = []

        def family(name: str, help_text: str, kind: str,
                   values: list[tuple[str, float]]) -> None:
            values = [(labels, value) for labels, value in values if not math.isnan(value)]
            if values:
                lines.append(f"# HELP {name} {help_text}")
                lines.append(f"# TYPE {name} {kind}")
                lines.extend(f"{name}{labels} {value:.17g}" for labels, value in values)

        if snapshot.cpu_utilization is not None:
            family("nv_cpu_utilization", "CPU utilization rate [0.0 - 1.0]", "gauge",
                   [("", snapshot.cpu_utilization)])
        if snapshot.memory is not None:
            total, used = snapshot.memory
            family("nv_cpu_memory_total_bytes", "CPU total memory (RAM), in bytes", "gauge",
                   [("", float(total))])
            family("nv_cpu_memory_used_bytes", "CPU used memory (RAM), in bytes", "gauge",
                   [("", float(used))])
        gpus = snapshot.gpus

        def per_gpu(value_of: str) -> list[tuple[str, float]]:
            return [(f'{{gpu_uuid="{gpu.uuid}"}}', float(getattr(gpu, value_of)))
                    for gpu in gpus]

        family("nv_gpu_utilization", "GPU utilization rate [0.0 - 1.0)", "gauge",
               per_gpu("utilization"))
        family("nv_gpu_memory_total_bytes", "GPU total memory, in bytes", "gauge",
               per_gpu("memory_total"))
        family("nv_gpu_memory_used_bytes", "GPU used memory, in bytes", "gauge",
               per_gpu("memory_used"))
        family("nv_gpu_power_usage", "GPU power usage in watts", "gauge", per_gpu("power"))
        family("nv_gpu_power_limit", "GPU power management limit in watts", "gauge",
               per_gpu("power_limit"))
        family("nv_energy_consumption", "GPU energy consumption in joules since the server "
               "started", "counter",
               [(f'{{gpu_uuid="{gpu.uuid}"}}', snapshot.energy.get(gpu.uuid, 0.0))
                for gpu in gpus])
        return lines
