"""``shmserve.Server``: the server inside another Python program.

The supervisor runs in a child process started with a clean exec (``python -m shmserve.daemon
serve ...``), never by forking the host: a host that imported CUDA, or runs threads, cannot
be forked safely, and an exec'd child inherits none of it. The child's fork server and workers
descend from that clean process, as under systemd. Consequences, enforced here:

- the host program is never forked by shmserve, so CUDA, threads and any native library in the
  host are fine before and after ``Server()``;
- a ``Server`` belongs to the process that started it: in a child the host forks later
  (``os.fork``, multiprocessing's "fork"), every method raises ``ServerError``, and the
  server's lifeline is closed there so that child cannot keep the server alive;
- the server ends with the host: ``close()``, the ``with`` block's end, interpreter exit
  (atexit), or the host's death (a pipe whose write end only the host holds; the supervisor
  drains and exits on its end of file, daemon/lifeline.py; workers follow the supervisor,
  workers/lineage.py).

No network port is opened unless asked: gRPC (the control calls: load, unload, health,
metadata) listens on a Unix socket in a private directory, next to the local shared-memory
channel's socket; HTTP and metrics are off. ``grpc_port=``, ``allow_http=True``,
``allow_metrics=True`` ... turn them on, with the same names and meaning as ``shmserve serve``'s
flags (daemon/settings.py).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import weakref
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any

from shmserve.embedded_settings import serve_arguments
from shmserve.workers.lineage import process_alive

if TYPE_CHECKING:
    from shmserve.client import AsyncClient, Client

DIRECTORY_PREFIX = "shmserve-embedded-"  # + the host's pid: <tmpdir>/shmserve-embedded-<pid>-*
# Seconds past the server's own exit budget (exit_timeout_secs) before close() kills it.
KILL_GRACE_SECS = 5.0
DEFAULT_EXIT_TIMEOUT_SECS = 30.0


class ServerError(RuntimeError):
    """The embedded server could not start, or was used from the wrong process."""


class Server:
    """A shmserve server run by this program; see the module's docstring.

    ``model_repository`` and every keyword in ``settings`` are ``shmserve serve``'s settings
    by their table names (``model_control_mode="explicit"``, ``grpc_port=0``, ...); an unknown
    name is a TypeError, a bad value a ValueError, both before anything starts.
    ``startup_timeout`` bounds the wait for the server to be ready (models loaded);
    ``log_file`` receives the server's log (default: this program's stderr).
    """

    def __init__(self, model_repository: str, *, startup_timeout: float = 120.0,
                 log_file: str | None = None, **settings: Any) -> None:
        self._directory = ""
        given = dict(settings)
        given["model_repository"] = os.path.abspath(model_repository)
        self._arguments = serve_arguments(given)  # checks names and values first
        self._settings = given
        self.startup_timeout = startup_timeout
        self.log_file = log_file
        self._owner = os.getpid()
        self._process: subprocess.Popen[bytes] | None = None
        self._lifeline: int | None = None
        self._notify: socket.socket | None = None
        self._client: Client | None = None
        self._status = ""
        self.socket_path = ""
        self.grpc_address = ""

    # --- life -------------------------------------------------------------------------------
    def start(self) -> Server:
        """Start the server and wait until it is ready; returns self."""
        self._check_owner()
        if self._process is not None:
            raise ServerError("this shmserve.Server is already started")
        remove_stale_directories()
        self._directory = tempfile.mkdtemp(prefix=f"{DIRECTORY_PREFIX}{self._owner}-")  # 0700
        try:
            self._spawn()
            self._wait_ready()
        except BaseException:
            self.close()
            raise
        _live_servers.add(self)
        return self

    def _defaults(self) -> dict[str, Any]:
        """Embedded defaults: no network port unless the caller asked for one."""
        given = self._settings
        defaults: dict[str, Any] = {
            "local_socket": os.path.join(self._directory, "local.sock"),
            "allow_http": False,
            "allow_metrics": False,
        }
        if "grpc_address" not in given and "grpc_port" not in given:
            defaults["grpc_address"] = "unix:" + os.path.join(self._directory, "grpc.sock")
        return {name: value for name, value in defaults.items() if name not in given}

    def _spawn(self) -> None:
        defaults = self._defaults()
        read_end, write_end = os.pipe()  # both non-inheritable; read_end passed explicitly
        self._lifeline = write_end
        self._notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify_path = os.path.join(self._directory, "notify.sock")
        self._notify.bind(notify_path)
        environ = dict(os.environ, NOTIFY_SOCKET=notify_path)
        command = [sys.executable, "-m", "shmserve.daemon", "serve", *self._arguments,
                   *serve_arguments(defaults), f"--lifeline-fd={read_end}"]
        log: IO[bytes] | None = open(self.log_file, "ab") if self.log_file else None
        try:
            self._process = subprocess.Popen(command, env=environ, pass_fds=(read_end,),
                                             stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                             start_new_session=True)
        finally:
            os.close(read_end)
            if log is not None:
                log.close()
        local = self._settings.get("local_socket", defaults.get("local_socket"))
        self.socket_path = "" if local == "none" else str(local)
        self.grpc_address = str(self._settings.get("grpc_address",
                                                   defaults.get("grpc_address", "")))

    def _wait_ready(self) -> None:
        """Until the supervisor says READY=1 on the notify socket (daemon/systemd.py)."""
        assert self._process is not None and self._notify is not None
        deadline = time.monotonic() + self.startup_timeout
        self._notify.settimeout(0.1)
        while True:
            code = self._process.poll()
            if code is not None:
                where = f"; see {self.log_file}" if self.log_file else " (its log is above)"
                raise ServerError(f"shmserve exited with status {code} while starting{where}")
            if time.monotonic() > deadline:
                raise ServerError(f"shmserve was not ready within {self.startup_timeout} s")
            try:
                message = self._notify.recv(4096).decode(errors="replace")
            except TimeoutError:
                continue
            fields = dict(line.partition("=")[::2] for line in message.splitlines())
            if "STATUS" in fields:
                self._status = fields["STATUS"]
            if fields.get("READY") == "1":
                self._notify.close()   # only start-up reads it
                self._notify = None
                os.unlink(os.path.join(self._directory, "notify.sock"))
                return

    def close(self) -> None:
        """Stop the server: drain in-flight requests, stop the workers, remove its files.
        Idempotent; a forked child of the host cannot do it (ServerError)."""
        if self._owner != os.getpid():
            raise self._foreign()
        _live_servers.discard(self)
        if self._client is not None:
            with contextlib.suppress(Exception):
                self._client.close()
            self._client = None
        process, self._process = self._process, None
        if process is not None:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
            budget = float(self._settings.get("exit_timeout_secs", DEFAULT_EXIT_TIMEOUT_SECS))
            try:
                process.wait(budget + KILL_GRACE_SECS)
            except subprocess.TimeoutExpired:
                process.kill()  # the fork server and workers die with it (lineage.py)
                process.wait()
        if self._lifeline is not None:
            with contextlib.suppress(OSError):
                os.close(self._lifeline)
            self._lifeline = None
        if self._notify is not None:
            self._notify.close()
            self._notify = None
        if self._directory:
            shutil.rmtree(self._directory, ignore_errors=True)
            self._directory = ""

    @property
    def pid(self) -> int | None:
        """The supervisor's pid while it runs."""
        return self._process.pid if self._process is not None else None

    @property
    def status(self) -> str:
        """The supervisor's last status line, e.g. ``serving on gRPC 8001, HTTP 8000``."""
        return self._status

    @property
    def grpc_port(self) -> int | None:
        """The TCP port gRPC listens on (None: a Unix socket, or off); with ``grpc_port=0``
        the one the system chose."""
        return self._port("gRPC")

    @property
    def http_port(self) -> int | None:
        """The port HTTP/REST listens on (None: off)."""
        return self._port("HTTP")

    def _port(self, door: str) -> int | None:
        found = re.search(rf"\b{door} (\d+)\b", self._status)
        return int(found.group(1)) if found else None

    # --- clients and model control ----------------------------------------------------------
    def client(self, **options: Any) -> Client:
        """A new ``shmserve.client.Client`` on this server's local channel (inference through
        shared memory; control calls over its gRPC). The caller closes it."""
        from shmserve.client import Client

        return Client(self._client_url(), **options)

    def async_client(self, **options: Any) -> AsyncClient:
        """The asyncio twin of ``client()``; create it inside the running loop."""
        from shmserve.client import AsyncClient

        return AsyncClient(self._client_url(), **options)

    def load(self, name: str, config: str | dict[str, Any] | None = None,
             files: dict[str, bytes] | None = None) -> None:
        """Load or reload a model (needs ``model_control_mode="explicit"``, as in Triton)."""
        self._control().load_model(name, config, files)

    def unload(self, name: str, unload_dependents: bool = False) -> None:
        self._control().unload_model(name, unload_dependents)

    def _client_url(self) -> str:
        self._check_owner()
        if self._process is None:
            raise ServerError("this shmserve.Server is not running: start() it or use "
                              "'with shmserve.Server(...) as server'")
        if not self.socket_path:
            raise ServerError("this server has no local channel (local_socket='none')")
        return "local://" + self.socket_path

    def _control(self) -> Client:
        if self._client is None:
            self._client = self.client()
        return self._client

    # --- the fork rule ------------------------------------------------------------------------
    def _check_owner(self) -> None:
        if self._owner != os.getpid():
            raise self._foreign()

    def _foreign(self) -> ServerError:
        return ServerError(
            f"this shmserve.Server belongs to process {self._owner}; process {os.getpid()} "
            f"is a fork of it and cannot use or stop it (its channels and lifeline stay with "
            f"the parent): start a Server in this process, or fork before starting one")

    def _after_fork_in_child(self) -> None:
        """In a forked child: drop the lifeline so the child cannot keep the server alive."""
        if self._lifeline is not None:
            with contextlib.suppress(OSError):
                os.close(self._lifeline)
            self._lifeline = None

    # --- with / async with --------------------------------------------------------------------
    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    async def __aenter__(self) -> Server:
        return await asyncio.to_thread(self.start)

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await asyncio.to_thread(self.close)

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self._process is not None else "stopped"
        return f"<shmserve.Server {self._settings['model_repository']} ({state})>"


def remove_stale_directories() -> list[str]:
    """Remove the private directories of embedded servers whose host program is gone (a host
    killed with SIGKILL cannot remove its own; its server did remove its sockets)."""
    removed = []
    root = tempfile.gettempdir()
    pattern = re.compile(rf"{DIRECTORY_PREFIX}(\d+)-")
    for name in os.listdir(root):
        found = pattern.match(name)
        if found is None or process_alive(int(found.group(1))):
            continue
        path = os.path.join(root, name)
        with contextlib.suppress(OSError):
            if os.lstat(path).st_uid == os.geteuid():
                shutil.rmtree(path)
                removed.append(path)
    return removed


_live_servers: weakref.WeakSet[Server] = weakref.WeakSet()


def _close_all_at_exit() -> None:
    if not _live_servers:
        return
    for server in list(_live_servers):
        if server._owner == os.getpid():
            with contextlib.suppress(Exception):
                server.close()


def _drop_lifelines_in_child() -> None:
    for server in list(_live_servers):
        server._after_fork_in_child()


atexit.register(_close_all_at_exit)
os.register_at_fork(after_in_child=_drop_lifelines_in_child)
