"""`shmserve` command line: serve, shm housekeeping, model encryption."""

from __future__ import annotations

import argparse
import contextlib
import logging
import resource
import sys

from shmserve.daemon.settings import Settings

PROTOCOL_GROUPS = {"health", "metadata", "inference", "shared-memory", "model-config",
                   "model-repository", "statistics", "trace", "logging"}


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got '{text}'")


def _restriction(text: str) -> tuple[set[str], str, str]:
    """tritonserver's --grpc-restricted-protocol=<groups>:<key>=<value>."""
    groups_text, _, rule = text.partition(":")
    key, _, value = rule.partition("=")
    groups = {g.strip() for g in groups_text.split(",") if g.strip()}
    unknown = groups - PROTOCOL_GROUPS
    if not groups or not key or not value or unknown:
        raise argparse.ArgumentTypeError(
            f"expected <groups>:<key>=<value> with groups from {sorted(PROTOCOL_GROUPS)}, "
            f"got '{text}'")
    return groups, key, value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shmserve", description=(
        "A Triton-compatible inference server that moves tensors through shared memory."))
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the server on a model repository",
                                description="Serve a Triton-layout model repository over "
                                            "KServe v2 gRPC (tritonserver's flag names).")
    serve.add_argument("--model-repository", required=True, help="model repository directory")
    serve.add_argument("--grpc-address", default="0.0.0.0", help="address to listen on")
    serve.add_argument("--grpc-port", type=int, default=8001, help="gRPC port (0 = any free)")
    serve.add_argument("--metrics-port", type=int, default=8002,
                       help="Prometheus metrics port, GET /metrics (0 = any free)")
    serve.add_argument("--allow-metrics", type=_bool, default=True,
                       help="serve Prometheus metrics (default true)")
    serve.add_argument("--model-control-mode", choices=["none", "explicit", "poll"],
                       default="none", help="none: load all at start; explicit: load/unload "
                                            "RPCs; poll: follow repository changes")
    serve.add_argument("--load-model", action="append", default=[], metavar="NAME",
                       help="with explicit mode: load NAME at start ('*' = all); repeatable")
    serve.add_argument("--repository-poll-secs", type=float, default=15.0,
                       help="with poll mode: seconds between repository scans")
    serve.add_argument("--exit-timeout-secs", type=float, default=30.0,
                       help="on SIGTERM: how long to wait for in-flight requests")
    serve.add_argument("--repoagent-directory", default=None,
                       help="directory of repository agents (<dir>/<name>/agent.py)")
    serve.add_argument("--strict-readiness", type=_bool, default=True,
                       help="ServerReady requires every model ready (default true)")
    serve.add_argument("--shm-key-prefix", default=None,
                       help="only allow registering system shm keys with this prefix")
    serve.add_argument("--allow-client-shm", type=_bool, nargs="?", const=True, default=False,
                       metavar="BOOL",
                       help="let gRPC clients register shared-memory regions (default false; "
                            "any gRPC client can then use the server user's segments, see "
                            "docs/security.md; the local channel checks its peer instead)")
    serve.add_argument("--shm-allow-foreign-owners", type=_bool, nargs="?", const=True,
                       default=False, metavar="BOOL",
                       help="with --allow-client-shm: also segments owned by other users "
                            "than the server's (default false)")
    serve.add_argument("--grpc-restricted-protocol", type=_restriction, action="append",
                       default=[], metavar="GROUPS:KEY=VALUE",
                       help="require header triton-grpc-protocol-KEY: VALUE for these groups")
    serve.add_argument("--local-socket", default="",
                       help="Unix socket of the local shared-memory channel (default "
                            "shmserve-<grpc port>.sock in $RUNTIME_DIRECTORY, /run/shmserve "
                            "for root, or <tmpdir>/shmserve-<uid>/; 'none' disables it)")
    serve.add_argument("--pipeline-depth", type=int, default=2, metavar="N",
                       help="batches sent ahead to each model instance, so it never waits for "
                            "the next one (1 = only when idle, as tritonserver does)")
    serve.add_argument("--worker-busy-poll-us", type=int, default=50, metavar="US",
                       help="while requests arrive back to back, a worker polls for the next "
                            "one up to this long before sleeping (adaptive; 0 = never poll)")
    serve.add_argument("--log-verbose", type=int, default=0, help="verbose logging level")
    return parser


def settings_from_args(args: argparse.Namespace) -> Settings:
    return Settings(
        model_repository=args.model_repository, grpc_address=args.grpc_address,
        grpc_port=args.grpc_port, metrics_port=args.metrics_port,
        allow_metrics=args.allow_metrics,
        model_control_mode=args.model_control_mode, load_models=args.load_model,
        repository_poll_secs=args.repository_poll_secs,
        exit_timeout_secs=args.exit_timeout_secs,
        repoagent_directory=args.repoagent_directory, log_verbose=args.log_verbose,
        strict_readiness=args.strict_readiness, shm_key_prefix=args.shm_key_prefix,
        allow_client_shm=args.allow_client_shm,
        shm_allow_foreign_owners=args.shm_allow_foreign_owners,
        restricted_protocols=args.grpc_restricted_protocol, local_socket=args.local_socket,
        pipeline_depth=max(1, args.pipeline_depth),
        worker_busy_poll_us=max(0, args.worker_busy_poll_us))


def raise_open_file_limit() -> None:
    """Soft open-file limit up to the hard one (workers inherit it): each local channel holds
    three fds here and two in every worker that answers it, so 1,024 (a login shell's usual
    soft limit) would cap the clients at about three hundred."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def serve(settings: Settings) -> int:
    logging.basicConfig(level=logging.DEBUG if settings.log_verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    raise_open_file_limit()
    import uvloop

    from shmserve.daemon.supervisor import Supervisor
    return uvloop.run(Supervisor(settings).run())


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["encrypt-model"]:
        from shmserve.repoagents.decrypt import main as encrypt_main
        return encrypt_main(argv[1:])
    if argv[:1] == ["shm"]:
        from shmserve.client.housekeeping import main as shm_main
        return shm_main(argv[1:])
    args = build_parser().parse_args(argv)
    return serve(settings_from_args(args))


if __name__ == "__main__":
    sys.exit(main())
