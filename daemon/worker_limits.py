"""How long a model instance's worker may take: to initialize, to execute a batch, to answer
its heartbeat; and how the restarts of a failing instance back off.

The server settings give the defaults; a model's config.pbtxt may override the two timeouts
that depend on the model, through its ``parameters``::

    parameters { key: "shmserve.init_timeout_secs" value: { string_value: "600" } }
    parameters { key: "shmserve.execution_timeout_secs" value: { string_value: "5" } }
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from shmserve.daemon.settings import Settings

INIT_TIMEOUT_PARAMETER = "shmserve.init_timeout_secs"
EXECUTION_TIMEOUT_PARAMETER = "shmserve.execution_timeout_secs"

#: A worker silent for this share of the heartbeat timeout no longer counts as serving
#: (ModelReady false) before it is killed at the full timeout.
SUSPECT_SHARE = 0.5
#: Heartbeats per heartbeat timeout, at least: a few lost pongs never kill a worker.
BEATS_PER_TIMEOUT = 5


@dataclass(frozen=True, slots=True)
class WorkerLimits:
    """The time limits one worker runs under (0 = no limit)."""

    init_timeout_secs: float = 300.0
    execution_timeout_secs: float = 0.0
    heartbeat_timeout_secs: float = 10.0
    heartbeat_secs: float = 2.0        # the worker sends a heartbeat this often

    @property
    def watch_interval(self) -> float:
        """How often the supervisor checks the worker's heartbeat and execution time."""
        interval = self.heartbeat_secs
        if self.execution_timeout_secs:
            interval = min(interval, self.execution_timeout_secs / 10)
        return max(interval, 0.02)


class LimitError(ValueError):
    """A timeout parameter in a model's config that is not a number of seconds."""


def _seconds(parameters: Mapping[str, str], key: str, default: float) -> float:
    text = parameters.get(key)
    if text is None:
        return default
    try:
        value = float(text)
    except ValueError:
        raise LimitError(f"parameter '{key}' must be a number of seconds, got "
                         f"'{text}'") from None
    if value < 0 or value != value:
        raise LimitError(f"parameter '{key}' must be 0 or more seconds, got '{text}'")
    return value


def limits_for(settings: Settings, parameters: Mapping[str, str]) -> WorkerLimits:
    """The limits of a model's workers: the settings, overridden by the model's config
    ``parameters`` (key -> string value). Raises LimitError for a malformed override."""
    heartbeat_timeout = max(settings.worker_heartbeat_timeout_secs, 0.1)
    return WorkerLimits(
        init_timeout_secs=_seconds(parameters, INIT_TIMEOUT_PARAMETER,
                                   settings.model_init_timeout_secs),
        execution_timeout_secs=_seconds(parameters, EXECUTION_TIMEOUT_PARAMETER,
                                        settings.model_execution_timeout_secs),
        heartbeat_timeout_secs=heartbeat_timeout,
        heartbeat_secs=max(min(settings.worker_heartbeat_secs,
                               heartbeat_timeout / BEATS_PER_TIMEOUT), 0.02),
    )


def restart_delay(failures: int, cap: float) -> float:
    """Backoff before restarting an instance whose last ``failures`` starts failed in a row
    (0: at once; then 0.1 s doubling, capped)."""
    if failures <= 0:
        return 0.0
    return min(0.1 * (2 ** min(failures - 1, 30)), max(cap, 0.0))
