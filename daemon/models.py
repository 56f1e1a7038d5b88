"""The model manager: which models and versions exist, their state, load, reload and unload.

Load order (Triton's): read config.pbtxt (or the "config" override) -> repository agents
LOAD, in config order -> re-read config.pbtxt from the location the agents left -> start
every version's instance workers (each runs its initialize hooks) -> READY -> agents
LOAD_COMPLETE, in reverse order (or LOAD_FAIL when any version failed).

Unload: the versions go UNLOADING (new requests are refused) -> agents UNLOAD -> in-flight
and queued requests drain -> workers finalize and exit -> agents UNLOAD_COMPLETE -> every
temporary location is removed.

A reload builds the new generation next to the old one; the old keeps serving until every
new version is READY, then requests switch over and the old generation is retired (drained,
stopped) in the background. A failed reload leaves the old generation serving untouched.

Errors follow Triton's core (``src/model_repository_manager/model_repository_manager.cc``,
``model_lifecycle.cc``): a problem found before any worker starts (no model directory, a
bad config.pbtxt or "config" override, a "file:" override, a repository agent's LOAD
failure) is a *poll* failure: INTERNAL "failed to load '<name>', failed to poll from model
repository", to which we append ": <detail>"; a version whose workers fail to initialize
gives INVALID_ARGUMENT "load failed for model '<name>': version <v> is at UNAVAILABLE
state: <Code>: <reason>;".
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf import json_format

from shmserve.daemon.auto_complete import (
    AutoCompleteError,
    dali_auto_complete,
    dali_needs_completion,
    infer_backend,
    is_onnx,
    may_define_hook,
    onnx_auto_complete,
    onnx_model_file,
    onnx_needs_auto_complete,
    python_auto_complete,
    python_model_file,
)
from shmserve.daemon.backend_config import default_max_batch_size
from shmserve.daemon.ensemble_config import (
    EnsembleConfigError,
    composing_models,
    is_ensemble,
    validate_steps,
)
from shmserve.daemon.errors import (
    SERVER_EXITING,
    ServeError,
    internal,
    invalid_argument,
    not_found,
    unavailable,
    unknown_model,
)
from shmserve.daemon.host_policy import policy_cpus
from shmserve.daemon.latency_metrics import instrument, options_from
from shmserve.daemon.model_config import (
    InstancePlan,
    config_path,
    config_to_dict,
    plan_instances,
    user_facing,
)
from shmserve.daemon.model_source import (
    Fingerprint,
    PollError,
    agent_config_reader,
    complete_for,
    fingerprint,
    read_repository_config,
    remove_dir,
    select_model_versions,
    validate_name,
    write_override_files,
)
from shmserve.daemon.rate_limiter import RateLimiter
from shmserve.daemon.request import InferRequest
from shmserve.daemon.scheduler import Scheduler
from shmserve.daemon.sequence_config import sequence_plan
from shmserve.daemon.server_log import log_switches
from shmserve.daemon.settings import Settings
from shmserve.daemon.time_budget import TimeBudget
from shmserve.daemon.worker_limits import LimitError, WorkerLimits, limits_for
from shmserve.daemon.worker_process import WorkerProcess, fork_context
from shmserve.protos import shmserve_model_config_pb2 as mc
from shmserve.workers.backend import InstanceSpec, ModelSpec
from shmserve.workers.protocol import WorkerSpec

if TYPE_CHECKING:
    from shmserve.daemon.ensemble import EnsembleScheduler, StepDoor
    from shmserve.repoagents.runner import AgentChain

log = logging.getLogger("shmserve.models")

#: The ensembles whose composing models are being loaded by this task (cycle detection).
_ENSEMBLE_CHAIN: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar(
    "ensemble_chain", default=())

READY = "READY"
LOADING = "LOADING"
UNLOADING = "UNLOADING"
UNAVAILABLE = "UNAVAILABLE"

UNLOADED_REASON = "unloaded"
WILDCARD = "*"

#: Triton's ``Status::CodeString`` (common ``error.cc``), used in version state reasons.
_CODE_STRINGS: dict[grpc.StatusCode, str] = {
    grpc.StatusCode.UNKNOWN: "Unknown",
    grpc.StatusCode.INTERNAL: "Internal",
    grpc.StatusCode.NOT_FOUND: "Not found",
    grpc.StatusCode.INVALID_ARGUMENT: "Invalid argument",
    grpc.StatusCode.UNAVAILABLE: "Unavailable",
    grpc.StatusCode.UNIMPLEMENTED: "Unsupported",
    grpc.StatusCode.ALREADY_EXISTS: "Already exists",
}

@dataclass
class ModelVersion:
    name: str
    version: int
    config: mc.ModelConfig
    scheduler: Scheduler | EnsembleScheduler
    state: str = LOADING
    note: str = ""  # the reason of the last state change (see ``reason``)
    # The validation plan (infer_request.py), built on the first request.
    validation_plan: Any = field(default=None, repr=False, compare=False)

    @property
    def ready(self) -> bool:
        return self.state == READY and self.scheduler.ready and self.model_says_ready

    @property
    def model_says_ready(self) -> bool:
        """False while a live instance's own ``is_ready()`` last answered false (Triton's
        python backend readiness hook; instances without one do not count)."""
        for slot in self.scheduler.instances:
            report = slot.worker.report if slot.worker is not None else None
            if report is not None and report.ready == 0:
                return False
        return True

    @property
    def reason(self) -> str:
        """RepositoryIndex's reason: a crash loop while it lasts, else the last note."""
        if self.state == READY:
            crash_loop = self.scheduler.crash_loop_reason()
            if crash_loop:
                return f"{crash_loop}; {self.note}" if self.note else crash_loop
        return self.note

    @reason.setter
    def reason(self, text: str) -> None:
        self.note = text


