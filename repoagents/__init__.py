"""Repository agents (Triton's TRITONREPOAGENT concept in Python).

``from shmserve.repoagents import AgentChain, RepoAgent, Action, AgentContext, AgentError``.
The built-in agents live in :mod:`shmserve.repoagents.checksum` and
:mod:`shmserve.repoagents.decrypt` (which needs the ``cryptography`` package); they are
imported only when a model uses them. See docs/repoagents.md.
"""

from .base import (
    Action,
    AgentContext,
    AgentError,
    AgentImportError,
    AgentNotFound,
    AgentStateError,
    RepoAgent,
)
from .runner import (
    BUILTIN_AGENTS,
    ENTRY_POINT_GROUP,
    AgentChain,
    ChainState,
    agents_from_config,
    resolve_agent,
)

__all__ = [
    "BUILTIN_AGENTS",
    "ENTRY_POINT_GROUP",
    "Action",
    "AgentChain",
    "AgentContext",
    "AgentError",
    "AgentImportError",
    "AgentNotFound",
    "AgentStateError",
    "ChainState",
    "RepoAgent",
    "agents_from_config",
    "resolve_agent",
]
