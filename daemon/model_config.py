"""config.pbtxt: parse into our ModelConfig, fill Triton's defaults, validate, pick versions."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.protobuf import json_format, text_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from shmserve.daemon.ensemble_config import (
    ENSEMBLE_PLATFORM,
    EnsembleConfigError,
    validate_scheduling,
)
from shmserve.daemon.host_policy import default_policy
from shmserve.daemon.queue_policy import check_config as check_queue_config
from shmserve.daemon.sequence_config import (
    SEQUENCE_IDLE_DEFAULT_US,
    SequenceConfigError,
    sequence_plan,
)
from shmserve.protos import shmserve_model_config_pb2 as mc
from shmserve.workers.sequence_state import StateConfigError, state_specs

CONFIG_FILE = "config.pbtxt"
CUSTOM_CONFIGS_DIR = "configs"  # --model-config-name NAME: <model>/configs/NAME.pbtxt
PLATFORM_BACKENDS = {"pytorch_libtorch": "pytorch", "onnxruntime_onnx": "onnxruntime",
                     "python": "python", "ensemble": "ensemble"}
_INT64_TYPES = {FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT64,
                FieldDescriptor.TYPE_SINT64, FieldDescriptor.TYPE_FIXED64,
                FieldDescriptor.TYPE_SFIXED64}


class ConfigError(Exception):
    """A model that cannot load; the message names the file and the field."""


@dataclass(frozen=True, slots=True)
class InstancePlan:
    name: str
    kind: str            # KIND_CPU | KIND_GPU | KIND_MODEL
    device_id: int       # host GPU id, 0 for CPU
    index: int
    # The group's rate_limiter: (resource name, global, count) each, and its priority.
    resources: tuple[tuple[str, bool, int], ...] = ()
    priority: int = 0
    host_policy: str = ""  # the group's, else Triton's default name (host_policy.py)


def config_path(model_dir: Path, config_name: str = "") -> Path:
    """The model's config file: ``configs/<config_name>.pbtxt`` when --model-config-name is
    given and the model has that file, else ``config.pbtxt`` (Triton's custom model
    configuration)."""
    if config_name:
        custom = model_dir / CUSTOM_CONFIGS_DIR / f"{config_name}.pbtxt"
        if custom.is_file():
            return custom
    return model_dir / CONFIG_FILE


def read_config(model_dir: Path, missing_ok: bool = False,
                config_name: str = "") -> mc.ModelConfig:
    """The folder's config (config_path); with ``missing_ok`` an absent file is an empty
    config (Triton with auto-complete on: the backend and the python model's hook fill it
    in)."""
    path = config_path(model_dir, config_name)
    try:
        text = path.read_text()
    except FileNotFoundError:
        if missing_ok:
            return mc.ModelConfig()
        raise ConfigError(f"{path}: file not found (every model needs a {CONFIG_FILE})") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    config = mc.ModelConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as exc:
        raise ConfigError(f"{path}: {user_facing(str(exc))}") from None
    return config


def user_facing(protobuf_message: str) -> str:
    """A protobuf parse error without our proto package: ``Message type
    "shmserve.inference.ModelConfig" has no field ...`` reads as Triton's ``ModelConfig``
    (the package is an implementation detail, see docs/architecture.md)."""
    return protobuf_message.replace(f"{mc.DESCRIPTOR.package}.", "")


def complete_config(config: mc.ModelConfig, model_dir: Path, gpu_ids: list[int],
                    config_name: str = "") -> None:
    """Fill defaults the way Triton does and reject what cannot be served."""
    where = config_path(model_dir, config_name)
    folder = model_dir.name
    if not config.name:
        config.name = folder
    elif config.name != folder:
        raise ConfigError(f"{where}: field 'name': model name '{config.name}' must match the "
                          f"model directory name '{folder}'")
    if not config.backend:
        if not config.platform:
            raise ConfigError(f"{where}: must specify 'backend' or 'platform'")
        config.backend = PLATFORM_BACKENDS.get(config.platform, config.platform)
    if config.max_batch_size < 0:
        raise ConfigError(f"{where}: field 'max_batch_size' must be >= 0")
    _check_tensors(where, config, "input", config.input)
    _check_tensors(where, config, "output", config.output)
    if not config.output:
        raise ConfigError(f"{where}: model must have at least one 'output'")
    if config.HasField("dynamic_batching") and config.max_batch_size == 0:
        raise ConfigError(f"{where}: field 'dynamic_batching' requires max_batch_size > 0")
    for preferred in config.dynamic_batching.preferred_batch_size:
        if preferred > config.max_batch_size:
            raise ConfigError(f"{where}: field 'dynamic_batching.preferred_batch_size' "
                              f"{preferred} exceeds max_batch_size {config.max_batch_size}")
    if config.HasField("sequence_batching"):
        _complete_sequence_batching(where, config, model_dir)
    if config.HasField("dynamic_batching"):
        problem = check_queue_config(config.dynamic_batching, config.name)
        if problem is not None:
            raise ConfigError(f"{where}: {problem}")
    if config.response_cache.enable and config.model_transaction_policy.decoupled:
        raise ConfigError(f"{where}: Response Cache does not currently support model "
                          f"{config.name} with 'decoupled' transaction policy. Please disable "
                          f"the response cache.")
    if config.response_cache.enable and config.HasField("sequence_batching"):
        raise ConfigError(f"{where}: Response Cache does not currently support model "
                          f"{config.name} with sequence batching scheduler. Please disable the "
                          f"response cache.")
    if config.platform == ENSEMBLE_PLATFORM or config.HasField("ensemble_scheduling"):
        try:
            validate_scheduling(config)
        except EnsembleConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        return  # an ensemble has no instances of its own
    _complete_instance_groups(where, config, gpu_ids)


def _complete_sequence_batching(where: Path, config: mc.ModelConfig, model_dir: Path) -> None:
    """Triton's defaults (idle time; oldest: preferred batch size) and checks (controls,
    implicit state, its initial value)."""
    batching = config.sequence_batching
    if not batching.max_sequence_idle_microseconds:
        batching.max_sequence_idle_microseconds = SEQUENCE_IDLE_DEFAULT_US
    if batching.HasField("oldest") and not batching.oldest.preferred_batch_size and \
            config.max_batch_size > 0:
        batching.oldest.preferred_batch_size.append(config.max_batch_size)
    try:
        sequence_plan(config)
        state_specs(config_to_dict(config), str(model_dir))
    except (SequenceConfigError, StateConfigError) as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _check_tensors(where: Path, config: mc.ModelConfig, kind: str, tensors: Any) -> None:
    seen: set[str] = set()
    for index, tensor in enumerate(tensors):
        label = f"{kind} '{tensor.name}'" if tensor.name else f"{kind}[{index}]"
        if not tensor.name:
            raise ConfigError(f"{where}: {label}: field 'name' must be set")
        if tensor.name in seen:
            raise ConfigError(f"{where}: {label}: duplicate {kind} name")
        seen.add(tensor.name)
        if tensor.data_type == mc.TYPE_INVALID:
            raise ConfigError(f"{where}: {label}: field 'data_type' must be set")
        if not tensor.dims and not tensor.HasField("reshape") and config.max_batch_size > 0:
            raise ConfigError(f"{where}: {label}: field 'dims' must not be empty (use "
                              f"'reshape: {{ shape: [] }}' for a scalar per batch element)")
        for dim in tensor.dims:
            if dim < -1 or dim == 0:
                raise ConfigError(f"{where}: {label}: field 'dims' has invalid dimension {dim}")


def _complete_instance_groups(where: Path, config: mc.ModelConfig, gpu_ids: list[int]) -> None:
    if not config.instance_group:
        config.instance_group.add()
    for index, group in enumerate(config.instance_group):
        if not group.name:
            group.name = f"{config.name}_{index}"
        if group.count == 0:
            group.count = 1
        if group.count < 1:
            raise ConfigError(f"{where}: instance_group '{group.name}': field 'count' must be "
                              f"at least 1")
        if group.kind == mc.ModelInstanceGroup.KIND_AUTO:
            group.kind = (mc.ModelInstanceGroup.KIND_GPU if gpu_ids and config.backend != "python"
                          else mc.ModelInstanceGroup.KIND_CPU)
        if group.kind == mc.ModelInstanceGroup.KIND_GPU:
            if not gpu_ids:
                raise ConfigError(f"{where}: instance_group '{group.name}' has kind KIND_GPU but "
                                  f"no GPUs are available on this host")
            if not group.gpus:
                group.gpus.extend(gpu_ids)
            missing = [gpu for gpu in group.gpus if gpu not in gpu_ids]
            if missing:
                raise ConfigError(f"{where}: instance_group '{group.name}': field 'gpus' names "
                                  f"GPU {missing[0]}, which is not available (have {gpu_ids})")
        elif group.gpus:
            raise ConfigError(f"{where}: instance_group '{group.name}': field 'gpus' is only "
                              f"allowed with KIND_GPU")


def plan_instances(config: mc.ModelConfig) -> list[InstancePlan]:
    plans: list[InstancePlan] = []
    for group in config.instance_group:
        kind = mc.ModelInstanceGroup.Kind.Name(group.kind)
        devices = list(group.gpus) if group.kind == mc.ModelInstanceGroup.KIND_GPU else [0]
        limiter = group.rate_limiter
        resources = tuple((resource.name, bool(getattr(resource, "global")), resource.count)
                          for resource in limiter.resources)
        for device in devices:
            for _ in range(group.count):
                plans.append(InstancePlan(f"{group.name}_{len(plans)}", kind, device, len(plans),
                                          resources, limiter.priority,
                                          group.host_policy or default_policy(kind, device)))
    return plans


def select_versions(model_dir: Path, config: mc.ModelConfig) -> list[int]:
    """Version folders chosen by version_policy (numeric names not starting with '0')."""
    available = sorted(
        int(entry.name) for entry in model_dir.iterdir()
        if entry.is_dir() and entry.name.isdigit() and not entry.name.startswith("0"))
    policy = config.version_policy
    choice = policy.WhichOneof("policy_choice")
    if choice == "all":
        return available
    if choice == "specific":
        return sorted(v for v in set(policy.specific.versions) if v in available)
    count = policy.latest.num_versions if choice == "latest" else 1
    return available[-max(count, 1):] if available else []


def detect_gpus() -> list[int]:
    """Host GPU ids, found without touching CUDA (the supervisor never loads it)."""
    try:
        count = len(os.listdir("/proc/driver/nvidia/gpus"))
    except OSError:
        return []
    gpus = list(range(count))
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        wanted = [int(v) for v in visible.split(",") if v.strip().isdigit()]
        gpus = [g for g in wanted if g < count]
    return gpus


def config_to_dict(config: mc.ModelConfig) -> dict[str, Any]:
    """Triton's model_config JSON: proto field names, defaults included, int64s as numbers."""
    raw = json_format.MessageToDict(config, preserving_proto_field_name=True,
                                    always_print_fields_with_no_presence=True)
    _int64_to_int(raw, config.DESCRIPTOR)
    return raw


def _int64_to_int(value: Any, descriptor: Descriptor) -> None:
    if not isinstance(value, dict):
        return
    for key, item in value.items():
        field = descriptor.fields_by_name.get(key)
        if field is None:
            continue
        if field.message_type is not None:
            entry = field.message_type
            if entry.GetOptions().map_entry:
                value_field = entry.fields_by_name["value"]
                for map_key, map_value in item.items():
                    if value_field.message_type is not None:
                        _int64_to_int(map_value, value_field.message_type)
                    elif value_field.type in _INT64_TYPES:
                        item[map_key] = int(map_value)
            elif isinstance(item, list):
                for element in item:
                    _int64_to_int(element, entry)
            else:
                _int64_to_int(item, entry)
        elif field.type in _INT64_TYPES:
            value[key] = [int(v) for v in item] if isinstance(item, list) else int(item)