@dataclass
class _Generation:
    """What one successful load produced and what its retirement must release."""

    versions: dict[int, ModelVersion]
    agents: AgentChain | None
    temp_dir: str | None


@dataclass
class ModelRecord:
    name: str
    versions: dict[int, ModelVersion] = field(default_factory=dict)
    state: str = UNAVAILABLE          # for the index when no version is loaded
    reason: str = ""
    agents: AgentChain | None = None  # the AgentChain of the serving generation
    temp_dir: str | None = None       # where "file:" overrides were written
    fingerprint: Fingerprint = ()     # of the repository directory last loaded from
    from_repository: bool = True      # False when the serving generation came from "file:"
    in_lifecycle: bool = False        # a load reached the workers once (Triton's lifecycle map)
    failed_at_startup: bool = False   # keeps a strict server unready until loaded or unloaded
    # Loaded by name (the API, start-up, polling), not only as an ensemble's composing model:
    # unload_dependents leaves it loaded (Triton's explicitly_load_).
    explicit: bool = False
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def config(self) -> mc.ModelConfig | None:
        if not self.versions:
            return None
        return self.versions[max(self.versions)].config


@dataclass
class _Prepared:
    config: mc.ModelConfig
    model_dir: Path
    versions: list[int]
    agents: AgentChain | None
    temp_dir: str | None
    limits: WorkerLimits


