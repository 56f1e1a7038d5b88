"""The backend API: Triton's seven-hook lifecycle as Python.

A worker process hosts exactly one model instance. It calls, in order:

    backend_initialize() -> model_initialize(model) -> instance_initialize(instance)
    -> execute(requests)* -> instance_finalize() -> model_finalize() -> backend_finalize()

``execute`` is never called concurrently within a worker; instances run in parallel in their own
processes. A backend raises :class:`BackendError` (or any exception) from an initialize hook to
fail the load, and returns one :class:`Response` per request from ``execute`` -- a response with
``error`` set fails only that request. For a decoupled model each request carries a ``sink``
and the backend answers through it (any number of responses, the last one final), returning
``Response(streamed=True)`` for it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, Protocol

ENTRY_POINT_GROUP = "shmserve.backends"


#: The logger model code logs through (pb_utils.Logger); the worker gives it its own format.
MODEL_LOGGER = "shmserve.model"


class BackendError(Exception):
    """An error a backend reports; ``code`` is a gRPC status code name such as INVALID_ARGUMENT."""

    def __init__(self, message: str, code: str = "INTERNAL") -> None:
        super().__init__(message)
        self.message = message
        self.code = code


class BackendNotFound(BackendError):
    pass


@dataclass(slots=True)
class ModelSpec:
    """What a backend knows about the model it serves."""

    name: str
    version: int
    config: dict[str, Any]        # ModelConfig as JSON-like dict (Triton's model_config JSON)
    repository_path: str          # the model directory, e.g. /models/simple
    version_path: str             # e.g. /models/simple/1


@dataclass(slots=True)
class InstanceSpec:
    name: str                     # e.g. "simple_0_0"
    kind: str                     # "KIND_CPU" | "KIND_GPU" | "KIND_MODEL"
    device_id: int                # GPU id as the host numbers it (0 for CPU instances)
    index: int                    # instance number within the model


class ResponseSink(Protocol):
    """Where a decoupled model's responses for one request go (any thread, any time until
    the final one): ``send(None, True)`` only closes the request."""

    def send(self, response: Response | None, final: bool) -> None: ...

    def is_cancelled(self) -> bool: ...


@dataclass(slots=True)
class Request:
    """One inference request as a backend sees it.

    ``inputs`` are NumPy arrays; for tensors in shared memory they are views of that memory
    (no copy). BYTES tensors are object arrays of ``bytes``. Inputs from CUDA regions are torch
    CUDA tensors.
    """

    request_id: str
    inputs: dict[str, Any]
    requested_outputs: list[str]
    parameters: dict[str, Any] = field(default_factory=dict)
    correlation_id: int | str = 0
    sink: ResponseSink | None = None  # set for decoupled models: responses go there
    # Only for a backend with ``wants_output_buffers``: output name -> the writable memory of
    # the client's shared-memory region the output was asked into (its full capacity). A
    # backend that writes the output there and returns an array over that memory saves the
    # worker's copy.
    output_buffers: dict[str, memoryview] | None = None
    # Only for a backend with ``wants_output_buffers``: ``allocate_output(nbytes)`` lends
    # writable memory in the worker's output arena for an output of that size (None: none to
    # lend, e.g. for a small output that travels inline). An output returned as an array over
    # it is sent from there without a copy. Valid until execute returns the responses.
    allocate_output: Callable[[int], memoryview | None] | None = None


@dataclass(slots=True)
class Response:
    outputs: dict[str, Any] = field(default_factory=dict)   # name -> np.ndarray (or torch tensor)
    error: BackendError | None = None
    # The request is answered through its sink (decoupled), not by this response.
    streamed: bool = False
    # The model released the request for another execution (Triton's
    # TRITONSERVER_REQUEST_RELEASE_RESCHEDULE): no answer now; the sequence batcher of an
    # iterative_sequence model runs it again.
    rescheduled: bool = False


class Backend:
    """Base class for backends. Subclasses override the hooks they need."""

    def backend_initialize(self, backend_config: dict[str, Any]) -> None:
        """Once per process, before any model hook."""

    def model_initialize(self, model: ModelSpec) -> None:
        """Load what is shared by the model's instances (weights, tokenizers)."""

    def instance_initialize(self, model: ModelSpec, instance: InstanceSpec) -> None:
        """Prepare the one instance this process runs (device placement, buffers)."""

    def execute(self, requests: list[Request]) -> list[Response]:
        raise NotImplementedError

    #: True when the worker should fill ``Request.output_buffers`` (read after the initialize
    #: hooks); mapping the destinations costs a little per request, so backends opt in.
    wants_output_buffers = False

    #: True when ``execute_async`` should be used: the worker then runs several executions
    #: at once on one asyncio loop (Triton's ``async def execute``). Read after the
    #: initialize hooks.
    concurrent = False

    async def execute_async(self, requests: list[Request]) -> list[Response]:
        """The concurrent form of ``execute``: awaited on the worker's loop, several at once."""
        return self.execute(requests)

    def instance_finalize(self) -> None:
        """Release what instance_initialize took."""

    def model_readiness(self) -> bool | None:
        """The model's own readiness (Triton's optional ``is_ready()``), None when it has none.
        Called from the worker's reporter thread, concurrently with execute."""
        return None

    def custom_metrics(self) -> tuple[int, list[Any]]:
        """(generation, families) of the model's custom metrics (see protocol ``Report``);
        the generation changes whenever a value does. Called from the reporter thread."""
        return 0, []

    def model_finalize(self) -> None:
        """Release what model_initialize took."""

    def backend_finalize(self) -> None:
        """Last hook before the process exits."""


def resolve_backend(name: str) -> type[Backend]:
    """Find a backend class by entry point name or ``module:Class`` import string.

    "No such backend" and "the backend failed to import" are different errors.
    """
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and module_name.startswith(exc.name):
                raise BackendNotFound(f"unable to find backend '{name}'", "NOT_FOUND") from exc
            raise BackendError(f"backend '{name}' failed to import: {exc}") from exc
        except Exception as exc:
            raise BackendError(f"backend '{name}' failed to import: {exc}") from exc
        return _as_backend_class(name, getattr(module, attr, None))
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == name:
            try:
                return _as_backend_class(name, ep.load())
            except BackendError:
                raise
            except Exception as exc:
                raise BackendError(f"backend '{name}' failed to import: {exc}") from exc
    raise BackendNotFound(f"unable to find backend '{name}'", "NOT_FOUND")


def _as_backend_class(name: str, obj: object) -> type[Backend]:
    if not (isinstance(obj, type) and issubclass(obj, Backend)):
        raise BackendError(f"backend '{name}' does not name a shmserve Backend class")
    return obj

