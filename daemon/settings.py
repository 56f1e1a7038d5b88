"""Server settings, declared once: each field of ``Settings`` carries its flag, environment
variable, parser and help, and ``daemon/cli.py`` builds ``shmserve serve``'s options from them.

Flags follow tritonserver's names where the concept is the same. A setting with an
environment variable takes its default from it (the flag still wins); a setting without a
flag is internal (tests and tuning set it through its environment variable, or not at all).

Environment variables that are *not* settings: ``NOTIFY_SOCKET`` (systemd's protocol, read
by daemon/systemd.py), ``CUDA_VISIBLE_DEVICES`` (the GPUs this host offers; the server sets
it in each GPU worker), and the variable a ``decrypt`` agent's ``key_env`` parameter names
(the key belongs to the model's config, not to the server).
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, Field, dataclass, field, fields
from typing import Any

from shmserve.daemon.backend_config import parse_backend_config
from shmserve.daemon.host_policy import parse_host_policy
from shmserve.daemon.latency_metrics import parse_metrics_config
from shmserve.daemon.trace_config import parse_trace_config

PROTOCOL_GROUPS = {"health", "metadata", "inference", "shared-memory", "model-config",
                   "model-repository", "statistics", "trace", "logging"}


def parse_bool(text: str) -> bool:
    """tritonserver's boolean flags: true/false (also 1/0, yes/no, on/off)."""
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got '{text}'")


def parse_restriction(text: str) -> tuple[set[str], str, str]:
    """tritonserver's --grpc-restricted-protocol / --http-restricted-api
    =<groups>:<key>=<value>."""
    groups_text, _, rule = text.partition(":")
    key, _, value = rule.partition("=")
    groups = {g.strip() for g in groups_text.split(",") if g.strip()}
    unknown = groups - PROTOCOL_GROUPS
    if not groups or not key or not value or unknown:
        raise argparse.ArgumentTypeError(
            f"expected <groups>:<key>=<value> with groups from {sorted(PROTOCOL_GROUPS)}, "
            f"got '{text}'")
    return groups, key, value


CACHE_NAME = "local"


def parse_pattern(text: str) -> str:
    """A regular expression (Python's syntax, searched anywhere in the name)."""
    try:
        re.compile(text)
    except re.error as exc:
        raise argparse.ArgumentTypeError(f"invalid regular expression '{text}': {exc}") from None
    return text


def parse_config_name(text: str) -> str:
    """--model-config-name: a file name under each model's configs/ folder, without .pbtxt
    ('' for none)."""
    if any(c.isspace() for c in text) or "/" in text or text in (".", ".."):
        raise argparse.ArgumentTypeError(
            f"expected a config name without spaces or '/', got '{text}'")
    return text


def parse_rate_limit_resource(text: str) -> tuple[str, int, int | None]:
    """``NAME:COUNT[:DEVICE]`` (tritonserver's --rate-limit-resource)."""
    parts = text.split(":")
    try:
        if len(parts) not in (2, 3) or not parts[0]:
            raise ValueError
        count = int(parts[1])
        device = int(parts[2]) if len(parts) == 3 else None
        if count < 0 or (device is not None and device < 0):
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected <resource_name>:<count>:<device> (device optional), got '{text}'"
        ) from None
    return parts[0].lower(), count, device


def parse_cache_config(text: str) -> tuple[str, str, str]:
    """tritonserver's ``--cache-config <cache>,<key>=<value>``; shmserve has the ``local``
    cache, whose one key is ``size`` (bytes)."""
    name, _, rule = text.partition(",")
    key, _, value = rule.partition("=")
    if name != CACHE_NAME:
        raise argparse.ArgumentTypeError(
            f"unsupported cache '{name}': shmserve has the '{CACHE_NAME}' cache only "
            f"(e.g. --cache-config {CACHE_NAME},size=1048576)")
    if key != "size" or not value.isdigit() or int(value) <= 0:
        raise argparse.ArgumentTypeError(
            f"expected {CACHE_NAME},size=<bytes> with a positive size, got '{text}'")
    return name, key, value


