"""`shmserve` command line: one subcommand per job, `serve`'s options built from the settings
table (daemon/settings.py)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import resource
import sys
from dataclasses import MISSING
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from shmserve.daemon import admin_shm
from shmserve.daemon.server_log import install_server_log, redirect_output
from shmserve.daemon.settings import Settings, default_of, parse_bool, setting_fields
from shmserve.daemon.tritonserver_flags import add_compat_arguments, apply_compat_flags
from shmserve.repoagents import decrypt


def package_version() -> str:
    try:
        return version("shmserve")
    except PackageNotFoundError:
        return "unknown"


_METAVARS: dict[object, str] = {parse_bool: "BOOL", int: "N", float: "SECS"}


def _help_with_default(help_text: str, shown: object, env: str | None) -> str:
    extras = []
    if isinstance(shown, bool):
        extras.append(f"default: {str(shown).lower()}")
    elif shown is not None and shown != []:
        extras.append(f"default: {shown if shown != '' else repr('')}")
    if env is not None:
        extras.append(f"env {env}")
    text = f"{help_text} ({'; '.join(extras)})" if extras else help_text
    return text.replace("%", "%%")


def add_setting_arguments(parser: argparse.ArgumentParser) -> None:
    """One option per setting with a flag; defaults from the table (or its env variable)."""
    for item, spec in setting_fields():
        if spec.flag is None:
            continue
        declared = None if item.default is MISSING else item.default
        options: dict[str, Any] = {
            "dest": item.name, "type": spec.parse, "required": spec.required,
            "help": _help_with_default(spec.help, declared, spec.env),
        }
        if not spec.required:
            options["default"] = default_of(item, spec)
        if spec.repeatable:
            options["action"] = "append"
        if spec.parse is parse_bool:  # "--allow-client-shm" alone means true
            options["nargs"] = "?"
            options["const"] = True
        metavar = spec.metavar or _METAVARS.get(spec.parse)
        if metavar is not None and spec.choices is None:
            options["metavar"] = metavar
        if spec.choices is not None:
            options["choices"] = spec.choices
        parser.add_argument(spec.flag, *spec.aliases, **options)


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Flags as parsed; a setting without a flag from its environment variable or default."""
    return Settings(**{item.name: getattr(args, item.name) if spec.flag is not None
                       else default_of(item, spec) for item, spec in setting_fields()})


class _CommandListHelp(argparse.HelpFormatter):
    """argparse measures subcommand names without their indent, so a long one (like
    encrypt-model) wraps; count it, so each subcommand gets one line in ``shmserve --help``."""

    def add_argument(self, action: argparse.Action) -> None:
        super().add_argument(action)
        if isinstance(action, argparse._SubParsersAction):
            self._action_max_length += self._indent_increment


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shmserve", formatter_class=_CommandListHelp,
        description="A Triton-compatible inference server that moves tensors through shared "
                    "memory.")
    parser.add_argument("--version", action="version",
                        version=f"shmserve {package_version()}")
    commands = parser.add_subparsers(dest="command", required=True, title="commands",
                                     metavar="COMMAND")
    serve_parser = commands.add_parser(
        "serve", help="run the server on a model repository",
        description="Serve a Triton-layout model repository over KServe v2 gRPC "
                    "(tritonserver's flag names).")
    add_setting_arguments(serve_parser)
    add_compat_arguments(serve_parser)
    serve_parser.set_defaults(run=lambda args: _serve_command(serve_parser, args))

    shm = commands.add_parser("shm", help=admin_shm.SUMMARY, description=admin_shm.DESCRIPTION)
    admin_shm.add_arguments(shm)
    shm.set_defaults(run=admin_shm.run)

    encrypt = commands.add_parser("encrypt-model", help=decrypt.ENCRYPT_SUMMARY,
                                  description=decrypt.ENCRYPT_DESCRIPTION)
    decrypt.add_encrypt_arguments(encrypt)
    encrypt.set_defaults(run=lambda args: decrypt.run_encrypt(args, encrypt))
    return parser


def raise_open_file_limit() -> None:
    """Soft open-file limit up to the hard one (workers inherit it): each local channel holds
    three fds here and two in every worker that answers it, so 1,024 (a login shell's usual
    soft limit) would cap the clients at about three hundred."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def repository_problem(path: str) -> str | None:
    """Why ``path`` cannot be a model repository, or None (tritonserver refuses to start)."""
    if not os.path.exists(path):
        return f"failed to stat file {path}: the model repository does not exist"
    if not os.path.isdir(path):
        return f"model repository {path} is not a directory"
    if not os.access(path, os.R_OK | os.X_OK):
        return f"model repository {path} is not readable"
    return None


def _serve_command(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    try:
        without_effect = apply_compat_flags(args, settings)
    except ValueError as exc:
        parser.error(str(exc))
    return serve(settings, without_effect)


def serve(settings: Settings, without_effect: list[str] | None = None) -> int:
    if settings.log_file:
        try:
            redirect_output(settings.log_file)
        except OSError as exc:
            print(f"error: cannot open --log-file {settings.log_file}: {exc}", file=sys.stderr)
            return 1
    install_server_log(settings)
    if without_effect:
        logging.getLogger("shmserve").warning(
            "tritonserver flag(s) without effect in shmserve, ignored: %s",
            ", ".join(without_effect))
    problem = repository_problem(settings.model_repository)
    if problem is not None:
        logging.getLogger("shmserve").error("%s", problem)
        return 1
    raise_open_file_limit()
    import uvloop

    from shmserve.daemon.supervisor import Supervisor
    return uvloop.run(Supervisor(settings).run())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    code: int = args.run(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
