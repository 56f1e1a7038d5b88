"""Server settings, with tritonserver's flag names where the concept is the same."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Settings:
    model_repository: str
    grpc_address: str = "0.0.0.0"
    grpc_port: int = 8001
    metrics_port: int = 8002
    allow_metrics: bool = True
    model_control_mode: str = "none"          # none | explicit | poll
    load_models: list[str] = field(default_factory=list)
    repository_poll_secs: float = 15.0
    exit_timeout_secs: float = 30.0
    repoagent_directory: str | None = None
    log_verbose: int = 0
    strict_readiness: bool = True
    shm_key_prefix: str | None = None
    allow_client_shm: bool = False          # register client shm over gRPC (docs/security.md)
    shm_allow_foreign_owners: bool = False  # ... also segments another uid owns
    local_socket: str = ""                  # "" = <tmpdir>/shmserve-<grpc port>.sock, "none" = off
    restricted_protocols: list[tuple[set[str], str, str]] = field(default_factory=list)
    pipeline_depth: int = 2                 # batches sent ahead to each instance
    worker_busy_poll_us: int = 50           # see workers/busy_poll.py (0 = always block)
    worker_heartbeat_secs: float = 5.0
    worker_hang_secs: float = 60.0
