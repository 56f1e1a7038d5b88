"""The built-in ``python`` backend: runs Triton python-backend ``model.py`` files unmodified.

One worker process hosts one model instance, so one ``PythonBackend`` runs one
``TritonPythonModel`` object:

* ``model_initialize`` imports ``<version>/<default_model_filename or model.py>`` under a unique
  package name (relative imports from the version folder work, as in Triton), after registering
  :mod:`.triton_python_backend_utils` as ``triton_python_backend_utils`` in ``sys.modules``.
* ``instance_initialize`` builds ``TritonPythonModel()`` and calls ``initialize(args)`` with
  Triton's string-valued ``args``.
* ``execute`` wraps each request's arrays in ``pb_utils.Tensor`` objects without copying them,
  calls the model, and turns each ``InferenceResponse`` into a :class:`Response`. It never raises.
* ``instance_finalize`` / ``model_finalize`` call ``finalize()`` once and forget the module.

:func:`auto_complete_config` runs a model's static ``auto_complete_config`` for the supervisor.
"""

from __future__ import annotations

import asyncio
import importlib.machinery
import importlib.util
import inspect
import itertools
import json
import logging
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from shmserve.workers.backend import (
    Backend,
    BackendError,
    InstanceSpec,
    ModelSpec,
    Request,
    Response,
)

from . import custom_metrics
from . import triton_python_backend_utils as pb_utils
from .output_check import OutputChecker

__all__ = ["PythonBackend", "auto_complete_config", "install_pb_utils", "pb_utils",
           "visible_device_id"]

_log = logging.getLogger(__name__)

PB_UTILS_MODULE = "triton_python_backend_utils"
DEFAULT_MODEL_FILENAME = "model.py"
MODEL_CLASS = "TritonPythonModel"

_package_counter = itertools.count()

_pb_request = pb_utils.InferenceRequest._from_backend
_InferenceResponse = pb_utils.InferenceResponse
_ndarray = np.ndarray
_PLACEHOLDER = pb_utils.InferenceResponse()  # in a rescheduled request's place: never read
_RESCHEDULED = Response(rescheduled=True)


def install_pb_utils() -> None:
    """Make ``import triton_python_backend_utils`` give user code our module."""
    if sys.modules.get(PB_UTILS_MODULE) is not pb_utils:
        sys.modules[PB_UTILS_MODULE] = pb_utils


def model_file_path(model: ModelSpec) -> Path:
    filename = model.config.get("default_model_filename") or DEFAULT_MODEL_FILENAME
    return Path(model.version_path) / filename


def visible_device_id(instance: InstanceSpec) -> int:
    """The instance's GPU as this process numbers it.

    Model code does ``torch.device(f"cuda:{args['model_instance_device_id']}")``. Triton's stub
    sees every GPU, so the host id works there; a shmserve worker is pinned with
    ``CUDA_VISIBLE_DEVICES`` first, so the host id is translated to its index in that list.
    """
    if instance.kind != "KIND_GPU":
        return instance.device_id
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return instance.device_id
    entries = [entry.strip() for entry in visible.split(",") if entry.strip()]
    if str(instance.device_id) in entries:
        return entries.index(str(instance.device_id))
    if len(entries) == 1:                       # pinned by UUID or MIG id: the only device
        return 0
    return instance.device_id


def _exception_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _error_code(exc: BaseException, default: str = "INTERNAL") -> str:
    if isinstance(exc, pb_utils.TritonError):
        return pb_utils.grpc_code_name(exc.code())
    if isinstance(exc, BackendError):
        return str(exc.code)
    return default


def _identifier(text: str) -> str:
    return re.sub(r"\W", "_", text)