class ModelManager:
    def __init__(self, settings: Settings, supervisor_pid: int, gpu_ids: list[int],
                 on_request_finished: Callable[[InferRequest], None]) -> None:
        self._settings = settings
        self._on_request_finished = on_request_finished
        self._supervisor_pid = supervisor_pid
        self._gpu_ids = gpu_ids
        self._root = Path(settings.model_repository)
        self._records: dict[str, ModelRecord] = {}
        # Until start-up loading is over the server is not ready (a door may be serving
        # before the first load even began: frontend processes).
        self._starting = True
        self._retiring: dict[asyncio.Task[None], _Generation] = {}
        # One rate limiter for every model's instances (--rate-limit=execution_count).
        self._limiter = (RateLimiter(settings.rate_limit_resources)
                         if settings.rate_limit == "execution_count" else None)
        self.step_door: StepDoor | None = None  # the core's submit, for ensembles
        self._closing = False

    # --- discovery ----------------------------------------------------------------------
    def repository_models(self) -> list[str]:
        try:
            return sorted(entry.name for entry in self._root.iterdir()
                          if entry.is_dir() and not entry.name.startswith("."))
        except OSError:
            return []

    def startup_models(self) -> list[str]:
        """What to load at start: everything, or in explicit mode the --load-model names."""
        settings = self._settings
        if settings.model_control_mode != "explicit":
            if settings.load_models:
                log.warning("--load-model is only used with --model-control-mode=explicit; "
                            "ignoring %s", settings.load_models)
            return self.repository_models()
        wanted = list(dict.fromkeys(settings.load_models))
        if WILDCARD in wanted:
            if len(wanted) > 1:
                # Triton's text (model_repository_manager.cc, ModelRepositoryManager::Create);
                # like tritonserver, refuse to start.
                log.error("Wildcard model name '*' must be the ONLY startup model if "
                          "specified at all.")
                raise SystemExit(1)
            return self.repository_models()
        return wanted

    async def load_startup_models(self) -> list[str]:
        """Load what start-up loads; returns the names that failed (each already logged
        with its reason by ``load``)."""
        names = self.startup_models()
        try:
            results = await asyncio.gather(*(self.load(name) for name in names),
                                           return_exceptions=True)
        finally:
            self._starting = False
        failed = []
        for name, result in zip(names, results, strict=True):
            if isinstance(result, BaseException):
                if not isinstance(result, ServeError):
                    log.error("model '%s' failed to load", name, exc_info=result)
                failed.append(name)
                record = self._records.get(name)
                if record is not None and not record.versions:
                    record.failed_at_startup = True
        return failed

    # --- load ---------------------------------------------------------------------------
    async def load(self, name: str, config_json: str | None = None,
                   files: Mapping[str, bytes] | None = None, explicit: bool = True) -> None:
        """Load or reload ``name`` (RepositoryModelLoad, poll mode, startup).

        A model that is serving and whose repository directory is unchanged since it was
        loaded is left alone unless a "config" or "file:" override is given (Triton:
        an unmodified model is not reloaded).
        """
        validate_name(name)
        if self._closing:
            raise unavailable(SERVER_EXITING)
        record = self._records.setdefault(name, ModelRecord(name))
        async with record.lock:
            if self._closing:
                raise unavailable(SERVER_EXITING)
            await self._load_locked(record, config_json, dict(files) if files else None)
            record.explicit = record.explicit or explicit

    async def _load_locked(self, record: ModelRecord, config_json: str | None,
                           files: dict[str, bytes] | None) -> None:
        name = record.name
        repo_dir = self._root / name
        previous_fingerprint = record.fingerprint
        new_fingerprint: Fingerprint = ()
        if files is None and repo_dir.is_dir():
            new_fingerprint = fingerprint(repo_dir)
            if (record.versions and config_json is None and record.from_repository
                    and new_fingerprint == previous_fingerprint and previous_fingerprint):
                log.info("model '%s' is unchanged; nothing to reload", name)
                return
        # An override is never "unchanged": the next plain load reloads from the repository.
        record.fingerprint = new_fingerprint if config_json is None else ()
        if not record.versions:
            record.state, record.reason = LOADING, ""
        try:
            prepared = await self._prepare(name, repo_dir, config_json, files)
        except PollError as exc:
            record.fingerprint = previous_fingerprint
            if not record.versions:
                record.state, record.reason = UNAVAILABLE, exc.detail
            else:
                _note_reload_failure(record, exc.detail)
            log.error("Poll failed for model directory '%s': %s%s", name, exc.detail,
                      _still_serving(record))
            raise internal(f"failed to load '{name}', failed to poll from model repository: "
                           f"{exc.detail}") from None
        except ServeError as exc:
            record.fingerprint = previous_fingerprint
            if not record.versions:
                record.state, record.reason = UNAVAILABLE, exc.message
            else:
                _note_reload_failure(record, exc.message)
            log.error("%s%s", exc.message.rstrip(), _still_serving(record))
            raise
        except BaseException:
            record.fingerprint = previous_fingerprint
            if not record.versions:
                record.state, record.reason = UNAVAILABLE, "load interrupted"
            raise
        try:
            generation = await self._start(record, prepared)
        except BaseException:
            record.fingerprint = previous_fingerprint
            if not record.versions and record.state == LOADING:
                record.state, record.reason = UNAVAILABLE, "load interrupted"
            raise
        old = _Generation(record.versions, record.agents, record.temp_dir)
        record.versions, record.agents, record.temp_dir = (generation.versions,
                                                           generation.agents,
                                                           generation.temp_dir)
        record.from_repository = files is None
        record.state, record.reason = READY, ""
        record.failed_at_startup = False
        for model_version in generation.versions.values():
            model_version.state = READY
        log.info("successfully loaded '%s' version(s) %s", name, sorted(generation.versions))
        if generation.agents is not None:
            await _agents_call(generation.agents, "load_complete")
        if old.versions or old.agents is not None or old.temp_dir:
            self._retire_in_background(old)

    async def _prepare(self, name: str, repo_dir: Path, config_json: str | None,
                       files: dict[str, bytes] | None) -> _Prepared:
        """Config, overrides and repository agents: everything before a worker starts.

        Raises PollError; on any failure nothing is left behind (agents got LOAD_FAIL,
        temporary locations are removed).
        """
        temp_dir: str | None = None
        chain: AgentChain | None = None
        try:
            config = self._parse_override(config_json) if config_json is not None else None
            if files is not None:
                if config is None:
                    # Triton's LocalizeRepoAgent text (model_repository_manager.cc).
                    raise PollError("Load parameter 'config' must be specified for model "
                                    "file override")
                temp_dir = tempfile.mkdtemp(prefix=f"shmserve-override-{name}-")
                model_dir = Path(temp_dir) / name
                write_override_files(model_dir, files, config)
            else:
                model_dir = repo_dir
                if not model_dir.is_dir():
                    raise PollError("model not found in any model repository.")
            if config is None:
                config = read_repository_config(model_dir, self._settings.model_config_name)
            # As Triton (InitializeModelInfo): agents see the config as written; it is
            # completed and validated only after them, from the location they left (an
            # encrypted model may ship a stub config.pbtxt and a config.pbtxt.enc).
            named_dir = model_dir
            versions = select_model_versions(model_dir, config)
            if config.model_repository_agents.agents:
                chain, model_dir, config = await self._run_agents(name, model_dir, config,
                                                                  versions, config_json)
                versions = select_model_versions(model_dir, config)
            config = await self._auto_complete(name, config, model_dir, named_dir, versions,
                                               config_json)
            complete_for(config, model_dir, named_dir, self._gpu_ids,
                         overridden=config_json is not None,
                         config_name=self._settings.model_config_name)
            if not versions:
                raise _NoVersion()
            if is_ensemble(config):
                await self._load_composing(name, config)
            try:
                limits = limits_for(self._settings, {key: value.string_value for key, value
                                                     in config.parameters.items()})
            except LimitError as exc:
                raise PollError(str(exc)) from None
        except _NoVersion:
            await _fail_agents(chain)
            remove_dir(temp_dir)
            raise internal(f"failed to load '{name}', no version is available") from None
        except BaseException:
            await _fail_agents(chain)
            remove_dir(temp_dir)
            raise
        return _Prepared(config, model_dir, versions, chain, temp_dir, limits)

    async def _auto_complete(self, name: str, config: mc.ModelConfig, model_dir: Path,
                             named_dir: Path, versions: list[int], config_json: str | None
                             ) -> mc.ModelConfig:
        """Triton's auto-completion: the backend from the default model file, then a python
        model's ``auto_complete_config`` hook, a dali model's pipeline or an ONNX model's
        signature (all read outside the supervisor, auto_complete.py)."""
        config_name = self._settings.model_config_name
        if config_json is not None:
            where = "load parameter 'config'"
        else:
            where = str(config_path(model_dir, config_name))
        try:
            infer_backend(config, model_dir, where)
        except AutoCompleteError as exc:
            raise PollError(exc.message) from None
        if not versions or self._settings.disable_auto_complete_config:
            return config
        version = max(versions)
        if not config.name:  # not the folder's: an agent's location has a name of its own
            config.name = name
        try:
            if config.backend == "dali":
                if not dali_needs_completion(config, model_dir, config_json, config_name):
                    return config
                return await dali_auto_complete(config, model_dir, version, config_json,
                                                fork_context(), config_name)
            if is_onnx(config):
                if not onnx_needs_auto_complete(config):
                    return config
                return await onnx_auto_complete(
                    config, onnx_model_file(config, model_dir, version), fork_context(),
                    default_max_batch_size(self._settings.backend_config))
            if config.backend != "python":
                return config
            model_file = python_model_file(config, model_dir, version)
            if not may_define_hook(model_file):
                return config
            return await python_auto_complete(config, model_file, fork_context())
        except AutoCompleteError as exc:
            code = grpc.StatusCode[exc.code] if exc.code in grpc.StatusCode.__members__ \
                else grpc.StatusCode.INTERNAL
            raise invalid_argument(
                f"load failed for model '{name}': version {version} is at {UNAVAILABLE} "
                f"state: {_code_string(code)}: {exc.message};\n") from None

    async def _load_composing(self, name: str, config: mc.ModelConfig) -> None:
        """An ensemble's composing models: loaded first when they have no version serving
        (explicit mode loads them with the ensemble, as Triton), then each step is checked
        against its model's config (ensemble_config.py)."""
        chain = _ENSEMBLE_CHAIN.get()
        if name in chain:
            cycle = " -> ".join((*chain[chain.index(name):], name))
            raise invalid_argument(f"circular dependency between ensembles: {cycle}")
        token = _ENSEMBLE_CHAIN.set((*chain, name))
        try:
            configs: dict[str, mc.ModelConfig] = {}
            for model, version in composing_models(config):
                record = self._records.get(model)
                if record is None or not record.versions:
                    try:
                        await self.load(model, explicit=False)
                    except ServeError as exc:
                        raise invalid_argument(
                            f"ensemble '{name}' depends on '{model}' which has no loaded "
                            f"version. Model '{model}' loading failed with error: "
                            f"{exc.message.strip()}") from None
                try:
                    step_version = self.resolve(model, str(version) if version > 0 else "")
                except ServeError as exc:
                    raise invalid_argument(f"ensemble '{name}' depends on '{model}' which "
                                           f"has no loaded version: {exc.message}") from None
                if step_version.config.model_transaction_policy.decoupled:
                    # Decoupled itself, as in Triton: it streams that step's responses.
                    config.model_transaction_policy.decoupled = True
                configs[model] = step_version.config
            try:
                validate_steps(config, configs)
            except EnsembleConfigError as exc:
                raise invalid_argument(str(exc)) from None
        finally:
            _ENSEMBLE_CHAIN.reset(token)

    def _decoupled_steps(self, config: mc.ModelConfig) -> frozenset[str]:
        """The ensemble's composing models that are decoupled (loaded by now)."""
        found = set()
        for model, version in composing_models(config):
            try:
                step = self.resolve(model, str(version) if version > 0 else "")
            except ServeError:
                continue
            if step.config.model_transaction_policy.decoupled:
                found.add(model)
        return frozenset(found)

    def _composing_ready(self, config: mc.ModelConfig) -> Callable[[], bool]:
        steps = [(model, str(version) if version > 0 else "")
                 for model, version in composing_models(config)]
        return lambda: all(self.is_ready(model, version) for model, version in steps)

    def _parse_override(self, config_json: str) -> mc.ModelConfig:
        config = mc.ModelConfig()
        try:
            json_format.Parse(config_json, config)
        except json_format.ParseError as exc:
            # Triton: "Invalid config override: <JsonToModelConfig message>".
            raise PollError(f"Invalid config override: {user_facing(str(exc))}") from None
        return config

    async def _run_agents(self, name: str, model_dir: Path, config: mc.ModelConfig,
                          versions: list[int], config_json: str | None
                          ) -> tuple[AgentChain, Path, mc.ModelConfig]:
        """Repository agents LOAD (config order); the config is re-read where they left it.

        The agent list comes from this (original, or "config" override) config and stays
        with the chain for the whole lifecycle.
        """
        from shmserve.repoagents import AgentChain, AgentError
        specs = [(agent.name, dict(agent.parameters))
                 for agent in config.model_repository_agents.agents]
        try:
            chain = await asyncio.to_thread(AgentChain.create, name, specs,
                                            self._settings.repoagent_directory)
        except AgentError as exc:
            raise PollError(exc.message) from None
        try:
            location = await asyncio.to_thread(chain.load, str(model_dir), versions,
                                               config_to_dict(config),
                                               config_reader=functools.partial(
                                                   agent_config_reader,
                                                   config_name=self._settings.model_config_name))
        except AgentError as exc:
            # The chain already sent LOAD_FAIL and removed its temporary locations.
            raise PollError(exc.message) from None
        except BaseException:
            await _fail_agents(chain)
            raise
        new_dir = Path(location)
        if new_dir == model_dir or config_json is not None:
            # A "config" override wins over whatever config.pbtxt the agents wrote.
            return chain, new_dir, config
        try:
            new_config = read_repository_config(new_dir, self._settings.model_config_name)
        except BaseException:
            await _fail_agents(chain)
            raise
        return chain, new_dir, new_config

    async def _start(self, record: ModelRecord, prepared: _Prepared) -> _Generation:
        """Start every selected version; on any failure stop them all and, once the
        --model-load-retry-count further tries failed too, send LOAD_FAIL."""
        name = record.name
        record.in_lifecycle = True
        retries = self._settings.model_load_retry_count
        for attempt in range(retries + 1):
            started = {version: self._new_version(name, version, prepared.config,
                                                  prepared.model_dir, prepared.limits)
                       for version in prepared.versions}
            try:
                results = await asyncio.gather(
                    *(v.scheduler.start() for v in started.values()), return_exceptions=True)
            except BaseException:
                await self._abandon(started, prepared)
                raise
            failures: list[tuple[int, str]] = []
            for (version, _model_version), result in zip(started.items(), results,
                                                         strict=True):
                if isinstance(result, ServeError):
                    failures.append((version,
                                     f"{_code_string(result.code)}: {result.message}"))
                elif isinstance(result, BaseException):
                    failures.append((version, f"Internal: {type(result).__name__}: {result}"))
            if not failures:
                return _Generation(started, prepared.agents, prepared.temp_dir)
            if attempt < retries:
                log.warning("loading '%s' failed (%s); retrying (%d of %d)", name,
                            failures[0][1], attempt + 1, retries)
                await self._stop_versions(started)
        for version, reason in failures:
            started[version].state, started[version].reason = UNAVAILABLE, reason
            log.error("failed to load '%s' version %d: %s%s", name, version, reason,
                      _still_serving(record))
        await self._abandon(started, prepared)
        if not record.versions:
            record.state, record.reason = UNAVAILABLE, failures[0][1]
        else:
            _note_reload_failure(record, failures[0][1])
        detail = "".join(f"version {version} is at {UNAVAILABLE} state: {reason};"
                         for version, reason in failures)
        # Triton (LoadUnloadModels): INVALID_ARG "load failed for model '<m>': <reasons>\n".
        raise invalid_argument(f"load failed for model '{name}': {detail}\n")

    async def _stop_versions(self, started: dict[int, ModelVersion]) -> None:
        timeout = self._settings.exit_timeout_secs
        await asyncio.gather(*(v.scheduler.stop(timeout) for v in started.values()),
                             return_exceptions=True)

    async def _abandon(self, started: dict[int, ModelVersion], prepared: _Prepared) -> None:
        await self._stop_versions(started)
        await _fail_agents(prepared.agents)
        remove_dir(prepared.temp_dir)

    def _new_version(self, name: str, version: int, config: mc.ModelConfig,
                     model_dir: Path, limits: WorkerLimits) -> ModelVersion:
        if is_ensemble(config):
            from shmserve.daemon.ensemble import EnsembleScheduler
            assert self.step_door is not None, "the core sets step_door"
            ensemble = EnsembleScheduler(
                name, version, config, self.step_door, self._composing_ready(config),
                self._on_request_finished, self._decoupled_steps(config))
            instrument(ensemble.stats, options_from(self._settings.metrics_config))
            return ModelVersion(name, version, config, ensemble)
        config_dict = config_to_dict(config)
        backend = config.backend
        settings = self._settings

        instance_count = len(plan_instances(config))

        def make_spec(plan: InstancePlan, owner: str, lanes: int) -> WorkerSpec:
            return WorkerSpec(
                model=ModelSpec(name, version, config_dict, str(model_dir),
                                str(model_dir / str(version))),
                instance=InstanceSpec(plan.name, plan.kind, plan.device_id, plan.index),
                backend=backend, supervisor_pid=self._supervisor_pid, arena_owner=owner,
                lanes=lanes, heartbeat_secs=limits.heartbeat_secs,
                busy_poll_us=settings.worker_busy_poll_us,
                log_level=logging.DEBUG if settings.log_verbose else logging.WARNING,
                log_switches=log_switches(settings).pack(),
                cuda_visible_devices=str(plan.device_id) if plan.kind == "KIND_GPU" else None,
                cpus=policy_cpus(settings.host_policies, plan.host_policy),
                instance_count=instance_count)

        batching = config.dynamic_batching if config.HasField("dynamic_batching") else None
        sequence = sequence_plan(config) if config.HasField("sequence_batching") else None
        scheduler = Scheduler(name, version, config.max_batch_size, batching,
                              plan_instances(config), make_spec, settings, self._supervisor_pid,
                              self._on_request_finished, WorkerProcess, limits,
                              decoupled=config.model_transaction_policy.decoupled,
                              sequence=sequence, limiter=self._limiter)
        return ModelVersion(name, version, config, scheduler)

    # --- unload -------------------------------------------------------------------------
    async def unload(self, name: str, budget: TimeBudget | None = None,
                     dependents: bool = False) -> None:
        """Unload every version of ``name``; returns once drained and stopped, within
        ``budget`` (default: --exit-timeout-secs from now, for draining and stopping).
        ``dependents`` (unload_dependents): then also the composing models it loaded.

        Unloading a model that is not loaded (or not known) succeeds and does nothing, as
        in Triton.
        """
        record = self._records.get(name)
        if record is None:
            return
        config = record.config()
        async with record.lock:
            await self._unload_locked(record, budget)
        if dependents and config is not None:
            await self._unload_unused_composing(config, budget)

    async def _unload_unused_composing(self, config: mc.ModelConfig,
                                       budget: TimeBudget | None) -> None:
        """unload_dependents (as Triton): an unloaded ensemble's composing models that were
        loaded only for ensembles and that no loaded ensemble uses any more, in turn."""
        for model, _ in composing_models(config):
            record = self._records.get(model)
            if record is None or not record.versions or record.explicit \
                    or self._used_by_an_ensemble(model):
                continue
            await self.unload(model, budget, dependents=True)

    def _used_by_an_ensemble(self, model: str) -> bool:
        for record in self._records.values():
            config = record.config()
            if config is not None and any(name == model
                                          for name, _ in composing_models(config)):
                return True
        return False

    async def _unload_locked(self, record: ModelRecord, budget: TimeBudget | None) -> None:
        if not record.versions and record.agents is None and not record.temp_dir:
            return
        generation = _Generation(record.versions, record.agents, record.temp_dir)
        record.agents, record.temp_dir = None, None
        record.state, record.reason = UNLOADING, ""
        for model_version in generation.versions.values():
            model_version.state = UNLOADING
        try:
            await self._retire(generation, budget)
        finally:
            record.versions = {}
            record.state, record.reason = UNAVAILABLE, UNLOADED_REASON
            record.fingerprint = ()
            record.failed_at_startup = False
            record.explicit = False
            log.info("successfully unloaded '%s'", record.name)

    def _retire_in_background(self, generation: _Generation) -> None:
        task = asyncio.get_running_loop().create_task(self._retire(generation))
        self._retiring[task] = generation
        task.add_done_callback(self._retired)

    def _retired(self, task: asyncio.Task[None]) -> None:
        self._retiring.pop(task, None)
        if not task.cancelled() and task.exception() is not None:
            log.error("retiring an old model generation failed", exc_info=task.exception())

    async def _retire(self, generation: _Generation, budget: TimeBudget | None = None) -> None:
        """UNLOAD -> drain in-flight requests -> stop the workers -> UNLOAD_COMPLETE, all
        within one ``budget`` (default: --exit-timeout-secs from now)."""
        versions, agents = generation.versions, generation.agents
        for model_version in versions.values():
            model_version.state = UNLOADING
        if budget is None:
            budget = TimeBudget(self._settings.exit_timeout_secs)
        try:
            if agents is not None:
                await _agents_call(agents, "unload")
            drain = budget.for_draining()
            await asyncio.gather(*(v.scheduler.drain(drain) for v in versions.values()))
            stop = budget.for_stopping()
            await asyncio.gather(*(v.scheduler.stop(stop) for v in versions.values()),
                                 return_exceptions=True)
            for model_version in versions.values():
                model_version.state, model_version.reason = UNAVAILABLE, UNLOADED_REASON
            if agents is not None:
                await _agents_call(agents, "unload_complete")
        finally:
            if agents is not None:
                await asyncio.shield(_agents_call(agents, "close"))
            remove_dir(generation.temp_dir)

    async def shutdown(self, budget: TimeBudget | None = None) -> None:
        """Unload everything (agents UNLOAD/UNLOAD_COMPLETE, then close every chain), within
        ``budget`` (the server's exit budget; default --exit-timeout-secs from now)."""
        self._closing = True
        if budget is None:
            budget = TimeBudget(self._settings.exit_timeout_secs)
        await asyncio.gather(*(self.unload(name, budget) for name in list(self._records)),
                             return_exceptions=True)
        while self._retiring and budget.left() > 0:
            await asyncio.wait(list(self._retiring), timeout=budget.left())
        for record in self._records.values():
            if record.agents is not None:
                await _agents_call(record.agents, "close")

    # --- repository changes (poll mode, SIGHUP) -----------------------------------------
    def changed(self, name: str) -> bool:
        """Whether the model's directory differs from what was last loaded from it."""
        record = self._records.get(name)
        if record is None:
            return True
        if not record.from_repository and record.versions:
            return True
        return not record.fingerprint or record.fingerprint != fingerprint(self._root / name)

    def removed_models(self) -> list[str]:
        """Models known here whose repository directory is gone (loaded or not)."""
        present = set(self.repository_models())
        return sorted(name for name, record in self._records.items()
                      if name not in present and record.from_repository)

    def forget(self, name: str) -> None:
        """Drop an unloaded model's record (its directory left the repository)."""
        record = self._records.get(name)
        if record is not None and not record.versions and not record.lock.locked() \
                and not (self._root / name).is_dir():
            del self._records[name]

    # --- lookups ------------------------------------------------------------------------
    def record(self, name: str) -> ModelRecord:
        record = self._records.get(name)
        if record is None:
            raise unknown_model(name)
        return record

    def resolve(self, name: str, version: str) -> ModelVersion:
        """The version a request addresses ("" = the highest ready one).

        Triton's texts (model_lifecycle.cc GetModel, prefixed by ModelRepositoryManager):
        a model the lifecycle never saw is "is not found"; one with no READY version "has
        no available versions" (both NOT_FOUND); a named version that is not READY
        UNAVAILABLE "is not at ready state".
        """
        record = self._records.get(name)
        if record is None or not (record.in_lifecycle or record.versions):
            raise unknown_model(name)
        if not version:
            ready = [v for v in record.versions.values() if v.state == READY]
            if not ready:
                raise not_found(f"Request for unknown model: '{name}' has no available "
                                f"versions")
            return max(ready, key=lambda v: v.version)
        found = record.versions.get(int(version)) if version.isdigit() else None
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
        """Strict readiness: every serving version ready, no first load in progress, no
        model that failed at start-up still unloaded (as tritonserver's strict readiness)."""
        if self._starting:
            return False
        for record in self._records.values():
            if not record.versions and record.state == LOADING:
                return False
            if record.failed_at_startup:
                return False
            for model_version in record.versions.values():
                if model_version.state != UNLOADING and not model_version.ready:
                    return False
        return True

    def ready_count(self) -> int:
        """Models with at least one READY version."""
        return sum(any(v.ready for v in record.versions.values())
                   for record in self._records.values())

    def follow_log(self) -> None:
        """Every live worker takes the server's log settings as they are now."""
        switches = log_switches(self._settings).pack()
        for record in self.records():
            for version in record.versions.values():
                for slot in version.scheduler.instances:
                    if slot.worker is not None:
                        slot.worker.follow_log(switches)

    def records(self) -> list[ModelRecord]:
        """Known models, for the index and statistics: serving ones, ones in the middle of
        a load or unload, and failed or unloaded ones still in the repository. (A load of
        a name that is not in the repository leaves nothing behind, as in Triton.)"""
        return [record for name, record in sorted(self._records.items())
                if record.versions or record.state in (LOADING, UNLOADING)
                or (self._root / name).is_dir()]

    def schedulers(self) -> list[Scheduler | EnsembleScheduler]:
        serving = [v.scheduler for r in self._records.values() for v in r.versions.values()]
        retiring = [v.scheduler for g in self._retiring.values() for v in g.versions.values()]
        return serving + retiring

    def release_regions(self, region_ids: list[int]) -> None:
        for scheduler in self.schedulers():
            scheduler.release_regions(region_ids)


