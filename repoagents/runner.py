"""Resolve a model's repository agents and drive them through a load/unload lifecycle.

The supervisor makes one :class:`AgentChain` per model load (from the ORIGINAL
config.pbtxt's ``model_repository_agents``) and calls, from a worker thread::

    chain = AgentChain.create("resnet", [("checksum", {...}), ("decrypt", {...})], agent_dir)
    location = chain.load(model_dir, versions, config)   # LOAD, config order; raises AgentError
    ... re-read config.pbtxt from `location`, start the workers ...
    chain.load_complete()            # or chain.load_fail()   (reverse order)
    ...
    chain.unload()                   # config order
    ... stop the workers ...
    chain.unload_complete()          # reverse order, then every temporary location is removed

What Triton does (core ``src/model_repository_manager/model_repository_manager.cc``
``CreateAgentModelListWithLoadAction``, ``model_lifecycle.h`` ``TritonRepoAgentModelList``,
``src/repo_agent.cc`` ``~TritonRepoAgentModel``) and what we do:

* LOAD goes to the agents in config order; each starts from the location the previous one
  left. The first agent that fails stops the chain: the agents after it are never created
  nor called.
* On that failure, every agent that was invoked with LOAD *including the failing one* gets
  LOAD_FAIL. In Triton this happens through destructors: the failing agent's model object
  dies first (LOAD_FAIL to it first), then the list of the earlier ones, which libstdc++
  destroys front to back. Triton's documentation (repository_agents.md) promises "each
  agent that was invoked with LOAD, in reverse order". We send LOAD_FAIL in reverse order
  over the invoked agents: the failing agent first (as Triton), then the earlier ones
  last-to-first (as documented). Then every temporary location is removed.
* Errors an agent returns from LOAD_COMPLETE, LOAD_FAIL, UNLOAD and UNLOAD_COMPLETE are
  logged, never raised, and the remaining agents still get the action.
* A repeated UNLOAD is ignored (Triton's ``duplicate_unload``); so are a repeated
  UNLOAD_COMPLETE and a LOAD_FAIL after a load that already failed.
* Unlike Triton, which creates agent N just before its LOAD, :meth:`AgentChain.create`
  resolves every agent up front, so a misspelt agent fails the load before any agent runs.

Agents are found, in this order:

1. ``<agent_directory>/<name>/agent.py`` defining a class named ``Agent`` (a
   :class:`~shmserve.repoagents.base.RepoAgent` subclass, constructed with no arguments).
   A directory without ``agent.py`` (e.g. a Triton ``libtritonrepoagent_<name>.so``) is
   skipped. The module is imported once per file version (path, mtime, size) and may
   import siblings relatively (``from . import helpers``).
2. The entry point ``<name>`` in the group ``shmserve.repoagents`` (a RepoAgent subclass).
3. The built-in table :data:`BUILTIN_AGENTS` (``checksum``, ``decrypt``).

Nothing found → :class:`AgentNotFound`; found but unimportable → :class:`AgentImportError`.
"""

from __future__ import annotations

import copy
import enum
import hashlib
import importlib
import importlib.metadata
import importlib.util
import logging
import os
import re
import shutil
import stat
import sys
import tempfile
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from .base import (
    Action,
    AgentContext,
    AgentError,
    AgentImportError,
    AgentNotFound,
    AgentStateError,
)

__all__ = [
    "AGENT_CLASS",
    "AGENT_FILE",
    "BUILTIN_AGENTS",
    "ENTRY_POINT_GROUP",
    "AgentChain",
    "ChainState",
    "agents_from_config",
    "resolve_agent",
]

logger = logging.getLogger("shmserve.repoagents")

ENTRY_POINT_GROUP = "shmserve.repoagents"
AGENT_FILE = "agent.py"
AGENT_CLASS = "Agent"

#: Agents shipped with shmserve, as "module:attribute" import strings. They are declared
#: as entry points too; this table makes them resolvable without installed metadata.
BUILTIN_AGENTS: dict[str, str] = {
    "checksum": "shmserve.repoagents.checksum:ChecksumAgent",
    "decrypt": "shmserve.repoagents.decrypt:DecryptAgent",
}