class _ImportedModel:
    """A model file imported as ``<unique package>.<stem>``; the package's path is its folder."""

    def __init__(self, path: Path, model_name: str) -> None:
        install_pb_utils()
        self.package = f"_shmserve_pymodel_{next(_package_counter)}_{_identifier(model_name)}"
        package_spec = importlib.machinery.ModuleSpec(self.package, None, is_package=True)
        package_spec.submodule_search_locations = [str(path.parent)]
        sys.modules[self.package] = importlib.util.module_from_spec(package_spec)
        module_name = f"{self.package}.{_identifier(path.stem)}"
        loader = importlib.machinery.SourceFileLoader(module_name, str(path))
        spec = importlib.util.spec_from_file_location(module_name, path, loader=loader)
        assert spec is not None
        self.module: ModuleType = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = self.module
        try:
            loader.exec_module(self.module)
        except (Exception, SystemExit) as exc:
            self.forget()
            # The supervisor logs the load failure once, with this reason; the traceback
            # is for --log-verbose.
            _log.debug("importing model file %s failed", path, exc_info=True)
            raise BackendError(
                f"failed to import model file '{path}': {_exception_text(exc)}") from exc
        model_class = getattr(self.module, MODEL_CLASS, None)
        if not isinstance(model_class, type):
            self.forget()
            raise BackendError(f"model file '{path}' does not define class '{MODEL_CLASS}'",
                               "INVALID_ARGUMENT")
        self.model_class: type = model_class

    def forget(self) -> None:
        """Drop the package and everything imported under it from ``sys.modules``."""
        prefix = self.package + "."
        for name in [n for n in sys.modules if n == self.package or n.startswith(prefix)]:
            del sys.modules[name]


def _sys_path_entries(model_file: Path) -> list[str]:
    """Triton appends the version folder and the model folder to ``sys.path``."""
    version_dir = model_file.parent
    return [str(version_dir), str(version_dir.parent)]


def _append_sys_path(entries: list[str]) -> list[str]:
    added = [entry for entry in entries if entry not in sys.path]
    sys.path.extend(added)
    return added


def _remove_sys_path(entries: list[str]) -> None:
    for entry in entries:
        if entry in sys.path:
            sys.path.remove(entry)


@contextmanager
def _temporary_sys_path(entries: list[str]) -> Iterator[None]:
    added = _append_sys_path(entries)
    try:
        yield
    finally:
        _remove_sys_path(added)


def auto_complete_config(config: dict[str, Any], model_file: str) -> dict[str, Any]:
    """Run the model's static ``auto_complete_config`` on a copy of ``config``; return the result.

    ``config`` is Triton's model_config JSON as a dict. A model without the hook gets its config
    back unchanged (a copy). Failures are :class:`BackendError`. Import the model here only in a
    process that may run user code (a worker, or a throwaway child): model files import torch.
    """
    path = Path(model_file)
    if not path.is_file():
        raise BackendError(f"unable to find model file '{path}'", "NOT_FOUND")
    model_name = str(config.get("name") or path.parent.parent.name)
    with _temporary_sys_path(_sys_path_entries(path)):
        imported = _ImportedModel(path, model_name)
        try:
            hook = getattr(imported.model_class, "auto_complete_config", None)
            if hook is None:
                result: dict[str, Any] = json.loads(json.dumps(config))
                return result
            model_config = pb_utils.ModelConfig(config)
            try:
                returned = hook(model_config)
            except Exception as exc:
                _log.debug("auto_complete_config of model '%s' failed", model_name,
                           exc_info=True)
                raise BackendError(f"auto_complete_config of model '{model_name}' failed: "
                                   f"{_exception_text(exc)}", _error_code(exc)) from exc
            if returned is None:
                return model_config.as_dict()
            if not isinstance(returned, pb_utils.ModelConfig):
                raise BackendError(
                    f"auto_complete_config of model '{model_name}' returned a "
                    f"{type(returned).__name__}; it must return the auto_complete_model_config "
                    "object it was given")
            return returned.as_dict()
        finally:
            imported.forget()


