"""Triton's python-backend model loading API from inside a worker: ``pb_utils.load_model``,
``unload_model`` and ``is_model_ready`` go into the core over the worker's BLS channel (the
local channel's "model" operation, ``ModelControl``) and run as RepositoryModelLoad,
RepositoryModelUnload and ModelReady do: loading and unloading only in explicit model
control mode, with the same "config" and "file:" overrides and the same error texts.

A model cannot load or unload itself this way: the call would wait for the unload of the
instance that is making it.
"""

from __future__ import annotations

from shmserve.client.errors import ShmserveError
from shmserve.protos.local_messages import ModelControl
from shmserve.protos.local_ring import MessageTooLarge
from shmserve.workers import bls


def load(name: str, config: str = "", files: dict[str, bytes] | None = None) -> None:
    """Load (or reload) ``name``; ``files`` maps "file:<path>" to the file's bytes and needs
    ``config``. Raises BlsError."""
    _not_itself(name, "load")
    _call(ModelControl("load", name, config=config, files=dict(files or {})))


def unload(name: str, dependents: bool = False) -> None:
    """Unload ``name``. Raises BlsError."""
    _not_itself(name, "unload")
    _call(ModelControl("unload", name, dependents=dependents))


def ready(name: str, version: str = "") -> bool:
    """Whether ``name`` (``version``, or its latest) is ready. Raises BlsError."""
    return bool(_call(ModelControl("ready", name, version=version)).get("ready"))


def _not_itself(name: str, action: str) -> None:
    if name == bls.client().model_name:
        raise bls.BlsError("INVALID_ARGUMENT",
                           f"model '{name}' cannot {action} itself: the call would wait for "
                           f"its own instance to be unloaded")


def _call(control: ModelControl) -> dict[str, object]:
    channel = bls.client().channel()
    try:
        return channel.call(control.message())
    except ShmserveError as exc:
        raise bls.BlsError(exc.code.name, exc.message) from None
    except MessageTooLarge as exc:  # model files travel in the channel's ring
        raise bls.BlsError("INVALID_ARGUMENT", f"the model files for '{control.name}' are too "
                                               f"large to load this way: {exc}") from None
