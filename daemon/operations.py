"""The non-inference operations every network door offers, in one place.

Health, metadata, configuration, statistics, the repository, shared-memory registration,
logging and trace: the gRPC door (frontend/service.py) and the HTTP door (frontend/http.py)
both call these and render the answers (protobuf messages or plain values) in their own wire
format, so both share one implementation and one set of error texts. Errors are
``ServeError``s; each door maps their codes to its own status.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from shmserve.daemon.core import Core
from shmserve.daemon.errors import (
    SERVER_EXITING,
    invalid_argument,
    unavailable,
    unknown_model,
)
from shmserve.daemon.infer_request import config_datatype
from shmserve.daemon.models import UNAVAILABLE
from shmserve.daemon.server_log import log_settings, update_log_setting
from shmserve.protos import shmserve_model_config_pb2 as mc
from shmserve.protos import shmserve_service_pb2 as pb

SERVER_VERSION = "0.1.0"
EXTENSIONS = ["classification", "sequence", "model_repository",
              "model_repository(unload_dependents)",
              "model_configuration", "system_shared_memory",
              "cuda_shared_memory", "binary_tensor_data", "parameters", "statistics",
              "logging", "schedule_policy"]

# One load parameter as a door received it: (key, value, the name of its type on the wire).
LoadParameter = tuple[str, Any, str]


class Operations:
    """Holds the core; one method per operation."""

    def __init__(self, core: Core) -> None:
        self.core = core
        self.models = core.models
        self.registry = core.registry

    # --- health -------------------------------------------------------------------------
    def check_exiting(self) -> None:
        if self.core.exiting:
            raise unavailable(SERVER_EXITING)

    def server_live(self) -> bool:
        self.check_exiting()
        return True

    def server_ready(self) -> bool:
        self.check_exiting()
        return self.models.all_ready() if self.core.settings.strict_readiness else True

    def model_ready(self, name: str, version: str) -> bool:
        self.check_exiting()
        return self.models.is_ready(name, version)

    # --- metadata -----------------------------------------------------------------------
    def server_metadata(self) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=self.core.settings.server_id,
                                         version=SERVER_VERSION,
                                         extensions=EXTENSIONS)

    def model_metadata(self, name: str, version: str) -> pb.ModelMetadataResponse:
        model = self.models.resolve(name, version)
        config = model.config
        record = self.models.record(name)
        batch = [-1] if config.max_batch_size > 0 else []
        response = pb.ModelMetadataResponse(
            name=model.name, platform=config.platform or config.backend,
            versions=[str(v) for v in sorted(record.versions)])
        for tensor in config.input:
            response.inputs.add(name=tensor.name, datatype=config_datatype(tensor.data_type),
                                shape=batch + list(tensor.dims))
        for output in config.output:
            response.outputs.add(name=output.name, datatype=config_datatype(output.data_type),
                                 shape=batch + list(output.dims))
        return response

    def model_config(self, name: str, version: str) -> mc.ModelConfig:
        config: mc.ModelConfig = self.models.resolve(name, version).config
        return config

    # --- statistics ---------------------------------------------------------------------
    def model_statistics(self, name: str, version: str) -> pb.ModelStatisticsResponse:
        response = pb.ModelStatisticsResponse()
        records = self.models.records()
        if name:
            record = self.models.record(name)
            if not record.versions:
                raise unknown_model(name)
            records = [record]
        for record in records:
            for number, model in sorted(record.versions.items()):
                if version and version != str(number):
                    continue
                _fill_statistics(response.model_stats.add(), model.name, number,
                                 model.scheduler.stats)
        if name and not response.model_stats:
            raise invalid_argument(f"requested model version is not available for model "
                                   f"'{name}'")
        return response

    # --- repository ---------------------------------------------------------------------
    def repository_index(self, ready_only: bool) -> pb.RepositoryIndexResponse:
        response = pb.RepositoryIndexResponse()
        known = {record.name: record for record in self.models.records()}
        for name in sorted(set(known) | set(self.models.repository_models())):
            record = known.get(name)
            if record is None:
                if not ready_only:
                    response.models.add(name=name)
                continue
            if record.versions:
                for version, model in sorted(record.versions.items()):
                    if ready_only and not model.ready:
                        continue
                    response.models.add(name=name, version=str(version), state=model.state,
                                        reason=model.reason)
            elif not ready_only:
                response.models.add(name=name, state=record.state or UNAVAILABLE,
                                    reason=record.reason)
        return response

    async def load_model(self, name: str, parameters: Iterable[LoadParameter]) -> None:
        """``config`` (a JSON model config, a string) and ``file:<path>`` (bytes) override
        the repository's files, as in Triton."""
        self._check_explicit()
        config_json: str | None = None
        files: dict[str, bytes] = {}
        for key, value, kind in parameters:
            if key == "config" and kind == "string_param":
                config_json = value
            elif key.startswith("file:") and kind == "bytes_param":
                files[key[len("file:"):]] = value
            else:
                raise invalid_argument(f"Unrecognized load parameter '{key}' with type "
                                       f"'{kind}'")
        await self.models.load(name, config_json, files or None)

    async def unload_model(self, name: str, unload_dependents: bool = False) -> None:
        """``unload_dependents``: also the composing models an ensemble loaded and no other
        loaded ensemble uses, as in Triton."""
        self._check_explicit()
        await self.models.unload(name, dependents=unload_dependents)

    def _check_explicit(self) -> None:
        mode = self.core.settings.model_control_mode
        if mode == "poll":
            raise unavailable("explicit model load / unload is not allowed if polling is "
                              "enabled")
        if mode != "explicit":
            raise unavailable("explicit model load / unload is not allowed in model control "
                              "mode 'none'; start with --model-control-mode=explicit")

    # --- shared memory ------------------------------------------------------------------
    def system_shm_status(self, name: str) -> pb.SystemSharedMemoryStatusResponse:
        response = pb.SystemSharedMemoryStatusResponse()
        for region in self.registry.status("system", name):
            response.regions[region.name].CopyFrom(
                pb.SystemSharedMemoryStatusResponse.RegionStatus(
                    name=region.name, key=region.key, offset=region.offset,
                    byte_size=region.byte_size))
        return response

    def system_shm_register(self, name: str, key: str, offset: int, byte_size: int,
                            owner: str) -> None:
        self.registry.register_system(name, key, offset, byte_size, owner)

    def shm_unregister(self, kind: str, name: str, owner: str) -> None:
        """``kind`` is "system" or "cuda"; an empty name unregisters all the owner's."""
        self.registry.unregister(kind, name, owner)

    def cuda_shm_status(self, name: str) -> pb.CudaSharedMemoryStatusResponse:
        response = pb.CudaSharedMemoryStatusResponse()
        for region in self.registry.status("cuda", name):
            response.regions[region.name].CopyFrom(
                pb.CudaSharedMemoryStatusResponse.RegionStatus(
                    name=region.name, device_id=region.device_id, byte_size=region.byte_size))
        return response

    def cuda_shm_register(self, name: str, raw_handle: bytes, device_id: int, byte_size: int,
                          owner: str) -> None:
        self.registry.register_cuda(name, raw_handle, device_id, byte_size, owner)

    # --- trace and logging --------------------------------------------------------------
    def trace_setting(self, model: str, updates: dict[str, list[str] | None]
                      ) -> dict[str, list[str]]:
        """The trace API: apply ``updates`` (None clears a field) to the server's setting or
        to ``model``'s, and answer every field (tracing.py)."""
        if model and not self.models.is_ready(model, ""):
            raise invalid_argument(f"Request for unknown model : {model}")
        tracer = self.core.tracer
        if updates:
            tracer.update(model, updates)
        return tracer.answer(model)

    def update_log_settings(self, updates: Iterable[tuple[str, Any, str]]) -> dict[str, Any]:
        """Applies (key, value, type name) updates; answers every log setting's value."""
        settings = self.core.settings
        for key, value, kind in updates:
            update_log_setting(settings, key, value, kind)
        if updates:
            self.core.models.follow_log()
        return log_settings(settings)


def _fill_statistics(target: pb.ModelStatistics, name: str, version: int, stats: Any) -> None:
    target.name = name
    target.version = str(version)
    target.last_inference = stats.last_inference_ms
    target.inference_count = stats.inference_count
    target.execution_count = stats.execution_count
    inference = target.inference_stats
    for field in ("success", "fail", "queue", "compute_input", "compute_infer",
                  "compute_output", "cache_hit", "cache_miss"):
        source = getattr(stats, field)
        getattr(inference, field).count = source.count
        getattr(inference, field).ns = source.ns
    for index, response in sorted(stats.response_stats.items()):
        entry = target.response_stats[str(index)]
        for field in ("compute_infer", "compute_output", "success", "fail", "empty_response",
                      "cancel"):
            source = getattr(response, field)
            getattr(entry, field).count = source.count
            getattr(entry, field).ns = source.ns
    for size, batch in sorted(stats.batches.items()):
        entry = target.batch_stats.add(batch_size=size)
        for field in ("compute_input", "compute_infer", "compute_output"):
            source = getattr(batch, field)
            getattr(entry, field).count = source.count
            getattr(entry, field).ns = source.ns