class PythonBackend(Backend):
    """Hosts one ``TritonPythonModel`` instance."""

    def __init__(self) -> None:
        self._model: ModelSpec | None = None
        self._imported: _ImportedModel | None = None
        self._added_sys_path: list[str] = []
        self._instance: InstanceSpec | None = None
        self._model_object: Any = None
        self._default_outputs: list[str] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._force_cpu_inputs = True
        self._decoupled = False
        self._output_checker: OutputChecker | None = None
        self._state_outputs: frozenset[str] = frozenset()

    # -- lifecycle ----------------------------------------------------------------------------

    def model_initialize(self, model: ModelSpec) -> None:
        path = model_file_path(model)
        if not path.is_file():
            raise BackendError(f"unable to find model file '{path}' for model '{model.name}' "
                               f"version {model.version}", "NOT_FOUND")
        self._decoupled = pb_utils.using_decoupled_model_transaction_policy(model.config)
        self._added_sys_path = _append_sys_path(_sys_path_entries(path))
        try:
            self._imported = _ImportedModel(path, model.name)
        except BaseException:
            _remove_sys_path(self._added_sys_path)
            self._added_sys_path = []
            raise
        self._model = model
        self._default_outputs = [str(out["name"]) for out in model.config.get("output", [])
                                 if "name" in out]
        self._force_cpu_inputs = _force_cpu_only_inputs(model.config)
        self._output_checker = OutputChecker(model.config, str(path))
        self._state_outputs = frozenset(
            str(state.get("output_name", ""))
            for state in (model.config.get("sequence_batching") or {}).get("state", []) or [])

    def instance_initialize(self, model: ModelSpec, instance: InstanceSpec) -> None:
        if self._imported is None:
            raise BackendError("instance_initialize called before model_initialize")
        self._instance = instance
        args = {
            "model_config": json.dumps(model.config),
            "model_instance_kind": instance.kind.removeprefix("KIND_"),
            "model_instance_name": instance.name,
            "model_instance_device_id": str(visible_device_id(instance)),
            "model_repository": model.repository_path,
            "model_version": str(model.version),
            "model_name": model.name,
        }
        try:
            model_object = self._imported.model_class()
            initialize = getattr(model_object, "initialize", None)
            if initialize is not None:
                result = initialize(args)
                if inspect.isawaitable(result):
                    self._event_loop().run_until_complete(result)
        except Exception as exc:
            _log.debug("initialize of model instance '%s' failed", instance.name,
                       exc_info=True)
            raise BackendError(
                f"failed to initialize model instance '{instance.name}' of model "
                f"'{model.name}': {_exception_text(exc)}", _error_code(exc)) from exc
        self._model_object = model_object
        # Triton's async execute: the worker runs several executions at once on its loop.
        # A decoupled model answers through senders, one execution at a time.
        self.concurrent = not self._decoupled and inspect.iscoroutinefunction(
            getattr(model_object, "execute", None))

    def instance_finalize(self) -> None:
        model_object, self._model_object = self._model_object, None
        finalize = getattr(model_object, "finalize", None) if model_object is not None else None
        if finalize is not None:
            try:
                result = finalize()
                if inspect.isawaitable(result):
                    self._event_loop().run_until_complete(result)
            except Exception:
                _log.exception("finalize of model instance '%s' failed", self._label())
        if self._loop is not None:
            self._loop.close()
            self._loop = None

    def model_readiness(self) -> bool | None:
        """Triton's optional ``is_ready()``: an exception or a non-bool answer is not ready."""
        model_object = self._model_object
        is_ready = getattr(model_object, "is_ready", None) if model_object is not None else None
        if is_ready is None:
            return None
        try:
            answer = is_ready()
        except Exception as exc:
            _log.error("is_ready() of model instance '%s' raised %s; reporting not ready",
                       self._label(), _exception_text(exc))
            return False
        if not isinstance(answer, bool):
            _log.error("is_ready() of model instance '%s' returned %s, not a bool; reporting "
                       "not ready", self._label(), type(answer).__name__)
            return False
        return answer

    def custom_metrics(self) -> tuple[int, list[Any]]:
        return custom_metrics.generation, (custom_metrics.snapshot()
                                           if custom_metrics.generation else [])

    def model_finalize(self) -> None:
        if self._model_object is not None:
            self.instance_finalize()
        if self._imported is not None:
            self._imported.forget()
            self._imported = None
        _remove_sys_path(self._added_sys_path)
        self._added_sys_path = []

    # -- execute ------------------------------------------------------------------------------

    def execute(self, requests: list[Request]) -> list[Response]:
        try:
            return self._execute(requests)
        except Exception as exc:   # never raise out of execute
            return self._failed(requests, exc)

    async def execute_async(self, requests: list[Request]) -> list[Response]:
        """``async def execute``, awaited on the worker's loop beside other executions."""
        try:
            model_object = self._model_object
            if self._model is None or model_object is None:
                return self._not_initialized(requests)
            pb_requests = self._pb_requests(requests)
            try:
                result = model_object.execute(pb_requests)
                if type(result) is not list and inspect.isawaitable(result):
                    result = await result
            except Exception as exc:
                return self._raised(requests, exc)
            return self._responses(requests, result, pb_requests)
        except Exception as exc:   # never raise out of execute
            return self._failed(requests, exc)

    def _execute(self, requests: list[Request]) -> list[Response]:
        model_object = self._model_object
        if self._model is None or model_object is None:
            return self._not_initialized(requests)
        pb_requests = self._pb_requests(requests)
        if self._decoupled:
            return self._execute_decoupled(model_object, requests, pb_requests)
        try:
            result = model_object.execute(pb_requests)
            if type(result) is not list and inspect.isawaitable(result):
                result = self._event_loop().run_until_complete(result)
        except Exception as exc:
            return self._raised(requests, exc)
        if result is None:
            result = self._sent_responses(pb_requests)
        return self._responses(requests, result, pb_requests)

    def _not_initialized(self, requests: list[Request]) -> list[Response]:
        return self._fail_all(requests, BackendError(
            f"model instance '{self._label()}' is not initialized", "UNAVAILABLE"))

    def _failed(self, requests: list[Request], exc: Exception) -> list[Response]:
        _log.exception("python backend failed on a batch for '%s'", self._label())
        return self._fail_all(requests, BackendError(
            f"python backend failed to process the request(s) for model instance "
            f"'{self._label()}': {_exception_text(exc)}"))

    def _raised(self, requests: list[Request], exc: Exception) -> list[Response]:
        _log.exception("execute of model instance '%s' raised", self._label())
        return self._fail_all(requests, BackendError(
            f"Failed to process the request(s) for model instance '{self._label()}', "
            f"message: {_exception_text(exc)}", _error_code(exc)))

    def _pb_requests(self, requests: list[Request]) -> list[pb_utils.InferenceRequest]:
        model = self._model
        assert model is not None
        name, version = model.name, model.version
        force_cpu, default_outputs = self._force_cpu_inputs, self._default_outputs
        pb_requests: list[pb_utils.InferenceRequest] = []
        for request in requests:
            inputs = request.inputs
            if force_cpu:
                inputs = _cpu_inputs(inputs)
            pb_requests.append(_pb_request(
                request.request_id, request.correlation_id, inputs,
                # A copy: the model may change the list it is given.
                list(request.requested_outputs or default_outputs),
                request.parameters, name, version))
        return pb_requests

    def _responses(self, requests: list[Request], result: Any,
                   pb_requests: list[pb_utils.InferenceRequest]) -> list[Response]:
        rescheduled = [pb_request._rescheduled() for pb_request in pb_requests]
        if any(rescheduled) and isinstance(result, list) and len(result) == len(requests):
            # A rescheduled request's place holds None (or a response nobody reads).
            result = [_PLACEHOLDER if again else response
                      for response, again in zip(result, rescheduled, strict=True)]
        problem = self._check_result(result, len(requests))
        if problem is not None:
            _log.error("%s", problem)
            return self._fail_all(requests, BackendError(problem))
        to_response = self._to_response
        responses: list[Response] = []
        for request, pb_response, again in zip(requests, result, rescheduled, strict=True):
            responses.append(_RESCHEDULED if again else to_response(request, pb_response))
        return responses

    def _sent_responses(self, pb_requests: list[pb_utils.InferenceRequest]) -> Any:
        """A non-decoupled model that answered through response senders (execute returned
        None): each request's one response, once its final flag was sent (perhaps from a
        thread of the model's). None if execute used no sender at all."""
        if all(pb_request._sender is None for pb_request in pb_requests):
            return None  # reported by _check_result
        responses: list[pb_utils.InferenceResponse] = []
        for pb_request in pb_requests:
            if pb_request._rescheduled():
                responses.append(_PLACEHOLDER)  # it sends nothing this time
                continue
            response = pb_request.get_response_sender()._wait_final()
            if response is None:
                return None
            responses.append(response)
        return responses

    def _execute_decoupled(self, model_object: Any, requests: list[Request],
                           pb_requests: list[pb_utils.InferenceRequest]) -> list[Response]:
        """Each request answers through its sender (Request.sink), from any thread and even
        after execute returned; execute's own result is ignored (Triton wants None). If
        execute raises, every request not closed yet gets the error as its final response."""
        to_response = self._to_response
        senders = []
        for request, pb_request in zip(requests, pb_requests, strict=True):
            sink = request.sink
            if sink is None:
                raise BackendError("decoupled request without a response sink")

            def deliver(response: pb_utils.InferenceResponse | None, final: bool,
                        request: Request = request, sink: Any = sink) -> None:
                sink.send(None if response is None else to_response(request, response), final)

            sender = pb_utils.InferenceResponseSender(deliver, True, sink.is_cancelled)
            pb_request._sender = sender
            senders.append(sender)
        try:
            result = model_object.execute(pb_requests)
            if inspect.isawaitable(result):
                self._event_loop().run_until_complete(result)
        except Exception as exc:
            _log.exception("execute of model instance '%s' raised", self._label())
            error = pb_utils.TritonError(
                f"Failed to process the request(s) for model instance '{self._label()}', "
                f"message: {_exception_text(exc)}")
            for sender in senders:
                if not sender._closed:
                    sender.send(pb_utils.InferenceResponse(error=error),
                                pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return [_RESCHEDULED if pb_request._rescheduled() else Response(streamed=True)
                for pb_request in pb_requests]

    def _check_result(self, result: Any, expected: int) -> str | None:
        if isinstance(result, list) and len(result) == expected:
            for item in result:
                if not isinstance(item, _InferenceResponse):
                    break
            else:
                return None
        where = f"execute() of model instance '{self._label()}'"
        if not isinstance(result, list):
            return (f"{where} must return a list of pb_utils.InferenceResponse, got "
                    f"{type(result).__name__}")
        if len(result) != expected:
            return (f"{where}: number of InferenceResponse objects do not match the number of "
                    f"InferenceRequest objects. InferenceRequest(s) size is:{expected}, and "
                    f"InferenceResponse(s) size is:{len(result)}")
        for index, item in enumerate(result):
            if not isinstance(item, pb_utils.InferenceResponse):
                return (f"{where} returned a {type(item).__name__} at index {index}; expected "
                        "pb_utils.InferenceResponse")
        return None

    def _to_response(self, request: Request,
                     pb_response: pb_utils.InferenceResponse) -> Response:
        error = pb_response._error
        if error is not None:
            return Response(error=BackendError(error.message(),
                                               pb_utils.grpc_code_name(error.code())))
        wanted = request.requested_outputs
        outputs: dict[str, Any] = {}
        checker = self._output_checker
        try:
            for tensor in pb_response._output_tensors:
                name = tensor._name
                if checker is not None:
                    problem = checker.problem(name, tensor._data)
                    if problem is not None:
                        _log.error("%s", problem)
                        return Response(error=BackendError(problem, "INTERNAL"))
                if wanted and name not in wanted and name not in self._state_outputs:
                    continue  # (the worker keeps a state output as the sequence's state)
                data = tensor._data
                # Only str/bytes-typed NumPy arrays need converting.
                outputs[name] = (_output_value(data) if type(data) is not _ndarray
                                 or data.dtype.kind in "SU" else data)
        except Exception as exc:
            return Response(error=BackendError(
                f"model instance '{self._label()}' produced an unusable output: "
                f"{_exception_text(exc)}"))
        return Response(outputs)

    # -- helpers ------------------------------------------------------------------------------

    @staticmethod
    def _fail_all(requests: list[Request], error: BackendError) -> list[Response]:
        return [Response(error=error) for _ in requests]

    def _label(self) -> str:
        if self._instance is not None:
            return self._instance.name
        return self._model.name if self._model is not None else "<unloaded>"

    def _event_loop(self) -> asyncio.AbstractEventLoop:
        """The loop that runs ``async def execute`` models (one per instance)."""
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
        return self._loop


def _force_cpu_only_inputs(config: dict[str, Any]) -> bool:
    """Triton's FORCE_CPU_ONLY_INPUT_TENSORS parameter: "yes" (default) or "no"."""
    value = (config.get("parameters") or {}).get("FORCE_CPU_ONLY_INPUT_TENSORS") or {}
    text = value.get("string_value", "") if isinstance(value, dict) else str(value)
    return text.strip().lower() not in ("no", "false", "off", "0")


def _cpu_inputs(inputs: dict[str, Any]) -> dict[str, Any]:
    """Inputs in GPU memory (torch tensors over CUDA regions) as NumPy: one device-to-host copy.

    With FORCE_CPU_ONLY_INPUT_TENSORS "no" the model gets them as they are and uses
    ``pb_utils.Tensor.to_dlpack`` / ``is_cpu``.
    """
    for value in inputs.values():
        if not isinstance(value, np.ndarray):
            break
    else:
        return inputs
    from shmserve.workers.cuda_ipc import host_array
    return {name: value if isinstance(value, np.ndarray) else host_array(value)
            for name, value in inputs.items()}


def _output_value(data: Any) -> Any:
    """Outputs go out as they are, except str/bytes-typed arrays become object arrays of bytes."""
    if not isinstance(data, np.ndarray) or data.dtype.kind not in "SU":
        return data
    out = np.empty(data.shape, dtype=np.object_)
    flat = out.reshape(-1)
    for index, item in enumerate(data.reshape(-1).tolist()):
        flat[index] = item.encode("utf-8") if isinstance(item, str) else bytes(item)
    return out
