"""Runs a model's auto-completion in a throwaway child of the fork server: a python model's
static ``auto_complete_config``, an ONNX model's signature read by the onnxruntime backend, or a
dali model's pipeline read for its inputs and outputs.

The supervisor never imports user code (model files import torch and may do anything at import
time); it forks this from the fork server (which has numpy and the python backend preloaded),
sends the config, and reads back the completed config or the error. The child exits after one
answer, so nothing the model imported outlives the call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any


@dataclass(frozen=True, slots=True)
class AutoCompleteResult:
    """The completed config (Triton's model_config JSON as a dict), or an error."""

    config: dict[str, Any] | None
    error_code: str = ""
    error_message: str = ""


def run_auto_complete(conn: Connection, config: dict[str, Any], model_file: str,
                      backend: str = "python", default_max_batch_size: int = 4) -> None:
    """The child's entry point for a python or onnxruntime model: answer exactly once."""
    def complete() -> dict[str, Any]:
        if backend == "onnxruntime":
            from shmserve.workers.backends.onnxruntime.auto_complete import onnx_auto_complete
            return onnx_auto_complete(config, model_file, default_max_batch_size)
        from shmserve.workers.backends.python import auto_complete_config, install_pb_utils
        install_pb_utils()
        return auto_complete_config(config, model_file)

    _answer(conn, complete)


def run_dali_auto_complete(conn: Connection, config: dict[str, Any], version_path: str,
                           max_batch_size_given: bool) -> None:
    """The child's entry point for a dali model: answer exactly once on ``conn``."""
    from shmserve.workers.backends.dali.auto_complete import complete_config
    _answer(conn, lambda: complete_config(config, version_path, max_batch_size_given))


def _answer(conn: Connection, complete: Callable[[], dict[str, Any]]) -> None:
    from shmserve.workers.backend import BackendError
    try:
        result = AutoCompleteResult(complete())
    except BackendError as exc:
        result = AutoCompleteResult(None, exc.code, exc.message)
    except BaseException as exc:  # anything the model did is reported, not raised
        result = AutoCompleteResult(None, "INTERNAL", f"{type(exc).__name__}: {exc}")
    try:
        conn.send(result)
    finally:
        conn.close()
