"""Our protocol buffers: freshness, coexistence with tritonclient, and Triton compatibility."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path
from types import ModuleType

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, text_format
from google.protobuf.descriptor import (
    Descriptor,
    EnumDescriptor,
    FieldDescriptor,
    FileDescriptor,
)
from tritonclient.grpc import model_config_pb2 as triton_config_pb2
from tritonclient.grpc import service_pb2 as triton_service_pb2

from shmserve.protos import (
    generate,
    shmserve_health_pb2,
    shmserve_model_config_pb2,
    shmserve_service_pb2,
)

PROTOS_DIR = Path(generate.__file__).resolve().parent
REPO_ROOT = PROTOS_DIR.parent
TRITON_PACKAGE = "inference"
OUR_PACKAGE = "shmserve.inference"

# ---------------------------------------------------------------------------
# Generated code is fresh
# ---------------------------------------------------------------------------


def _require_grpc_tools() -> None:
    if importlib.util.find_spec("grpc_tools") is None:
        pytest.skip("grpcio-tools (grpc_tools) is not installed; cannot regenerate protos")


def test_generated_code_is_fresh() -> None:
    _require_grpc_tools()
    generated = generate.generate()
    assert sorted(generated) == generate.expected_outputs()
    stale = generate.stale_files(generated)
    assert not stale, (
        f"generated protobuf code is stale ({generate.protoc_version()}): {stale}; "
        "run `python protos/generate.py`"
    )


def test_generator_output_is_deterministic() -> None:
    _require_grpc_tools()
    assert generate.generate() == generate.generate()


def test_generator_check_mode(tmp_path: Path) -> None:
    _require_grpc_tools()
    script = PROTOS_DIR / "generate.py"
    ok = subprocess.run(
        [sys.executable, str(script), "--check"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ok.returncode == 0, ok.stderr

    # A copy of protos/ with one generated file tampered with and one orphan.
    for source in generate.proto_files():
        (tmp_path / source.name).write_bytes(source.read_bytes())
    for name in generate.expected_outputs():
        (tmp_path / name).write_bytes((PROTOS_DIR / name).read_bytes())
    (tmp_path / "shmserve_health_pb2.py").write_bytes(b"# edited\n")
    (tmp_path / "shmserve_gone_pb2.py").write_bytes(b"# orphan\n")
    generated = generate.generate(tmp_path)
    assert generate.stale_files(generated, tmp_path) == [
        "shmserve_health_pb2.py",
        "shmserve_gone_pb2.py",
    ]
    generate.write(generated, tmp_path)
    assert generate.stale_files(generated, tmp_path) == []
    assert not (tmp_path / "shmserve_gone_pb2.py").exists()


# ---------------------------------------------------------------------------
# Our descriptors and tritonclient's live in one process
# ---------------------------------------------------------------------------

_IMPORT_TRITON = "import tritonclient.grpc; import tritonclient.grpc.model_config_pb2"
_IMPORT_OURS = (
    "from shmserve.protos import shmserve_service_pb2, shmserve_model_config_pb2, "
    "shmserve_health_pb2"
)
_CHECK_BOTH = textwrap.dedent(
    """
    from google.protobuf import descriptor_pool
    pool = descriptor_pool.Default()
    for full_name in ("inference.ModelInferRequest", "inference.ModelConfig",
                      "shmserve.inference.ModelInferRequest", "shmserve.inference.ModelConfig",
                      "shmserve.health.HealthCheckResponse"):
        pool.FindMessageTypeByName(full_name)
    assert pool.FindServiceByName("inference.GRPCInferenceService")
    assert pool.FindServiceByName("shmserve.inference.GRPCInferenceService")
    print("coexist-ok")
    """
)


@pytest.mark.parametrize(
    "first, second",
    [(_IMPORT_TRITON, _IMPORT_OURS), (_IMPORT_OURS, _IMPORT_TRITON)],
    ids=["tritonclient-first", "shmserve-first"],
)
def test_coexists_with_tritonclient(first: str, second: str, tmp_path: Path) -> None:
    code = f"{first}\n{second}\n{_CHECK_BOTH}"
    result = subprocess.run(
        [sys.executable, "-W", "error", "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "coexist-ok" in result.stdout


def test_file_names_and_packages_do_not_clash() -> None:
    ours = {
        shmserve_service_pb2.DESCRIPTOR: OUR_PACKAGE,
        shmserve_model_config_pb2.DESCRIPTOR: OUR_PACKAGE,
        shmserve_health_pb2.DESCRIPTOR: "shmserve.health",
    }
    triton_names = {triton_service_pb2.DESCRIPTOR.name, triton_config_pb2.DESCRIPTOR.name}
    for file_descriptor, package in ours.items():
        assert file_descriptor.package == package
        assert file_descriptor.name.startswith("shmserve/protos/shmserve_")
        assert file_descriptor.name not in triton_names
    assert [d.name for d in shmserve_service_pb2.DESCRIPTOR.dependencies] == [
        shmserve_model_config_pb2.DESCRIPTOR.name
    ]


# ---------------------------------------------------------------------------
# Field-by-field equality with Triton's schema (as shipped in tritonclient)
# ---------------------------------------------------------------------------


def _relative(full_name: str, package: str) -> str:
    prefix = f"{package}."
    assert full_name.startswith(prefix), f"{full_name} is outside package {package}"
    return full_name[len(prefix):]


def _field_summary(field: FieldDescriptor, package: str) -> dict[str, object]:
    return {
        "number": field.number,
        "type": field.type,
        "repeated": field.is_repeated,
        "message_type": (
            _relative(field.message_type.full_name, package) if field.message_type else None
        ),
        "enum_type": _relative(field.enum_type.full_name, package) if field.enum_type else None,
        "oneof": field.containing_oneof.name if field.containing_oneof else None,
        "has_presence": field.has_presence,
    }


def _collect(
    file_descriptor: FileDescriptor,
) -> tuple[dict[str, Descriptor], dict[str, EnumDescriptor]]:
    """Every message and enum of a file (nested ones included), by package-relative name."""
    package = file_descriptor.package
    messages: dict[str, Descriptor] = {}
    enums: dict[str, EnumDescriptor] = {}

    def visit(message: Descriptor) -> None:
        messages[_relative(message.full_name, package)] = message
        for enum in message.enum_types:
            enums[_relative(enum.full_name, package)] = enum
        for nested in message.nested_types:
            visit(nested)

    for enum in file_descriptor.enum_types_by_name.values():
        enums[_relative(enum.full_name, package)] = enum
    for message in file_descriptor.message_types_by_name.values():
        visit(message)
    return messages, enums


def _schema_diff(theirs_file: FileDescriptor, ours_file: FileDescriptor) -> list[str]:
    their_messages, their_enums = _collect(theirs_file)
    our_messages, our_enums = _collect(ours_file)
    problems: list[str] = []

    for name, theirs in sorted(their_messages.items()):
        ours = our_messages.get(name)
        if ours is None:
            problems.append(f"message {name}: missing")
            continue
        if theirs.GetOptions().map_entry != ours.GetOptions().map_entry:
            problems.append(f"message {name}: map_entry differs")
        their_oneofs = sorted(o.name for o in theirs.oneofs)
        our_oneofs = sorted(o.name for o in ours.oneofs)
        if their_oneofs != our_oneofs:
            problems.append(f"message {name}: oneofs triton={their_oneofs} ours={our_oneofs}")
        their_fields = theirs.fields_by_name
        our_fields = ours.fields_by_name
        for field_name in sorted(set(their_fields) | set(our_fields)):
            if field_name not in our_fields:
                problems.append(f"message {name}: field {field_name} missing")
                continue
            if field_name not in their_fields:
                problems.append(f"message {name}: field {field_name} not in Triton's schema")
                continue
            expected = _field_summary(their_fields[field_name], theirs_file.package)
            actual = _field_summary(our_fields[field_name], ours_file.package)
            for key, value in expected.items():
                if actual[key] != value:
                    problems.append(
                        f"message {name}: field {field_name}: {key} triton={value!r} "
                        f"ours={actual[key]!r}"
                    )

    for name, theirs_enum in sorted(their_enums.items()):
        our_enum = our_enums.get(name)
        if our_enum is None:
            problems.append(f"enum {name}: missing")
            continue
        their_values = [(v.name, v.number) for v in theirs_enum.values]
        our_values = [(v.name, v.number) for v in our_enum.values]
        if their_values != our_values:
            problems.append(f"enum {name}: values triton={their_values} ours={our_values}")
    return problems


@pytest.mark.parametrize(
    "theirs, ours",
    [
        (triton_service_pb2, shmserve_service_pb2),
        (triton_config_pb2, shmserve_model_config_pb2),
    ],
    ids=["grpc_service", "model_config"],
)
def test_schema_matches_triton(theirs: ModuleType, ours: ModuleType) -> None:
    assert theirs.DESCRIPTOR.package == TRITON_PACKAGE
    problems = _schema_diff(theirs.DESCRIPTOR, ours.DESCRIPTOR)
    assert not problems, "schema differs from Triton's:\n  " + "\n  ".join(problems)
    # Sanity: the walk really covered the nested types.
    messages, enums = _collect(theirs.DESCRIPTOR)
    assert len(messages) > 20
    assert enums or theirs is triton_service_pb2


def test_schema_diff_reports_differences() -> None:
    """The comparison itself notices a renumbered field, a missing enum value and more."""
    proto = descriptor_pb2.FileDescriptorProto()
    shmserve_model_config_pb2.DESCRIPTOR.CopyToProto(proto)
    # Same package, but a private pool: nothing touches the default pool.
    proto.name = "shmserve_test_only/mutated_model_config.proto"
    for message in proto.message_type:
        if message.name == "ModelTransactionPolicy":
            message.field[0].number = 2
        if message.name == "ModelResponseCache":
            message.field[0].name = "enabled"
    for enum in proto.enum_type:
        if enum.name == "DataType":
            del enum.value[-1]

    pool = descriptor_pool.DescriptorPool()
    mutated = pool.Add(proto)
    problems = _schema_diff(triton_config_pb2.DESCRIPTOR, mutated)
    text = "\n".join(problems)
    assert "ModelTransactionPolicy: field decoupled: number triton=1 ours=2" in text
    assert "ModelResponseCache: field enable missing" in text
    assert "ModelResponseCache: field enabled not in Triton's schema" in text
    assert "enum DataType: values" in text
    assert len(problems) == 4, text


# ---------------------------------------------------------------------------
# Service and health
# ---------------------------------------------------------------------------

EXPECTED_METHODS: list[tuple[str, str, str, bool, bool]] = [
    ("ServerLive", "ServerLiveRequest", "ServerLiveResponse", False, False),
    ("ServerReady", "ServerReadyRequest", "ServerReadyResponse", False, False),
    ("ModelReady", "ModelReadyRequest", "ModelReadyResponse", False, False),
    ("ServerMetadata", "ServerMetadataRequest", "ServerMetadataResponse", False, False),
    ("ModelMetadata", "ModelMetadataRequest", "ModelMetadataResponse", False, False),
    ("ModelInfer", "ModelInferRequest", "ModelInferResponse", False, False),
    ("ModelStreamInfer", "ModelInferRequest", "ModelStreamInferResponse", True, True),
    ("ModelConfig", "ModelConfigRequest", "ModelConfigResponse", False, False),
    ("ModelStatistics", "ModelStatisticsRequest", "ModelStatisticsResponse", False, False),
    ("RepositoryIndex", "RepositoryIndexRequest", "RepositoryIndexResponse", False, False),
    (
        "RepositoryModelLoad",
        "RepositoryModelLoadRequest",
        "RepositoryModelLoadResponse",
        False,
        False,
    ),
    (
        "RepositoryModelUnload",
        "RepositoryModelUnloadRequest",
        "RepositoryModelUnloadResponse",
        False,
        False,
    ),
    (
        "SystemSharedMemoryStatus",
        "SystemSharedMemoryStatusRequest",
        "SystemSharedMemoryStatusResponse",
        False,
        False,
    ),
    (
        "SystemSharedMemoryRegister",
        "SystemSharedMemoryRegisterRequest",
        "SystemSharedMemoryRegisterResponse",
        False,
        False,
    ),
    (
        "SystemSharedMemoryUnregister",
        "SystemSharedMemoryUnregisterRequest",
        "SystemSharedMemoryUnregisterResponse",
        False,
        False,
    ),
    (
        "CudaSharedMemoryStatus",
        "CudaSharedMemoryStatusRequest",
        "CudaSharedMemoryStatusResponse",
        False,
        False,
    ),
    (
        "CudaSharedMemoryRegister",
        "CudaSharedMemoryRegisterRequest",
        "CudaSharedMemoryRegisterResponse",
        False,
        False,
    ),
    (
        "CudaSharedMemoryUnregister",
        "CudaSharedMemoryUnregisterRequest",
        "CudaSharedMemoryUnregisterResponse",
        False,
        False,
    ),
    ("TraceSetting", "TraceSettingRequest", "TraceSettingResponse", False, False),
    ("LogSettings", "LogSettingsRequest", "LogSettingsResponse", False, False),
]


def _methods(service_file: FileDescriptor) -> list[tuple[str, str, str, bool, bool]]:
    service = service_file.services_by_name["GRPCInferenceService"]
    package = service_file.package
    return [
        (
            method.name,
            _relative(method.input_type.full_name, package),
            _relative(method.output_type.full_name, package),
            method.client_streaming,
            method.server_streaming,
        )
        for method in service.methods
    ]


def test_service_has_the_20_methods() -> None:
    ours = _methods(shmserve_service_pb2.DESCRIPTOR)
    assert len(ours) == 20
    assert ours == EXPECTED_METHODS
    assert _methods(triton_service_pb2.DESCRIPTOR) == EXPECTED_METHODS
    service = shmserve_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert service.full_name == "shmserve.inference.GRPCInferenceService"


def test_health_messages() -> None:
    assert shmserve_health_pb2.DESCRIPTOR.package == "shmserve.health"
    request = shmserve_health_pb2.HealthCheckRequest.DESCRIPTOR
    assert [(f.name, f.number, f.type) for f in request.fields] == [
        ("service", 1, FieldDescriptor.TYPE_STRING)
    ]
    response = shmserve_health_pb2.HealthCheckResponse.DESCRIPTOR
    status = response.fields_by_name["status"]
    assert (status.number, status.type) == (1, FieldDescriptor.TYPE_ENUM)
    assert status.enum_type.full_name == "shmserve.health.HealthCheckResponse.ServingStatus"
    assert [(v.name, v.number) for v in status.enum_type.values] == [
        ("UNKNOWN", 0),
        ("SERVING", 1),
        ("NOT_SERVING", 2),
        ("SERVICE_UNKNOWN", 3),
    ]
    # grpc.health.v1 bytes: field 1 varint SERVING; field 1 string "x".
    serving = shmserve_health_pb2.HealthCheckResponse(
        status=shmserve_health_pb2.HealthCheckResponse.SERVING
    )
    assert serving.SerializeToString() == b"\x08\x01"
    assert shmserve_health_pb2.HealthCheckRequest.FromString(b"\x0a\x01x").service == "x"


# ---------------------------------------------------------------------------
# Wire and text-format compatibility
# ---------------------------------------------------------------------------


def test_infer_request_round_trips_through_triton_bytes() -> None:
    theirs = triton_service_pb2.ModelInferRequest(model_name="simple", model_version="1", id="r1")
    theirs.parameters["sequence_id"].int64_param = 7
    tensor = theirs.inputs.add(name="INPUT0", datatype="INT32", shape=[1, 16])
    tensor.parameters["shared_memory_region"].string_param = "input_data"
    tensor.parameters["shared_memory_byte_size"].int64_param = 64
    theirs.outputs.add(name="OUTPUT0").parameters["binary_data"].bool_param = True
    theirs.raw_input_contents.append(b"\x01\x00\x00\x00" * 16)
    wire = theirs.SerializeToString(deterministic=True)

    ours = shmserve_service_pb2.ModelInferRequest.FromString(wire)
    assert ours.inputs[0].parameters["shared_memory_region"].string_param == "input_data"
    assert ours.inputs[0].parameters["shared_memory_byte_size"].WhichOneof(
        "parameter_choice"
    ) == "int64_param"
    assert ours.SerializeToString(deterministic=True) == wire


REALISTIC_CONFIG_PBTXT = """
name: "densenet_onnx"
platform: "onnxruntime_onnx"
backend: "onnxruntime"
max_batch_size: 8
version_policy: { specific: { versions: [ 1, 3 ] } }
default_model_filename: "model.onnx"
input [
  {
    name: "data_0"
    data_type: TYPE_FP32
    format: FORMAT_NCHW
    dims: [ 3, 224, 224 ]
    reshape: { shape: [ 1, 3, 224, 224 ] }
  },
  {
    name: "scale"
    data_type: TYPE_FP32
    dims: [ 1 ]
    reshape: { shape: [ ] }
    optional: true
  }
]
output [
  {
    name: "fc6_1"
    data_type: TYPE_FP32
    dims: [ 1000 ]
    label_filename: "densenet_labels.txt"
  }
]
instance_group [
  {
    name: "gpu_group"
    kind: KIND_GPU
    count: 2
    gpus: [ 0, 1 ]
    rate_limiter { resources [ { name: "R1" count: 4 } ] priority: 2 }
  },
  { kind: KIND_CPU count: 1 }
]
dynamic_batching {
  preferred_batch_size: [ 4, 8 ]
  max_queue_delay_microseconds: 100
  preserve_ordering: true
  priority_levels: 2
  default_priority_level: 1
  default_queue_policy {
    timeout_action: DELAY
    default_timeout_microseconds: 5000
    allow_timeout_override: true
    max_queue_size: 64
  }
  priority_queue_policy {
    key: 2
    value: { timeout_action: REJECT max_queue_size: 8 }
  }
}
optimization {
  execution_accelerators {
    gpu_execution_accelerator : [ {
      name : "tensorrt"
      parameters { key: "precision_mode" value: "FP16" }
    } ]
  }
  input_pinned_memory { enable: false }
}
parameters {
  key: "EXECUTION_ENV_PATH"
  value: { string_value: "$$TRITON_MODEL_DIRECTORY/env.tar.gz" }
}
parameters: { key: "intra_op_thread_count" value: { string_value: "4" } }
model_repository_agents
{
  agents [
    {
      name: "checksum",
      parameters
      {
        key: "MD5:1/model.onnx",
        value: "d41d8cd98f00b204e9800998ecf8427e"
      }
    }
  ]
}
model_warmup [
  {
    name: "zero_warmup"
    batch_size: 4
    count: 2
    inputs {
      key: "data_0"
      value: { data_type: TYPE_FP32 dims: [ 3, 224, 224 ] zero_data: true }
    }
    inputs {
      key: "scale"
      value: { data_type: TYPE_FP32 dims: [ 1 ] input_data_file: "scale_data" }
    }
  }
]
model_transaction_policy { decoupled: false }
response_cache { enable: true }
"""


def test_realistic_config_pbtxt_parses() -> None:
    config = text_format.Parse(REALISTIC_CONFIG_PBTXT, shmserve_model_config_pb2.ModelConfig())
    mc = shmserve_model_config_pb2

    assert config.name == "densenet_onnx"
    assert config.max_batch_size == 8
    assert config.version_policy.WhichOneof("policy_choice") == "specific"
    assert list(config.version_policy.specific.versions) == [1, 3]
    assert config.input[0].data_type == mc.TYPE_FP32
    assert config.input[0].format == mc.ModelInput.FORMAT_NCHW
    assert config.input[1].HasField("reshape") and list(config.input[1].reshape.shape) == []
    assert config.input[1].optional
    assert config.output[0].label_filename == "densenet_labels.txt"

    gpu_group, cpu_group = config.instance_group
    assert gpu_group.kind == mc.ModelInstanceGroup.KIND_GPU
    assert (gpu_group.count, list(gpu_group.gpus)) == (2, [0, 1])
    assert gpu_group.rate_limiter.resources[0].count == 4
    assert cpu_group.kind == mc.ModelInstanceGroup.KIND_CPU

    assert config.WhichOneof("scheduling_choice") == "dynamic_batching"
    batching = config.dynamic_batching
    assert list(batching.preferred_batch_size) == [4, 8]
    assert batching.max_queue_delay_microseconds == 100
    assert batching.default_queue_policy.timeout_action == mc.ModelQueuePolicy.DELAY
    assert batching.priority_queue_policy[2].max_queue_size == 8

    accelerator = config.optimization.execution_accelerators.gpu_execution_accelerator[0]
    assert accelerator.parameters["precision_mode"] == "FP16"
    assert config.parameters["intra_op_thread_count"].string_value == "4"
    assert config.parameters["EXECUTION_ENV_PATH"].string_value.endswith("env.tar.gz")

    (agent,) = config.model_repository_agents.agents
    assert agent.name == "checksum"
    assert agent.parameters["MD5:1/model.onnx"] == "d41d8cd98f00b204e9800998ecf8427e"

    (warmup,) = config.model_warmup
    assert (warmup.batch_size, warmup.count) == (4, 2)
    assert warmup.inputs["data_0"].WhichOneof("input_data_type") == "zero_data"
    assert warmup.inputs["scale"].input_data_file == "scale_data"
    assert config.HasField("model_transaction_policy")
    assert config.response_cache.enable

    # Triton's own schema reads the same text into the same bytes.
    theirs = text_format.Parse(REALISTIC_CONFIG_PBTXT, triton_config_pb2.ModelConfig())
    assert theirs.SerializeToString(deterministic=True) == config.SerializeToString(
        deterministic=True
    )


def test_sequence_and_ensemble_configs_parse() -> None:
    sequence = text_format.Parse(
        """
        name: "seq" backend: "python" max_batch_size: 4
        sequence_batching {
          max_sequence_idle_microseconds: 5000000
          oldest { max_candidate_sequences: 4 preferred_batch_size: [ 2 ] }
          control_input [
            { name: "START"
              control [ { kind: CONTROL_SEQUENCE_START fp32_false_true: [ 0, 1 ] } ] },
            { name: "CORRID" control [ { kind: CONTROL_SEQUENCE_CORRID data_type: TYPE_UINT64 } ] }
          ]
          state [ {
            input_name: "INPUT_STATE" output_name: "OUTPUT_STATE"
            data_type: TYPE_INT32 dims: [ -1 ]
            initial_state: { name: "init" data_type: TYPE_INT32 dims: [ 1 ] zero_data: true }
          } ]
        }
        model_transaction_policy { decoupled: True }
        """,
        shmserve_model_config_pb2.ModelConfig(),
    )
    assert sequence.WhichOneof("scheduling_choice") == "sequence_batching"
    assert sequence.sequence_batching.WhichOneof("strategy_choice") == "oldest"
    assert sequence.sequence_batching.state[0].initial_state[0].zero_data
    assert sequence.model_transaction_policy.decoupled

    ensemble = text_format.Parse(
        """
        name: "pipeline" platform: "ensemble" max_batch_size: 0
        version_policy: { latest: { num_versions: 2 } }
        ensemble_scheduling {
          step [ {
            model_name: "preprocess" model_version: -1
            input_map { key: "RAW" value: "IMAGE" }
            output_map { key: "OUT" value: "preprocessed" }
          } ]
        }
        """,
        shmserve_model_config_pb2.ModelConfig(),
    )
    assert ensemble.WhichOneof("scheduling_choice") == "ensemble_scheduling"
    assert ensemble.ensemble_scheduling.step[0].input_map["RAW"] == "IMAGE"
    assert ensemble.version_policy.latest.num_versions == 2