# --- helpers ------------------------------------------------------------------------------
class _NoVersion(Exception):
    pass


RELOAD_FAILED = "reload failed; the previous load keeps serving: "


def _note_reload_failure(record: ModelRecord, reason: str) -> None:
    """A failed reload leaves the serving versions READY; their index entries say why the
    new load did not replace them (until the next load or unload succeeds)."""
    for model_version in record.versions.values():
        model_version.reason = RELOAD_FAILED + reason.rstrip()


def _still_serving(record: ModelRecord) -> str:
    if not record.versions:
        return ""
    return f" (version(s) {sorted(record.versions)} of the previous load keep serving)"


def _code_string(code: grpc.StatusCode) -> str:
    return _CODE_STRINGS.get(code, "Unknown")


async def _agents_call(agents: AgentChain, action: str) -> None:
    """Run a blocking chain action off the loop; errors are logged, never raised."""
    try:
        await asyncio.to_thread(getattr(agents, action))
    except Exception:
        log.exception("repository agents of model '%s' failed on %s", agents.model_name,
                      action)


async def _fail_agents(agents: AgentChain | None) -> None:
    """LOAD_FAIL (if LOAD went through) and remove every temporary location."""
    if agents is not None:
        await asyncio.shield(_agents_call(agents, "close"))