_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")

AgentFactory = Callable[[], Any]
ConfigReader = Callable[[str], Mapping[str, Any]]


# ------------------------------------------------------------------------------------------
# Resolution


_module_lock = threading.Lock()
_module_cache: dict[tuple[str, int, int], ModuleType] = {}


def _import_agent_file(name: str, path: str) -> ModuleType:
    """Import ``<dir>/<name>/agent.py`` once per file version, as a package of its directory."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise AgentImportError(
            f"repository agent '{name}' failed to import from '{path}': {exc}", agent=name
        ) from exc
    key = (os.path.realpath(path), st.st_mtime_ns, st.st_size)
    with _module_lock:
        cached = _module_cache.get(key)
        if cached is not None:
            return cached
        digest = hashlib.sha256(repr(key).encode()).hexdigest()[:12]
        safe = re.sub(r"\W", "_", name)
        module_name = f"_shmserve_repoagent_{safe}_{digest}"
        spec = importlib.util.spec_from_file_location(
            module_name, path, submodule_search_locations=[os.path.dirname(path)]
        )
        if spec is None or spec.loader is None:
            raise AgentImportError(
                f"repository agent '{name}' failed to import from '{path}': "
                "not an importable Python file",
                agent=name,
            )
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        try:
            spec.loader.exec_module(module)
        except (Exception, SystemExit) as exc:
            for mod in [
                m for m in sys.modules if m == module_name or m.startswith(module_name + ".")
            ]:
                del sys.modules[mod]
            raise AgentImportError(
                f"repository agent '{name}' failed to import from '{path}': "
                f"{type(exc).__name__}: {exc}",
                agent=name,
            ) from exc
        _module_cache[key] = module
        return module


def _load_import_string(name: str, target: str, origin: str) -> Any:
    module_name, _, attr = target.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split(".") if attr else []:
            obj = getattr(obj, part)
    except (Exception, SystemExit) as exc:
        raise AgentImportError(
            f"repository agent '{name}' ({origin} '{target}') failed to import: "
            f"{type(exc).__name__}: {exc}",
            agent=name,
        ) from exc
    return obj


def _entry_point(name: str) -> importlib.metadata.EntryPoint | None:
    found = list(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP, name=name))
    if not found:
        return None
    if len(found) > 1:
        logger.warning(
            "several entry points named '%s' in group '%s': %s; using the first",
            name,
            ENTRY_POINT_GROUP,
            ", ".join(ep.value for ep in found),
        )
    return found[0]


def resolve_agent(name: str, agent_directory: str | None) -> tuple[AgentFactory, str]:
    """Find the agent called ``name``; return a factory making instances and where it was found.

    Raises :class:`AgentNotFound` or :class:`AgentImportError`.
    """
    if not _NAME_RE.match(name):
        raise AgentNotFound(f"invalid repository agent name '{name}'", agent=name)

    searched: list[str] = []
    if agent_directory:
        agent_file = os.path.join(agent_directory, name, AGENT_FILE)
        searched.append(agent_file)
        if os.path.isfile(agent_file):
            module = _import_agent_file(name, agent_file)
            cls = getattr(module, AGENT_CLASS, None)
            if cls is None or not callable(cls):
                raise AgentImportError(
                    f"repository agent '{name}' in '{agent_file}' does not define a class "
                    f"named '{AGENT_CLASS}'",
                    agent=name,
                )
            return cls, agent_file

    ep = _entry_point(name)
    searched.append(f"entry point '{name}' in group '{ENTRY_POINT_GROUP}'")
    if ep is not None:
        try:
            obj = ep.load()
        except (Exception, SystemExit) as exc:
            raise AgentImportError(
                f"repository agent '{name}' (entry point '{ep.value}') failed to import: "
                f"{type(exc).__name__}: {exc}",
                agent=name,
            ) from exc
        return obj, f"entry point {ep.value}"

    builtin = BUILTIN_AGENTS.get(name)
    searched.append("built-in agents (" + ", ".join(sorted(BUILTIN_AGENTS)) + ")")
    if builtin is not None:
        return _load_import_string(name, builtin, "built-in"), f"built-in {builtin}"

    raise AgentNotFound(
        f"unable to find repository agent '{name}', searched: " + "; ".join(searched),
        agent=name,
    )


def _instantiate(name: str, factory: AgentFactory, origin: str) -> Any:
    try:
        agent = factory()
    except AgentError as exc:
        exc.agent = exc.agent or name
        raise
    except Exception as exc:
        raise AgentError(
            f"repository agent '{name}' ({origin}) failed to initialize: "
            f"{type(exc).__name__}: {exc}",
            agent=name,
        ) from exc
    if not callable(getattr(agent, "handle", None)):
        raise AgentImportError(
            f"repository agent '{name}' ({origin}) is not a repository agent: "
            f"{type(agent).__name__} has no handle(action, model) method",
            agent=name,
        )
    return agent


def agents_from_config(config: Mapping[str, Any]) -> list[tuple[str, dict[str, str]]]:
    """The ``model_repository_agents`` list of a config in Triton JSON form.

    ``parameters`` may be a mapping (proto JSON form of a ``map<string,string>``) or a list
    of ``{"key": k, "value": v}`` entries.
    """
    section = config.get("model_repository_agents") or {}
    result: list[tuple[str, dict[str, str]]] = []
    for entry in section.get("agents") or []:
        params_in = entry.get("parameters") or {}
        params: dict[str, str] = {}
        if isinstance(params_in, Mapping):
            params = {str(k): str(v) for k, v in params_in.items()}
        else:
            for item in params_in:
                params[str(item["key"])] = str(item.get("value", ""))
        result.append((str(entry.get("name", "")), params))
    return result


# ------------------------------------------------------------------------------------------
# The chain


class ChainState(enum.Enum):
    NEW = "new"
    LOADED = "loaded"  # every agent handled LOAD; waiting for LOAD_COMPLETE or LOAD_FAIL
    LOAD_FAILED = "load_failed"  # terminal
    COMPLETE = "complete"  # LOAD_COMPLETE sent; the model is serving
    UNLOADING = "unloading"  # UNLOAD sent
    UNLOADED = "unloaded"  # UNLOAD_COMPLETE sent; terminal


@dataclass
class _Member:
    name: str
    parameters: dict[str, str]
    agent: Any
    origin: str
    context: AgentContext | None = field(default=None)


def _remove_tree(path: str) -> None:
    if not os.path.lexists(path):
        return
    try:
        shutil.rmtree(path)
        return
    except OSError:
        pass
    # An agent may have left read-only directories behind; make them writable and retry.
    for root, dirs, _files in os.walk(path):
        for d in dirs:
            full = os.path.join(root, d)
            if not os.path.islink(full):
                try:
                    os.chmod(full, stat.S_IRWXU)
                except OSError:
                    pass
    shutil.rmtree(path, ignore_errors=True)
    if os.path.lexists(path):
        logger.error("failed to delete repository agent temporary location '%s'", path)


class AgentChain:
    """The repository agents of one model load, in config order.

    Thread-safe: every method takes the chain's lock, so calls from a thread-pool executor
    are serialized. All methods block (agents may hash or decrypt gigabytes); call them off
    the event loop.
    """

    def __init__(
        self, model_name: str, members: Sequence[_Member], *, temp_root: str | None = None
    ) -> None:
        self._model_name = model_name
        self._members = list(members)
        self._temp_root = temp_root
        self._lock = threading.RLock()
        self._state = ChainState.NEW
        self._invoked: list[_Member] = []
        self._location: str | None = None

    @classmethod
    def create(
        cls,
        model_name: str,
        agents: Sequence[tuple[str, Mapping[str, str]]],
        agent_directory: str | None,
        *,
        temp_root: str | None = None,
    ) -> AgentChain:
        """Resolve and instantiate ``agents`` (name, parameters), in order.

        ``temp_root`` is where temporary locations are made (default: the system temp
        directory; ``/dev/shm`` keeps decrypted files off disk).
        Raises :class:`AgentNotFound`, :class:`AgentImportError` or :class:`AgentError`.
        """
        members: list[_Member] = []
        for name, parameters in agents:
            factory, origin = resolve_agent(name, agent_directory)
            agent = _instantiate(name, factory, origin)
            members.append(
                _Member(name, {str(k): str(v) for k, v in parameters.items()}, agent, origin)
            )
        return cls(model_name, members, temp_root=temp_root)

    @classmethod
    def from_config(
        cls,
        model_name: str,
        config: Mapping[str, Any],
        agent_directory: str | None,
        *,
        temp_root: str | None = None,
    ) -> AgentChain:
        """:meth:`create` from a config's ``model_repository_agents`` (Triton JSON form)."""
        return cls.create(
            model_name, agents_from_config(config), agent_directory, temp_root=temp_root
        )

    # -- introspection -----------------------------------------------------------------

    @property
    def model_name(self) -> str:
        return self._model_name

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(m.name for m in self._members)

    @property
    def state(self) -> ChainState:
        return self._state

    @property
    def location(self) -> str | None:
        """The final repository location after a successful :meth:`load`."""
        return self._location

    def __len__(self) -> int:
        return len(self._members)

    def __repr__(self) -> str:
        return (
            f"AgentChain(model={self._model_name!r}, agents={self.names}, "
            f"state={self._state.value})"
        )

    # -- temporary locations -----------------------------------------------------------

    def _acquire(self, ctx: AgentContext) -> str:
        safe_model = re.sub(r"[^A-Za-z0-9_.\-]", "_", self._model_name)[:64]
        safe_agent = re.sub(r"[^A-Za-z0-9_.\-]", "_", ctx.agent_name)[:32]
        path = tempfile.mkdtemp(
            prefix=f"shmserve-repoagent-{safe_model}-{safe_agent}-", dir=self._temp_root
        )
        os.chmod(path, stat.S_IRWXU)  # mkdtemp already makes it 0700; be explicit
        return path

    def _release(self, ctx: AgentContext, path: str) -> None:
        del ctx
        _remove_tree(path)

    def _release_all(self) -> None:
        for member in self._invoked:
            if member.context is not None:
                for path in member.context._take_temporary():
                    _remove_tree(path)

    # -- actions -----------------------------------------------------------------------

    def _require(self, action: Action, *allowed: ChainState) -> None:
        if self._state not in allowed:
            raise AgentStateError(
                f"model '{self._model_name}': unexpected repository agent lifecycle "
                f"transition from state '{self._state.value}' to {action.triton_name}"
            )

    def _invoke_logged(self, action: Action, members: Sequence[_Member]) -> None:
        for member in members:
            ctx = member.context
            assert ctx is not None
            ctx._begin(action)
            try:
                member.agent.handle(action, ctx)
            except AgentError as exc:
                logger.error(
                    "repository agent '%s' returned an error on %s for model '%s': %s",
                    member.name,
                    action.triton_name,
                    self._model_name,
                    exc.message,
                )
            except Exception:
                logger.exception(
                    "repository agent '%s' raised on %s for model '%s'",
                    member.name,
                    action.triton_name,
                    self._model_name,
                )

    def load(
        self,
        location: str,
        versions: Sequence[int],
        config: Mapping[str, Any],
        *,
        config_reader: ConfigReader | None = None,
    ) -> str:
        """Send LOAD to every agent in config order; return the final repository location.

        ``location`` is the model directory, ``config`` the ORIGINAL config (Triton JSON
        form). With ``config_reader`` (path of a model directory → config dict), agents
        after the first see the config read from the previous agent's location, as in
        Triton (an unreadable one gives them ``{}``); without it every agent sees
        ``config``.

        On the first failure the later agents are never called; the invoked agents
        (failing one included) get LOAD_FAIL in reverse order, every temporary location
        is removed, and the failing agent's :class:`AgentError` is raised (its ``agent``
        attribute names it; an unexpected exception is wrapped in an AgentError).
        """
        with self._lock:
            self._require(Action.LOAD, ChainState.NEW)
            current = os.path.abspath(location)
            original = copy.deepcopy(dict(config))
            for index, member in enumerate(self._members):
                member_config: Mapping[str, Any] = original
                if config_reader is not None and index > 0:
                    try:
                        member_config = config_reader(current)
                    except Exception as exc:
                        logger.warning(
                            "model '%s': cannot read the config at '%s' for repository "
                            "agent '%s': %s",
                            self._model_name,
                            current,
                            member.name,
                            exc,
                        )
                        member_config = {}
                ctx = AgentContext(
                    agent_name=member.name,
                    model_name=self._model_name,
                    versions=versions,
                    config=copy.deepcopy(dict(member_config)),
                    parameters=member.parameters,
                    location=current,
                    acquire=self._acquire,
                    release=self._release,
                )
                member.context = ctx
                self._invoked.append(member)
                ctx._begin(Action.LOAD)
                try:
                    member.agent.handle(Action.LOAD, ctx)
                except Exception as exc:
                    error = self._as_agent_error(member, exc)
                    self._state = ChainState.LOAD_FAILED
                    self._invoke_logged(Action.LOAD_FAIL, list(reversed(self._invoked)))
                    self._release_all()
                    if error is exc:
                        raise
                    raise error from exc
                current = ctx.location
            self._location = current
            self._state = ChainState.LOADED
            return current

    def _as_agent_error(self, member: _Member, exc: Exception) -> AgentError:
        if isinstance(exc, AgentError):
            if exc.agent is None:
                exc.agent = member.name
            logger.error(
                "repository agent '%s' failed %s for model '%s': %s",
                member.name,
                Action.LOAD.triton_name,
                self._model_name,
                exc.message,
            )
            return exc
        logger.exception(
            "repository agent '%s' raised on %s for model '%s'",
            member.name,
            Action.LOAD.triton_name,
            self._model_name,
        )
        return AgentError(
            f"repository agent '{member.name}' failed on {Action.LOAD.triton_name}: "
            f"{type(exc).__name__}: {exc}",
            agent=member.name,
        )

    def load_complete(self) -> None:
        """The model loaded: LOAD_COMPLETE to every agent, in reverse order."""
        with self._lock:
            self._require(Action.LOAD_COMPLETE, ChainState.LOADED)
            self._state = ChainState.COMPLETE
            self._invoke_logged(Action.LOAD_COMPLETE, list(reversed(self._invoked)))

    def load_fail(self) -> None:
        """The model failed to load after LOAD: LOAD_FAIL in reverse order, then clean up.

        A no-op when the load already failed inside :meth:`load`.
        """
        with self._lock:
            if self._state is ChainState.LOAD_FAILED:
                return
            self._require(Action.LOAD_FAIL, ChainState.LOADED)
            self._state = ChainState.LOAD_FAILED
            try:
                self._invoke_logged(Action.LOAD_FAIL, list(reversed(self._invoked)))
            finally:
                self._release_all()

    def unload(self) -> None:
        """The model is being unloaded: UNLOAD to every agent, in config order."""
        with self._lock:
            if self._state is ChainState.UNLOADING:
                return  # Triton ignores a repeated UNLOAD
            self._require(Action.UNLOAD, ChainState.COMPLETE)
            self._state = ChainState.UNLOADING
            self._invoke_logged(Action.UNLOAD, list(self._invoked))

    def unload_complete(self) -> None:
        """The model is unloaded: UNLOAD_COMPLETE in reverse order, then every temporary
        location is removed."""
        with self._lock:
            if self._state is ChainState.UNLOADED:
                return
            self._require(Action.UNLOAD_COMPLETE, ChainState.UNLOADING)
            self._state = ChainState.UNLOADED
            try:
                self._invoke_logged(Action.UNLOAD_COMPLETE, list(reversed(self._invoked)))
            finally:
                self._release_all()

    def close(self) -> None:
        """Finish whatever lifecycle is open (as Triton's ``~TritonRepoAgentModel``) and
        remove every temporary location. Safe to call in any state, more than once."""
        with self._lock:
            if self._state is ChainState.LOADED:
                self.load_fail()
            elif self._state is ChainState.COMPLETE:
                self.unload()
                self.unload_complete()
            elif self._state is ChainState.UNLOADING:
                self.unload_complete()
            self._release_all()
