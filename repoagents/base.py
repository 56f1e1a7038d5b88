"""Repository agents: the actions, the per-model handle an agent works on, the agent base class.

This is Triton's TRITONREPOAGENT concept in Python. A repository agent is a plug-in that
runs when a model is loaded and unloaded and may inspect or rewrite the model's files
before the server reads them (verify checksums, decrypt, convert, ...). An agent may hand
the load a *new repository location*: a model directory with its own ``config.pbtxt`` and
version folders, usually one written into a temporary location owned by the runner.

The lifecycle of one model load, as Triton defines it (``tritonrepoagent.h``)::

    LOAD -> LOAD_COMPLETE -> UNLOAD -> UNLOAD_COMPLETE
    LOAD -> LOAD_FAIL

See ``shmserve.repoagents.runner.AgentChain`` for the order in which a model's agents see
these actions and docs/repoagents.md for the full contract.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = [
    "Action",
    "AgentContext",
    "AgentError",
    "AgentImportError",
    "AgentNotFound",
    "AgentStateError",
    "RepoAgent",
]


class Action(enum.Enum):
    """The lifecycle actions an agent is told about (``TRITONREPOAGENT_ActionType``)."""

    LOAD = "LOAD"
    LOAD_COMPLETE = "LOAD_COMPLETE"
    LOAD_FAIL = "LOAD_FAIL"
    UNLOAD = "UNLOAD"
    UNLOAD_COMPLETE = "UNLOAD_COMPLETE"

    @property
    def triton_name(self) -> str:
        """Triton's spelling, e.g. ``TRITONREPOAGENT_ACTION_LOAD``."""
        return f"TRITONREPOAGENT_ACTION_{self.value}"


class AgentError(Exception):
    """A repository agent failed; raised by an agent to fail an action.

    ``message`` is the text the load error carries (for the built-in agents exactly
    Triton's text). ``agent`` names the agent when the runner knows it.
    """

    def __init__(self, message: str, *, agent: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.agent = agent

    def __str__(self) -> str:
        return self.message


class AgentNotFound(AgentError):
    """No agent of that name exists (not in the agent directory, no entry point, no built-in)."""


class AgentImportError(AgentError):
    """The agent exists but could not be imported or does not define an agent."""


class AgentStateError(AgentError):
    """An action was requested out of lifecycle order (a bug in the caller, not the agent)."""


class AgentContext:
    """What one agent sees of one model during one load/unload lifecycle.

    Triton's ``TRITONREPOAGENT_AgentModel``. The runner makes one per agent per load; an
    agent may keep per-model state in :attr:`state`.
    """

    def __init__(
        self,
        *,
        agent_name: str,
        model_name: str,
        versions: Sequence[int],
        config: Mapping[str, Any],
        parameters: Mapping[str, str],
        location: str,
        acquire: Callable[[AgentContext], str],
        release: Callable[[AgentContext, str], None],
    ) -> None:
        self._agent_name = agent_name
        self._model_name = model_name
        self._versions = tuple(versions)
        self._config: dict[str, Any] = dict(config)
        self._parameters: dict[str, str] = dict(parameters)
        self._location = location
        self._acquire = acquire
        self._release = release
        self._action: Action | None = None
        self._temporary: list[str] = []
        #: Free for the agent: anything it wants to remember between actions.
        self.state: Any = None

    # -- read-only facts ------------------------------------------------------------------

    @property
    def agent_name(self) -> str:
        """The name this agent was configured under in ``model_repository_agents``."""
        return self._agent_name

    @property
    def model_name(self) -> str:
        return self._model_name

    @property
    def versions(self) -> tuple[int, ...]:
        """The model versions this load is for."""
        return self._versions

    @property
    def config(self) -> dict[str, Any]:
        """The model configuration in Triton's JSON form (keys are proto field names).

        This is the original config the load started from (the one whose
        ``model_repository_agents`` list the runner follows), unless the runner was given a
        config reader, in which case agents after the first see the config read from the
        location the previous agent left (what Triton does). A private copy: changing it
        changes nothing; write a new config.pbtxt into a new location instead.
        """
        return self._config

    @property
    def parameters(self) -> dict[str, str]:
        """This agent's ``parameters`` from ``model_repository_agents`` (a private copy)."""
        return self._parameters

    @property
    def location(self) -> str:
        """The current repository location: a model directory (config.pbtxt + versions)."""
        return self._location

    @property
    def action(self) -> Action | None:
        """The action being handled now (or the last one handled)."""
        return self._action

    @property
    def temporary_locations(self) -> tuple[str, ...]:
        """The temporary locations this agent acquired and still holds."""
        return tuple(self._temporary)

    # -- what an agent may do ---------------------------------------------------------------

    def acquire_temporary_location(self) -> str:
        """Create and return a fresh, empty, private directory (mode 0700).

        The runner owns it and removes it after UNLOAD_COMPLETE, after LOAD_FAIL, or when
        the load fails; an agent never has to clean it up (it may call
        :meth:`release_temporary_location` to drop it earlier). Each call makes a new one.
        """
        path = self._acquire(self)
        self._temporary.append(path)
        return path

    def release_temporary_location(self, path: str) -> None:
        """Remove a temporary location this agent acquired (Triton's LocationRelease)."""
        if path not in self._temporary:
            raise AgentError(
                f"'{path}' is not a temporary location acquired by agent '{self._agent_name}'",
                agent=self._agent_name,
            )
        self._temporary.remove(path)
        self._release(self, path)

    def set_location(self, path: str) -> None:
        """Make the load use ``path`` as the model's repository location from now on.

        Only allowed while handling LOAD. ``path`` must be a model directory (containing
        config.pbtxt and the version folders); later agents start from it, and the server
        re-reads config.pbtxt from the final location.
        """
        if self._action is not Action.LOAD:
            current = self._action.triton_name if self._action is not None else "not set"
            raise AgentError(
                "location can only be updated during TRITONREPOAGENT_ACTION_LOAD, "
                f"current action type is {current}",
                agent=self._agent_name,
            )
        if not os.path.isdir(path):
            raise AgentError(
                f"cannot set repository location to '{path}': not a directory",
                agent=self._agent_name,
            )
        self._location = os.path.abspath(path)

    # -- runner side ------------------------------------------------------------------------

    def _begin(self, action: Action) -> None:
        self._action = action

    def _take_temporary(self) -> list[str]:
        taken, self._temporary = self._temporary, []
        return taken

    def __repr__(self) -> str:
        return (
            f"AgentContext(agent={self._agent_name!r}, model={self._model_name!r}, "
            f"location={self._location!r}, action={self._action})"
        )


class RepoAgent:
    """Base class of a repository agent.

    Override :meth:`handle`. It is called once per action with the model's
    :class:`AgentContext`; return to succeed, raise :class:`AgentError` to fail. Actions an
    agent does not care about should simply return. The runner makes one instance per
    model load (the constructor takes no arguments; parameters arrive in the context), and
    calls it from a worker thread; blocking work is fine.
    """

    def handle(self, action: Action, model: AgentContext) -> None:
        """React to ``action`` for ``model``. The default ignores every action."""
        del action, model
