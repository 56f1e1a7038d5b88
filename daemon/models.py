"""The model manager: which models and versions exist, their state, load and unload.

Load order (Triton's): parse config.pbtxt -> repository agents LOAD -> start the instance
workers (each runs its initialize hooks) -> READY -> agents LOAD_COMPLETE (or LOAD_FAIL).
A reload keeps serving the old versions until the new ones are ready, then drains the old.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from google.protobuf import json_format

from shmserve.daemon.errors import ServeError, internal, not_found, unavailable, unknown_model
from shmserve.daemon.model_config import (
    ConfigError,
    InstancePlan,
    complete_config,
    config_to_dict,
    plan_instances,
    read_config,
    select_versions,
)
from shmserve.daemon.scheduler import Scheduler
from shmserve.daemon.settings import Settings
from shmserve.protos import shmserve_model_config_pb2 as mc

log = logging.getLogger("shmserve.models")

READY = "READY"
LOADING = "LOADING"
UNLOADING = "UNLOADING"
UNAVAILABLE = "UNAVAILABLE"


@dataclass
class ModelVersion:
    name: str
    version: int
    config: mc.ModelConfig
    scheduler: Scheduler
    state: str = LOADING
    reason: str = ""

    @property
    def ready(self) -> bool:
        return self.state == READY and self.scheduler.ready


@dataclass
class ModelRecord:
    name: str
    versions: dict[int, ModelVersion] = field(default_factory=dict)
    state: str = UNAVAILABLE          # for the index when no version is loaded
    reason: str = ""
    agents: Any = None                # the AgentChain of the loaded generation
    temp_dir: str | None = None       # where "file:" overrides were written
    fingerprint: tuple[tuple[str, int, int], ...] = ()
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def config(self) -> mc.ModelConfig | None:
        if not self.versions:
            return None
        return self.versions[max(self.versions)].config


class ModelManager:
    def __init__(self, settings: Settings, supervisor_pid: int, gpu_ids: list[int]) -> None:
        self._settings = settings
        self._supervisor_pid = supervisor_pid
        self._gpu_ids = gpu_ids
        self._root = Path(settings.model_repository)
        self._records: dict[str, ModelRecord] = {}
        self._log_level = logging.DEBUG if settings.log_verbose else logging.WARNING

    # --- discovery ----------------------------------------------------------------------
    def repository_models(self) -> list[str]:
        try:
            return sorted(entry.name for entry in self._root.iterdir()
                          if entry.is_dir() and not entry.name.startswith("."))
        except OSError:
            return []

    async def load_startup_models(self) -> None:
        mode = self._settings.model_control_mode
        names = self.repository_models()
        if mode == "explicit":
            wanted = self._settings.load_models
            names = names if "*" in wanted else [n for n in wanted]
        for name in names:
            self._records.setdefault(name, ModelRecord(name))
        results = await asyncio.gather(*(self.load(name) for name in names),
                                       return_exceptions=True)
        for name, result in zip(names, results, strict=True):
            if isinstance(result, ServeError):
                log.error("model '%s' failed to load: %s", name, result.message)
            elif isinstance(result, BaseException):
                log.error("model '%s' failed to load", name, exc_info=result)

    # --- load / unload ------------------------------------------------------------------
    async def load(self, name: str, config_json: str | None = None,
                   files: dict[str, bytes] | None = None) -> None:
        record = self._records.setdefault(name, ModelRecord(name))
        async with record.lock:
            await self._load_locked(record, config_json, files)

    async def _load_locked(self, record: ModelRecord, config_json: str | None,
                           files: dict[str, bytes] | None) -> None:
        name = record.name
        model_dir = self._root / name
        temp_dir: str | None = None
        if files:
            temp_dir = tempfile.mkdtemp(prefix=f"shmserve-{name}-")
            model_dir = _write_override_files(Path(temp_dir) / name, files)
        elif not model_dir.is_dir():
            raise internal(f"failed to load '{name}', failed to poll from model repository")
        previous_state = record.state
        if not files:
            record.fingerprint = fingerprint(model_dir)
        if not record.versions:
            record.state, record.reason = LOADING, ""
        try:
            config = self._load_config(model_dir, config_json)
            agents, model_dir, config = await self._run_agents(name, model_dir, config,
                                                               config_json)
        except ServeError as exc:
            if not record.versions:
                record.state, record.reason = UNAVAILABLE, exc.message
            else:
                record.state = previous_state
            _remove_dir(temp_dir)
            raise
        versions = select_versions(model_dir, config)
        if not versions:
            record.state = UNAVAILABLE if not record.versions else previous_state
            record.reason = "no version is available"
            await _agents_call(agents, "load_fail")
            _remove_dir(temp_dir)
            raise internal(f"failed to load '{name}', no version is available")
        started: dict[int, ModelVersion] = {}
        failures: list[tuple[int, str]] = []
        for version in versions:
            model_version = self._new_version(name, version, config, model_dir)
            try:
                await model_version.scheduler.start()
            except ServeError as exc:
                failures.append((version, exc.message))
                continue
            model_version.state = READY
            started[version] = model_version
        if failures:
            for model_version in started.values():
                await model_version.scheduler.stop(self._settings.exit_timeout_secs)
            await _agents_call(agents, "load_fail")
            _remove_dir(temp_dir)
            version, reason = failures[0]
            if not record.versions:
                record.state, record.reason = UNAVAILABLE, reason
            log.error("model '%s' version %d failed to load: %s", name, version, reason)
            raise internal(f"load failed for model '{name}': version {version} is at "
                           f"UNAVAILABLE state: {reason};")
        old_versions, old_agents, old_temp = record.versions, record.agents, record.temp_dir
        record.versions, record.agents, record.temp_dir = started, agents, temp_dir
        record.state, record.reason = READY, ""
        await _agents_call(agents, "load_complete")
        log.info("model '%s' loaded, versions %s", name, sorted(started))
        if old_versions:
            await self._retire(old_versions, old_agents, old_temp)

    def _load_config(self, model_dir: Path, config_json: str | None) -> mc.ModelConfig:
        try:
            if config_json is not None:
                config = mc.ModelConfig()
                json_format.Parse(config_json, config)
            else:
                config = read_config(model_dir)
            complete_config(config, model_dir, self._gpu_ids)
        except (ConfigError, json_format.ParseError) as exc:
            raise internal(f"failed to load '{model_dir.name}', {exc}") from None
        return config

    async def _run_agents(self, name: str, model_dir: Path, config: mc.ModelConfig,
                          config_json: str | None) -> tuple[Any, Path, mc.ModelConfig]:
        if not config.model_repository_agents.agents:
            return None, model_dir, config
        from shmserve.repoagents.runner import AgentChain, AgentError
        specs = [(agent.name, dict(agent.parameters))
                 for agent in config.model_repository_agents.agents]
        versions = select_versions(model_dir, config)
        try:
            chain = await asyncio.to_thread(AgentChain.create, name, specs,
                                            self._settings.repoagent_directory)
            location = await asyncio.to_thread(chain.load, str(model_dir), versions,
                                               config_to_dict(config))
        except AgentError as exc:
            raise internal(f"failed to load '{name}', {exc}") from None
        new_dir = Path(location)
        if new_dir != model_dir and config_json is None:
            try:
                config = read_config(new_dir)
                complete_config(config, new_dir if new_dir.name == name else model_dir,
                                self._gpu_ids)
            except ConfigError as exc:
                await _agents_call(chain, "load_fail")
                raise internal(f"failed to load '{name}', {exc}") from None
        return chain, new_dir, config

    def _new_version(self, name: str, version: int, config: mc.ModelConfig,
                     model_dir: Path) -> ModelVersion:
        config_dict = config_to_dict(config)
        backend = config.backend
        settings = self._settings

        def make_spec(plan: InstancePlan, owner: str) -> dict[str, Any]:
            spec: dict[str, Any] = {
                "supervisor_pid": self._supervisor_pid,
                "arena_owner": owner,
                "backend": backend,
                "log_level": self._log_level,
                "model": {"name": name, "version": version, "config": config_dict,
                          "repository_path": str(model_dir),
                          "version_path": str(model_dir / str(version))},
                "instance": {"name": plan.name, "kind": plan.kind, "device_id": plan.device_id,
                             "index": plan.index},
            }
            if plan.kind == "KIND_GPU":
                spec["cuda_visible_devices"] = str(plan.device_id)
            return spec

        batching = config.dynamic_batching if config.HasField("dynamic_batching") else None
        scheduler = Scheduler(name, version, config.max_batch_size, batching,
                              plan_instances(config), make_spec, settings, self._supervisor_pid)
        return ModelVersion(name, version, config, scheduler)

    async def unload(self, name: str) -> None:
        record = self._records.get(name)
        if record is None:
            return
        async with record.lock:
            versions, agents, temp_dir = record.versions, record.agents, record.temp_dir
            record.versions, record.agents, record.temp_dir = {}, None, None
            record.state, record.reason = UNLOADING, ""
            await self._retire(versions, agents, temp_dir)
            record.state, record.reason = UNAVAILABLE, "unloaded"

    async def _retire(self, versions: dict[int, ModelVersion], agents: Any,
                      temp_dir: str | None) -> None:
        """Drain in-flight requests, then stop the workers and release agent locations."""
        await _agents_call(agents, "unload")
        for model_version in versions.values():
            model_version.state = UNLOADING
        timeout = self._settings.exit_timeout_secs
        await asyncio.gather(*(v.scheduler.drain(timeout) for v in versions.values()))
        await asyncio.gather(*(v.scheduler.stop(timeout) for v in versions.values()))
        await _agents_call(agents, "unload_complete")
        _remove_dir(temp_dir)

    async def shutdown(self) -> None:
        await asyncio.gather(*(self.unload(name) for name in list(self._records)),
                             return_exceptions=True)

    # --- lookups ------------------------------------------------------------------------
    def record(self, name: str) -> ModelRecord:
        record = self._records.get(name)
        if record is None:
            raise unknown_model(name)
        return record

    def resolve(self, name: str, version: str) -> ModelVersion:
        """The version a request addresses ("" = the highest ready one)."""
        record = self._records.get(name)
        if record is None or (not record.versions and record.state != UNAVAILABLE):
            raise unknown_model(name)
        if not version:
            ready = [v for v in record.versions.values() if v.state == READY]
            if not ready:
                if record.versions or record.state == UNAVAILABLE:
                    raise unavailable(f"Request for unknown model: '{name}' has no available "
                                      f"versions")
                raise unknown_model(name)
            return max(ready, key=lambda v: v.version)
        if not version.isdigit():
            raise not_found(f"Request for unknown model: '{name}' version {version} is not "
                            f"found")
        found = record.versions.get(int(version))
        if found is None:
            raise not_found(f"Request for unknown model: '{name}' version {version} is not "
                            f"found")
        if found.state != READY:
            raise unavailable(f"Request for unknown model: '{name}' version {version} is not "
                              f"at ready state")
        return found

    def is_ready(self, name: str, version: str) -> bool:
        try:
            return self.resolve(name, version).ready
        except ServeError:
            return False

    def all_ready(self) -> bool:
        return all(v.ready for r in self._records.values() for v in r.versions.values()) and \
            all(r.versions or r.state != LOADING for r in self._records.values())

    def records(self) -> list[ModelRecord]:
        return [self._records[name] for name in sorted(self._records)]

    def schedulers(self) -> list[Scheduler]:
        return [v.scheduler for r in self._records.values() for v in r.versions.values()]

    def release_regions(self, region_ids: list[int]) -> None:
        for scheduler in self.schedulers():
            scheduler.release_regions(region_ids)

    def forget_missing(self, present: set[str]) -> list[str]:
        return [name for name in self._records if name not in present]

    def changed(self, name: str) -> bool:
        """Whether the model's files differ from what was last loaded (poll mode, SIGHUP)."""
        record = self._records.get(name)
        return record is None or record.fingerprint != fingerprint(self._root / name)


def fingerprint(model_dir: Path) -> tuple[tuple[str, int, int], ...]:
    entries = []
    for root, _dirs, names in os.walk(model_dir):
        for file_name in names:
            path = os.path.join(root, file_name)
            try:
                info = os.stat(path)
            except OSError:
                continue
            entries.append((os.path.relpath(path, model_dir), info.st_mtime_ns, info.st_size))
    return tuple(sorted(entries))


def _write_override_files(model_dir: Path, files: dict[str, bytes]) -> Path:
    for relative, content in files.items():
        target = (model_dir / relative).resolve()
        if model_dir.resolve() not in target.parents:
            raise ServeError.from_tuple(["INVALID_ARGUMENT",
                                         f"file override path '{relative}' leaves the model "
                                         f"directory"])
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)
    return model_dir


def _remove_dir(path: str | None) -> None:
    if path and os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)


async def _agents_call(agents: Any, action: str) -> None:
    if agents is not None:
        await asyncio.to_thread(getattr(agents, action))


def config_json_dumps(config: mc.ModelConfig) -> str:
    return json.dumps(config_to_dict(config))
