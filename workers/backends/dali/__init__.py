"""The ``dali`` backend: NVIDIA DALI pre-processing pipelines, as Triton's DALI backend runs them.

A model selects it with ``backend: "dali"``. Its version folder holds ``model.dali`` (a
serialized pipeline, ``Pipeline.serialize``) or a Python file with one ``@autoserialize``
pipeline definition (``dali.py``, or ``default_model_filename`` ending in ``.py``): see
model_file.py. Each worker hosts one instance:

* ``model_initialize`` imports DALI (the optional extra ``shmserve[dali]``; a missing package
  fails the load naming it), finds and serializes the pipeline, reads its external sources and
  outputs (pipeline_def.py) and checks the config against them (config_check.py).
* ``instance_initialize`` builds the pipeline on the instance's device: ``KIND_CPU`` runs it
  without a GPU (its device id rewritten to DALI's CPU-only id, so a pipeline with GPU operators
  fails to load with DALI's message); ``KIND_GPU`` on the worker's GPU (``cuda:0`` there).
  The pipeline's batch size is the config's ``max_batch_size`` when that is set.
* ``execute`` feeds every external source from the request tensor of the same name: the first
  dimension counts samples (also with ``max_batch_size: 0``, as in Triton). The requests of a
  dynamic batch are fed as one DALI batch (their samples in order; shapes may differ between
  requests), run once, and the outputs split back per request; a batch with more samples than
  the pipeline's batch size runs in several passes. Outputs come back as NumPy arrays (GPU
  outputs copied to the host once). A failed run rebuilds the pipeline (DALI leaves a pipeline
  that raised unusable) and fails only that batch's requests.

Parameters honoured (config.pbtxt ``parameters``): ``num_threads``.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shmserve.protos.datatypes import CONFIG_TO_V2, from_numpy_dtype, to_numpy_dtype
from shmserve.workers.backend import (
    Backend,
    BackendError,
    InstanceSpec,
    ModelSpec,
    Request,
    Response,
)
from shmserve.workers.backends.dali.config_check import validate_config
from shmserve.workers.backends.dali.model_file import (
    DALI_EXTRA_HINT,
    import_dali,
    load_pipeline,
)
from shmserve.workers.backends.dali.pipeline_def import (
    CPU_ONLY_DEVICE_ID,
    PipelineInfo,
    read_pipeline,
    with_device,
)

__all__ = ["DALI_EXTRA_HINT", "DaliBackend"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class _Output:
    name: str               # the config's name (outputs are matched to the pipeline by position)
    dtype: np.dtype


def _parameter(config: dict[str, Any], key: str) -> str | None:
    value = (config.get("parameters") or {}).get(key)
    if isinstance(value, dict):
        value = value.get("string_value")
    return None if value is None else str(value).strip()


def _positive(config: dict[str, Any], key: str, model: str) -> int | None:
    value = _parameter(config, key)
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise BackendError(f"model '{model}': parameter {key} must be a positive integer, got "
                           f"'{value}'", "INVALID_ARGUMENT")
    return int(value)


class DaliBackend(Backend):
    """Hosts one DALI pipeline instance."""

    def __init__(self) -> None:
        self._model: ModelSpec | None = None
        self._instance: InstanceSpec | None = None
        self._serialized = b""
        self._info: PipelineInfo | None = None
        self._outputs: list[_Output] = []
        self._batch_size = 0
        self._num_threads: int | None = None
        self._device_id: int | None = None
        self._pipeline: Any = None

    # -- lifecycle ----------------------------------------------------------------------------

    def model_initialize(self, model: ModelSpec) -> None:
        import_dali()
        config = model.config
        self._model = model
        self._num_threads = _positive(config, "num_threads", model.name)
        # The pipeline is serialized for the CPU here; instance_initialize sets the device.
        loaded = load_pipeline(model.name, Path(model.version_path),
                               config.get("default_model_filename") or None, device_id=None)
        self._serialized = loaded.serialized
        self._info = read_pipeline(loaded.serialized)
        validate_config(config, self._info)
        self._outputs = [_Output(str(entry["name"]), self._numpy_dtype(entry))
                         for entry in config.get("output") or []]
        configured = int(config.get("max_batch_size") or 0)
        self._batch_size = configured if configured > 0 else self._info.max_batch_size
        log.info("model '%s': DALI pipeline from %s (%d input(s), %d output(s))", model.name,
                 loaded.path, len(self._info.inputs), len(self._info.outputs))

    def _numpy_dtype(self, entry: dict[str, Any]) -> np.dtype:
        datatype = CONFIG_TO_V2.get(str(entry.get("data_type")), "")
        try:
            return to_numpy_dtype(datatype)
        except (KeyError, ValueError):
            raise BackendError(f"model '{self._label()}': output '{entry.get('name')}' has "
                               f"data type {entry.get('data_type')}, which DALI cannot produce",
                               "INVALID_ARGUMENT") from None

    def instance_initialize(self, model: ModelSpec, instance: InstanceSpec) -> None:
        if self._info is None:
            raise BackendError("instance_initialize called before model_initialize")
        self._instance = instance
        if instance.kind == "KIND_GPU":
            from shmserve.workers.cuda_ipc import local_ordinal
            ordinal = local_ordinal(instance.device_id)
            if ordinal is None:
                raise BackendError(f"instance '{instance.name}': GPU {instance.device_id} is "
                                   f"not visible to this worker", "UNAVAILABLE")
            self._device_id = ordinal
        else:                                       # KIND_CPU, KIND_MODEL: no GPU
            self._device_id = None
        self._pipeline = self._build()
        log.info("model '%s' instance '%s': DALI pipeline built on %s, batch size %d",
                 model.name, instance.name,
                 "the CPU" if self._device_id is None else f"GPU {self._device_id}",
                 self._batch_size)

    def _build(self) -> Any:
        from nvidia.dali.pipeline import Pipeline
        device = CPU_ONLY_DEVICE_ID if self._device_id is None else self._device_id
        options: dict[str, Any] = {"device_id": self._device_id}
        if self._batch_size > 0:
            options["batch_size"] = self._batch_size
        if self._num_threads is not None:
            options["num_threads"] = self._num_threads
        try:
            return Pipeline.deserialize(serialized_pipeline=with_device(self._serialized, device),
                                        **options)
        except Exception as exc:
            raise BackendError(f"unable to load model '{self._label()}': DALI could not build "
                               f"the pipeline: {_dali_message(exc)}", "INVALID_ARGUMENT") from exc

    def instance_finalize(self) -> None:
        self._pipeline = None

    def model_finalize(self) -> None:
        self._model = None

    # -- execute ------------------------------------------------------------------------------

    def execute(self, requests: list[Request]) -> list[Response]:
        if self._pipeline is None or self._info is None:
            error = BackendError(f"model instance '{self._label()}' is not initialized",
                                 "UNAVAILABLE")
            return [Response(error=error) for _ in requests]
        responses: list[Response] = []
        runnable: list[tuple[int, Request]] = []
        for index, request in enumerate(requests):
            problem = self._check_request(request)
            responses.append(Response(error=problem))
            if problem is None:
                runnable.append((index, request))
        for group in self._passes([request for _, request in runnable]):
            batch = [runnable[position] for position in group]
            answers = self._run([request for _, request in batch])
            for (index, _), response in zip(batch, answers, strict=True):
                responses[index] = response
        return responses

    def _check_request(self, request: Request) -> BackendError | None:
        assert self._info is not None
        expected = [tensor.name for tensor in self._info.inputs]
        for name in request.inputs:
            if name not in expected:
                return BackendError(f"unexpected inference input '{name}' for model "
                                    f"'{self._label()}'", "INVALID_ARGUMENT")
        if len(request.inputs) != len(expected):
            return BackendError(f"expected {len(expected)} inputs but got "
                                f"{len(request.inputs)} inputs for model '{self._label()}'",
                                "INVALID_ARGUMENT")
        counts = set()
        for name in expected:
            value = request.inputs[name]
            if not isinstance(value, np.ndarray):
                return BackendError(f"input '{name}' of model '{self._label()}' must be in CPU "
                                    f"memory (the dali backend feeds host tensors)",
                                    "INVALID_ARGUMENT")
            if value.ndim == 0:
                return BackendError(f"input '{name}' of model '{self._label()}' has no sample "
                                    f"dimension", "INVALID_ARGUMENT")
            counts.add(int(value.shape[0]))
        if len(counts) > 1:
            return BackendError(f"inputs of model '{self._label()}' have different numbers of "
                                f"samples: {sorted(counts)}", "INVALID_ARGUMENT")
        samples = counts.pop() if counts else 0
        if not 0 < samples <= self._batch_size:
            return BackendError(f"a request to model '{self._label()}' has {samples} samples; "
                                f"its DALI pipeline takes 1 to {self._batch_size}",
                                "INVALID_ARGUMENT")
        return None

    def _passes(self, requests: list[Request]) -> list[list[int]]:
        """Consecutive groups of requests whose samples fit one pipeline batch."""
        groups: list[list[int]] = []
        total = 0
        for index, request in enumerate(requests):
            samples = _samples(request)
            if groups and total + samples <= self._batch_size:
                groups[-1].append(index)
                total += samples
            else:
                groups.append([index])
                total = samples
        return groups

    def _run(self, requests: list[Request]) -> list[Response]:
        assert self._info is not None
        sizes = [_samples(request) for request in requests]
        try:
            for tensor in self._info.inputs:
                self._pipeline.feed_input(tensor.name, _batch(requests, tensor.name))
            outputs = self._pipeline.run()
            split = [self._split(index, output, sizes) for index, output in enumerate(outputs)]
        except BackendError as exc:
            return [Response(error=exc) for _ in requests]
        except Exception as exc:
            error = BackendError(f"DALI execute failure for model '{self._label()}': "
                                 f"{_dali_message(exc)}")
            log.warning("%s (%d request(s); the pipeline is rebuilt)", error.message,
                        len(requests))
            self._rebuild()
            return [Response(error=error) for _ in requests]
        return [Response(outputs={output.name: parts[index]
                                  for output, parts in zip(self._outputs, split, strict=True)})
                for index in range(len(requests))]

    def _rebuild(self) -> None:
        try:
            self._pipeline = self._build()
        except BackendError as exc:
            log.error("model '%s': rebuilding the DALI pipeline failed: %s", self._label(),
                      exc.message)
            self._pipeline = None

    def _split(self, index: int, output: Any, sizes: list[int]) -> list[np.ndarray]:
        """One pipeline output cut back into the requests' parts, each [samples, ...]."""
        from nvidia.dali.backend import TensorListGPU
        want = self._outputs[index]
        if isinstance(output, TensorListGPU):      # one copy to the host
            output = output.as_cpu()
        if output.is_dense_tensor():
            whole = output.as_array()               # DALI hands over a copy it owns
            self._check_dtype(want, whole.dtype)
            bounds = np.cumsum(sizes)[:-1]
            return list(np.split(whole, bounds, axis=0))
        parts: list[np.ndarray] = []
        start = 0
        for size in sizes:
            samples = [np.asarray(output[i]) for i in range(start, start + size)]
            start += size
            shapes = {sample.shape for sample in samples}
            if len(shapes) > 1:
                raise BackendError(
                    f"output '{want.name}' of model '{self._label()}' has samples of different "
                    f"shapes in one request ({sorted(shapes)}); a response tensor needs one "
                    f"shape: give the request's samples equal shapes")
            part = np.stack(samples) if samples else np.empty((0,), dtype=want.dtype)
            self._check_dtype(want, part.dtype)
            parts.append(part)
        return parts

    def _check_dtype(self, want: _Output, got: np.dtype) -> None:
        if got != want.dtype:
            raise BackendError(f"configuration expects datatype {_config_type(want.dtype)} for "
                               f"output '{want.name}', model provides {_config_type(got)}")

    def _label(self) -> str:
        if self._instance is not None:
            return self._instance.name
        return self._model.name if self._model is not None else "<unloaded>"


def _samples(request: Request) -> int:
    return int(next(iter(request.inputs.values())).shape[0]) if request.inputs else 0


def _batch(requests: list[Request], name: str) -> Any:
    """What one external source is fed: a request's array as is (its first dimension counts
    samples), or the samples of several requests as one list (DALI copies each once)."""
    if len(requests) == 1:
        return requests[0].inputs[name]
    return [sample for request in requests for sample in request.inputs[name]]


def _config_type(dtype: np.dtype) -> str:
    try:
        return f"TYPE_{from_numpy_dtype(dtype)}"
    except (KeyError, ValueError):
        return str(dtype)


_ASSERT_PREFIX = re.compile(r'^Assert on ".*?" failed: ')


def _dali_message(exc: BaseException) -> str:
    """The line of a DALI error that says what went wrong: DALI's text starts with "Critical
    error in pipeline:" and the operator's definition site, the cause follows "encountered:"."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if "encountered:" in lines and lines.index("encountered:") + 1 < len(lines):
        cause = lines[lines.index("encountered:") + 1]
        return _ASSERT_PREFIX.sub("", cause)
    return _ASSERT_PREFIX.sub("", lines[0]) if lines else type(exc).__name__