@dataclass(frozen=True, slots=True)
class SettingSpec:
    """How one setting is given: the table row behind a ``Settings`` field."""

    help: str
    flag: str | None = None                  # None: not on the command line
    env: str | None = None                   # environment variable giving the default
    parse: Callable[[str], Any] = str
    metavar: str | None = None
    choices: Sequence[str] | None = None
    repeatable: bool = False                 # the flag may be given several times (a list)
    required: bool = False
    aliases: tuple[str, ...] = ()            # other spellings of the flag (tritonserver's)


def setting(default: Any = MISSING, *, help: str, flag: str | None = None,
            env: str | None = None, parse: Callable[[str], Any] = str,
            metavar: str | None = None, choices: Sequence[str] | None = None,
            repeatable: bool = False, aliases: tuple[str, ...] = ()) -> Any:
    """A ``Settings`` field with its table row in the field's metadata."""
    spec = SettingSpec(help=help, flag=flag, env=env, parse=parse, metavar=metavar,
                       choices=choices, repeatable=repeatable,
                       required=default is MISSING and not repeatable, aliases=aliases)
    if repeatable:
        return field(default_factory=list, metadata={"setting": spec})
    return field(default=default, metadata={"setting": spec})


@dataclass
class Settings:
    model_repository: str = setting(
        flag="--model-repository", metavar="DIR", aliases=("--model-store",),
        help="model repository directory (Triton layout: <model>/config.pbtxt, "
             "<model>/<version>/...); --model-store is tritonserver's older name, which "
             "KServe passes")
    grpc_address: str = setting(
        "0.0.0.0", flag="--grpc-address", metavar="ADDRESS",
        help="address to listen on; unix:PATH serves gRPC on a Unix socket instead (no "
             "port: --grpc-port is then ignored)")
    grpc_port: int = setting(8001, flag="--grpc-port", parse=int,
                             help="gRPC port (0 = any free)")
    allow_grpc: bool = setting(True, flag="--allow-grpc", parse=parse_bool,
                               help="serve the KServe v2 gRPC protocol")
    grpc_frontends: int = setting(
        0, flag="--grpc-frontends", env="SHMSERVE_GRPC_FRONTENDS", parse=int, metavar="N",
        help="processes serving the gRPC and HTTP ports (SO_REUSEPORT), each forwarding to the "
             "core through shared memory; 1 = the supervisor serves both itself; 0 = one per four "
             "cores (1 on up to 7 cores, at most 8)")
    grpc_use_ssl: bool = setting(
        False, flag="--grpc-use-ssl", parse=parse_bool,
        help="serve gRPC over TLS with --grpc-server-cert and --grpc-server-key")
    grpc_use_ssl_mutual: bool = setting(
        False, flag="--grpc-use-ssl-mutual", parse=parse_bool,
        help="TLS with client certificates too, checked against --grpc-root-cert")
    grpc_server_cert: str = setting("", flag="--grpc-server-cert", metavar="PEM",
                                    help="the server's certificate (chain), PEM")
    grpc_server_key: str = setting("", flag="--grpc-server-key", metavar="PEM",
                                   help="the server's private key, PEM")
    grpc_root_cert: str = setting("", flag="--grpc-root-cert", metavar="PEM",
                                  help="with --grpc-use-ssl-mutual: the CA certificates that "
                                       "client certificates must chain to, PEM")
    grpc_keepalive_time: int | None = setting(
        None, flag="--grpc-keepalive-time", parse=int, metavar="MS",
        help="gRPC keepalive: ping an idle connection after this long (tritonserver's flag; "
             "unset: gRPC's own default)")
    grpc_keepalive_timeout: int | None = setting(
        None, flag="--grpc-keepalive-timeout", parse=int, metavar="MS",
        help="gRPC keepalive: close a connection whose ping goes unanswered this long")
    grpc_keepalive_permit_without_calls: bool | None = setting(
        None, flag="--grpc-keepalive-permit-without-calls", parse=parse_bool,
        help="gRPC keepalive: accept and send pings on connections without calls (default "
             "true here, so tritonclient's KeepAliveOptions work)")
    grpc_http2_max_pings_without_data: int | None = setting(
        None, flag="--grpc-http2-max-pings-without-data", parse=int, metavar="N",
        help="gRPC: pings the server sends without data before it waits for data")
    grpc_http2_min_recv_ping_interval_without_data: int | None = setting(
        None, flag="--grpc-http2-min-recv-ping-interval-without-data", parse=int,
        metavar="MS",
        help="gRPC: shortest interval between a client's pings without data (default 10000 "
             "here); shorter ones are strikes")
    grpc_http2_max_ping_strikes: int | None = setting(
        None, flag="--grpc-http2-max-ping-strikes", parse=int, metavar="N",
        help="gRPC: strikes before the connection is closed with GOAWAY too_many_pings")
    grpc_max_connection_age: int | None = setting(
        None, flag="--grpc-max-connection-age", parse=int, metavar="MS",
        help="gRPC: close a connection (GOAWAY) this long after it opened, so that clients "
             "reconnect and load balancers can spread them again")
    grpc_max_connection_age_grace: int | None = setting(
        None, flag="--grpc-max-connection-age-grace", parse=int, metavar="MS",
        help="gRPC: how long calls in flight may still finish after that GOAWAY")
    grpc_header_forward_pattern: str = setting(
        "", flag="--grpc-header-forward-pattern", metavar="REGEX", parse=parse_pattern,
        help="gRPC request headers whose name matches reach the model as string request "
             "parameters (tritonserver's flag)")
    http_header_forward_pattern: str = setting(
        "", flag="--http-header-forward-pattern", metavar="REGEX", parse=parse_pattern,
        help="HTTP request headers whose name matches reach the model as string request "
             "parameters (tritonserver's flag)")
    reuse_grpc_port: bool = setting(
        False, flag="--reuse-grpc-port", parse=parse_bool,
        help="listen on the gRPC port with SO_REUSEPORT, so that another server can bind it "
             "too (a replacement starting before this one stops)")
    reuse_http_port: bool = setting(
        False, flag="--reuse-http-port", parse=parse_bool,
        help="the same for the HTTP port")
    allow_http: bool = setting(True, flag="--allow-http", parse=parse_bool,
                               help="serve the KServe v2 HTTP/REST protocol")
    http_address: str = setting("0.0.0.0", flag="--http-address", metavar="ADDRESS",
                                help="address the HTTP/REST endpoint listens on")
    http_port: int = setting(8000, flag="--http-port", parse=int,
                             help="HTTP/REST port (0 = any free)")
    http_max_header_bytes: int = setting(
        16384, flag="--http-max-header-bytes", parse=int, metavar="BYTES",
        help="HTTP: longest request line or header field (longer: 400)")
    http_max_body_bytes: int = setting(
        2**31 - 1, flag="--http-max-body-bytes", parse=int, metavar="BYTES",
        help="HTTP: largest request body, after decompression (larger: 413)")
    http_idle_secs: float = setting(
        75.0, flag="--http-idle-secs", parse=float, metavar="S",
        help="HTTP: close a connection that has not completed a request for this long "
             "(idle keep-alive connections, and headers that trickle in)")
    metrics_address: str = setting(
        "", flag="--metrics-address", metavar="ADDRESS",
        help="address of the Prometheus metrics endpoint ('' = the gRPC address)")
    metrics_port: int = setting(8002, flag="--metrics-port", parse=int,
                                help="Prometheus metrics port, GET /metrics (0 = any free)")
    allow_metrics: bool = setting(True, flag="--allow-metrics", parse=parse_bool,
                                  help="serve Prometheus metrics")
    allow_cpu_metrics: bool = setting(
        True, flag="--allow-cpu-metrics", parse=parse_bool,
        help="host CPU utilization and memory on /metrics (nv_cpu_*)")
    allow_gpu_metrics: bool = setting(
        True, flag="--allow-gpu-metrics", parse=parse_bool,
        help="per-GPU utilization, memory and power on /metrics (nv_gpu_*, from nvidia-smi "
             "when it is on PATH)")
    metrics_interval_ms: int = setting(
        2000, flag="--metrics-interval-ms", parse=int,
        help="how often the CPU and GPU metrics are read")
    model_control_mode: str = setting(
        "none", flag="--model-control-mode", choices=("none", "explicit", "poll"),
        help="none: load all at start; explicit: load/unload RPCs; poll: follow repository "
             "changes")
    load_models: list[str] = setting(
        flag="--load-model", metavar="NAME", repeatable=True,
        help="with explicit mode: load NAME at start ('*' = all); repeatable")
    repository_poll_secs: float = setting(
        15.0, flag="--repository-poll-secs", parse=float,
        help="with poll mode: seconds between repository scans")
    exit_timeout_secs: float = setting(
        30.0, flag="--exit-timeout-secs", parse=float,
        help="on SIGTERM: the whole shutdown (draining in-flight requests, then stopping "
             "the workers) takes at most this long; keep it below systemd's TimeoutStopSec")
    exit_on_error: bool = setting(
        True, flag="--exit-on-error", parse=parse_bool,
        help="exit (status 1) when a model fails to load at start-up")
    strict_readiness: bool = setting(
        True, flag="--strict-readiness", parse=parse_bool,
        help="ServerReady requires every model ready, and no model failed at start-up")
    rate_limit: str = setting(
        "off", flag="--rate-limit", choices=("off", "execution_count"),
        help="execution_count: an instance runs a batch only while the resources its "
             "instance group's rate_limiter names are free (tritonserver's flag)")
    rate_limit_resources: list[tuple[str, int, int | None]] = setting(
        flag="--rate-limit-resource", parse=parse_rate_limit_resource, repeatable=True,
        metavar="NAME:COUNT[:DEVICE]",
        help="how many of a resource there are, on that device or every device (default: "
             "the most one instance asks for); repeatable")
    model_load_retry_count: int = setting(
        0, flag="--model-load-retry-count", parse=int, metavar="N",
        help="start a model's instances again up to N times when they fail to load "
             "(tritonserver's flag)")
    model_config_name: str = setting(
        "", flag="--model-config-name", metavar="NAME", parse=parse_config_name,
        help="read each model's configs/NAME.pbtxt instead of its config.pbtxt where it has "
             "one (tritonserver's flag)")
    disable_auto_complete_config: bool = setting(
        False, flag="--disable-auto-complete-config", parse=parse_bool,
        help="do not run python models' auto_complete_config hook nor complete ONNX models' "
             "configs from the model at load (Triton's flag; the backend is still inferred "
             "from the default model file)")
    repoagent_directory: str | None = setting(
        None, flag="--repoagent-directory", metavar="DIR",
        help="directory of repository agents (<dir>/<name>/agent.py)")
    shm_key_prefix: str | None = setting(
        None, flag="--shm-key-prefix", metavar="PREFIX",
        help="only allow registering system shm keys with this prefix")
    allow_client_shm: bool = setting(
        False, flag="--allow-client-shm", parse=parse_bool,
        help="allow registering client shared memory over gRPC/HTTP")
    shm_allow_foreign_owners: bool = setting(
        False, flag="--shm-allow-foreign-owners", parse=parse_bool,
        help="over gRPC/HTTP, allow registering segments owned by another uid than the "
             "server's")
    restricted_protocols: list[tuple[set[str], str, str]] = setting(
        flag="--grpc-restricted-protocol", parse=parse_restriction, repeatable=True,
        metavar="GROUPS:KEY=VALUE",
        help="require header triton-grpc-protocol-KEY: VALUE for these groups")
    http_restricted_apis: list[tuple[set[str], str, str]] = setting(
        flag="--http-restricted-api", parse=parse_restriction, repeatable=True,
        metavar="GROUPS:KEY=VALUE",
        help="HTTP: require header KEY: VALUE for these API groups (403 without it)")
    local_socket: str = setting(
        "", flag="--local-socket", metavar="PATH",
        help="Unix socket of the local shared-memory channel ('' = "
             "shmserve-<grpc port>.sock in $RUNTIME_DIRECTORY, /run/shmserve for root, "
             "or <tmpdir>/shmserve-<uid>/; 'none' disables it)")
    local_ring_bytes: int = setting(
        8 << 20, flag="--local-ring-bytes", env="SHMSERVE_LOCAL_RING_BYTES", parse=int,
        metavar="BYTES", help="local channel: bytes of each ring (requests, responses)")
    local_stall_secs: float = setting(
        30.0, flag="--local-stall-secs", env="SHMSERVE_LOCAL_STALL_SECS", parse=float,
        help="local channel: close a client's channel when it leaves responses unread this "
             "long")
    local_direct_rings: int = setting(
        8, flag="--local-direct-rings", env="SHMSERVE_LOCAL_DIRECT_RINGS", parse=int,
        metavar="N",
        help="local channel: workers that may answer one client directly (0 = none)")
    local_direct_ring_bytes: int = setting(
        1 << 20, flag="--local-direct-ring-bytes", env="SHMSERVE_LOCAL_DIRECT_RING_BYTES",
        parse=int, metavar="BYTES", help="local channel: bytes of each direct-answer ring")
    max_request_bytes: int = setting(
        2**31 - 1, flag="--max-request-bytes", env="SHMSERVE_MAX_REQUEST_BYTES", parse=int,
        metavar="BYTES",
        help="largest inference request accepted: a gRPC message (gRPC's own receive limit, "
             "RESOURCE_EXHAUSTED) or a local-channel request's tensor bytes")
    arena_idle_secs: float = setting(
        30.0, flag="--arena-idle-secs", env="SHMSERVE_ARENA_IDLE_SECS", parse=float,
        metavar="SECS",
        help="an instance idle this long gives back the memory a large request grew: its "
             "input and output arenas shrink to their initial size (0 = never)")
    pipeline_depth: int = setting(
        2, flag="--pipeline-depth", parse=int, metavar="N",
        help="batches sent ahead to each model instance, so it never waits for the next one "
             "(1 = only when idle, as tritonserver does)")
    stream_max_pending_responses: int = setting(
        0, flag="--stream-max-pending-responses", parse=int, metavar="N",
        help="responses a stream (gRPC ModelStreamInfer, HTTP generate_stream) may hold for "
             "a client that reads slower than the model produces; past it the stream fails "
             "with RESOURCE_EXHAUSTED and its requests are cancelled (0 = no limit)")
    stream_max_pending_bytes: int = setting(
        256 << 20, flag="--stream-max-pending-bytes", parse=int, metavar="BYTES",
        help="bytes of responses a stream may hold for a client that reads slower than the "
             "model produces (one response is always let through); past it the stream fails "
             "as with --stream-max-pending-responses (0 = no limit)")
    worker_busy_poll_us: int = setting(
        50, flag="--worker-busy-poll-us", parse=int, metavar="US",
        help="while requests arrive back to back, a worker polls for the next one up to "
             "this long before sleeping (adaptive; 0 = never poll)")
    model_init_timeout_secs: float = setting(
        300.0, flag="--model-init-timeout-secs", parse=float,
        help="a model instance's worker must finish backend, model and instance initialize "
             "within this long, or it is killed and the load fails (0 = no limit; a model "
             "may override it: parameter shmserve.init_timeout_secs)")
    model_execution_timeout_secs: float = setting(
        0.0, flag="--model-execution-timeout-secs", parse=float,
        help="a batch executing longer is treated as hung: the instance's worker is killed "
             "and replaced, its requests fail (0 = no limit; a model may override it: "
             "parameter shmserve.execution_timeout_secs)")
    worker_heartbeat_timeout_secs: float = setting(
        10.0, flag="--worker-heartbeat-timeout-secs", parse=float,
        help="a worker that sends no heartbeat this long (stopped, or its interpreter "
             "stuck) is killed and replaced; from half of it the instance counts as not "
             "ready")
    restart_backoff_max_secs: float = setting(
        10.0, flag="--restart-backoff-max-secs", parse=float,
        help="an instance whose worker keeps failing at start (before serving a request) is "
             "restarted after 0.1 s, doubling up to this long; one that served is restarted "
             "at once")
    worker_heartbeat_secs: float = setting(
        2.0, help="at most this many seconds between a worker's heartbeats (also at most a "
                  "fifth of the heartbeat timeout)")
    host_policies: list[tuple[str, str, str]] = setting(
        flag="--host-policy", parse=parse_host_policy, repeatable=True,
        metavar="NAME,SETTING=VALUE",
        help="pin the workers of instances using host policy NAME (default 'cpu', or "
             "'gpu_<device>') to numa-node=N or cpu-cores=LIST (tritonserver's flag); "
             "repeatable")
    backend_config: list[tuple[str, str, str]] = setting(
        flag="--backend-config", parse=parse_backend_config, repeatable=True,
        metavar="[BACKEND,]SETTING=VALUE",
        help="tritonserver's backend settings: default-max-batch-size=N (ONNX auto-complete; "
             "default 4) acts here, the rest are listed in a warning; repeatable")
    metrics_config: list[tuple[str, str]] = setting(
        flag="--metrics-config", parse=parse_metrics_config, repeatable=True,
        metavar="KEY=VALUE",
        help="latency metrics, as tritonserver's: summary_latencies=true, "
             "summary_quantiles=Q:E,..., counter_latencies=false, histogram_latencies=true; "
             "repeatable")
    trace_config: list[tuple[str, str]] = setting(
        flag="--trace-config", parse=parse_trace_config, repeatable=True,
        metavar="[triton,]KEY=VALUE",
        help="request tracing, as tritonserver's triton mode: level=TIMESTAMPS, rate=N, "
             "count=N, triton,file=PATH, triton,log-frequency=N; repeatable")
    cache_config: list[tuple[str, str, str]] = setting(
        flag="--cache-config", parse=parse_cache_config, repeatable=True,
        metavar="CACHE,KEY=VALUE",
        help="the response cache, as tritonserver's: local,size=BYTES (models opt in with "
             "response_cache { enable: true }); repeatable")
    log_verbose: int = setting(0, flag="--log-verbose", parse=int,
                               help="verbose logging level")
    log_info: bool = setting(True, flag="--log-info", parse=parse_bool,
                             help="log INFO messages (the supervisor's)")
    log_warning: bool = setting(True, flag="--log-warning", parse=parse_bool,
                                help="log WARNING messages (the supervisor's)")
    log_error: bool = setting(True, flag="--log-error", parse=parse_bool,
                              help="log ERROR messages (the supervisor's)")
    log_format: str = setting(
        "default", flag="--log-format", choices=("default", "ISO8601"),
        help="timestamps: default, or ISO8601 (YYYY-MM-DDThh:mm:ssZ, UTC)")
    log_file: str = setting(
        "", flag="--log-file", metavar="PATH",
        help="append the server's output (supervisor, workers, frontends) to this file instead "
             "of stdout/stderr")
    server_id: str = setting("shmserve", flag="--id", metavar="ID",
                             help="the server's name in ServerMetadata")
    lifeline_fd: int | None = setting(
        None, flag="--lifeline-fd", parse=int, metavar="FD",
        help="shut down (as on SIGTERM) when this inherited file descriptor reaches end of "
             "file: the program that started the server holds its other end, so the server "
             "ends with that program however it ends (shmserve.Server does this)")

    def __post_init__(self) -> None:
        self.pipeline_depth = max(1, self.pipeline_depth)
        self.worker_busy_poll_us = max(0, self.worker_busy_poll_us)
        self.max_request_bytes = min(max(1, self.max_request_bytes), 2**31 - 1)


def is_unix_address(address: str) -> bool:
    """Whether a --grpc-address names a Unix socket (unix:PATH) rather than a host."""
    return address.startswith("unix:")


def setting_fields() -> list[tuple[Field[Any], SettingSpec]]:
    """Every setting with its table row, in declaration order."""
    return [(f, f.metadata["setting"]) for f in fields(Settings)]


def default_of(item: Field[Any], spec: SettingSpec,
               environ: Mapping[str, str] | None = None) -> Any:
    """The setting's default: its environment variable when set, else the declared one."""
    environ = os.environ if environ is None else environ
    if spec.env is not None and environ.get(spec.env):
        try:
            return spec.parse(environ[spec.env])
        except (ValueError, argparse.ArgumentTypeError) as exc:
            raise SystemExit(f"shmserve: environment variable {spec.env}: {exc}") from None
    if item.default_factory is not MISSING:
        return item.default_factory()
    return None if item.default is MISSING else item.default

