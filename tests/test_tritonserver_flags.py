"""A tritonserver command line starts shmserve: the log flags work, flags without an effect
here are accepted and named in a warning, and those shmserve cannot honour stop the start
with a clear error. Real server processes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from shmserve.protos import shmserve_service_pb2 as pb
from shmserve.tests.serverproc import ServerProcess

ISO_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ (\w+) ", re.MULTILINE)
# As KServe's and many users' tritonserver command lines carry them.
WITHOUT_EFFECT = ["--backend-config=python,shm-default-byte-size=1048576",
                  "--pinned-memory-pool-byte-size=268435456",
                  "--cuda-memory-pool-byte-size=0:67108864", "--http-thread-count=8",
                  "--grpc-infer-allocation-pool-size=8", "--model-load-thread-count=4",
                  "--allow-sagemaker=false"]


TALKER_PY = """
    import triton_python_backend_utils as pb_utils

    class TritonPythonModel:
        def initialize(self, args):
            print("talker says hello from its worker", flush=True)

        def execute(self, requests):
            return [pb_utils.InferenceResponse([pb_utils.Tensor(
                "Y", pb_utils.get_input_tensor_by_name(r, "X").as_numpy())])
                for r in requests]
"""


def _write_model(root: Path, name: str, model_py: str, output: str = "Y",
                 output_type: str = "TYPE_FP32") -> Path:
    """A python model X (FP32 [1]) -> ``output`` under ``root/models``; the repository."""
    folder = root / "models" / name
    (folder / "1").mkdir(parents=True)
    (folder / "config.pbtxt").write_text(textwrap.dedent(f"""
        name: "{name}"
        backend: "python"
        input [ {{ name: "X", data_type: TYPE_FP32, dims: [ 1 ] }} ]
        output [ {{ name: "{output}", data_type: {output_type}, dims: [ 1 ] }} ]
    """))
    (folder / "1" / "model.py").write_text(textwrap.dedent(model_py))
    return root / "models"


def _repository(root: Path) -> Path:
    return _write_model(root, "talker", TALKER_PY)


def test_log_flags_and_flags_without_effect(tmp_path: Path) -> None:
    log_file = tmp_path / "server.log"
    with ServerProcess(_repository(tmp_path), f"--log-file={log_file}",
                       "--log-format=ISO8601", "--log-info=false", "--id=edge-7",
                       *WITHOUT_EFFECT) as server:
        server.wait_ready()
        with grpcclient.InferenceServerClient(server.url) as client:
            assert client.get_server_metadata().name == "edge-7"
            settings = client.get_log_settings(as_json=True)["settings"]
            assert settings["log_file"] == {"string_param": str(log_file)}
            assert settings["log_info"] == {"bool_param": False}
            assert settings["log_format"] == {"string_param": "ISO8601"}
        captured = server.log()
    text = log_file.read_text()
    assert "talker says hello from its worker" in text   # the workers' output too
    levels = ISO_LINE.findall(text)
    assert "WARNING" in levels and "INFO" not in levels, text
    warning = next(line for line in text.splitlines() if "without effect" in line)
    for flag in WITHOUT_EFFECT:
        assert flag.split("=")[0] in warning
    assert "talker says hello" not in captured          # nothing left on the old stderr


@pytest.mark.parametrize(("flag", "why"), [
    ("--model-namespacing=true", "model namespacing is not supported"),
    ("--allow-vertex-ai=true", "the Vertex AI endpoint is not supported"),
])
def test_flags_it_cannot_honour_stop_the_start(tmp_path: Path, flag: str, why: str) -> None:
    done = subprocess.run([sys.executable, "-m", "shmserve.daemon", "serve",
                           "--model-repository", str(_repository(tmp_path)), flag],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert f"{flag}: {why}" in done.stderr


def test_response_cache_byte_size_is_the_cache(tmp_path: Path) -> None:
    """The deprecated --response-cache-byte-size N is --cache-config local,size=N."""
    repo = _repository(tmp_path)
    config = repo / "talker" / "config.pbtxt"
    config.write_text(config.read_text() + "response_cache { enable: true }\n")
    with ServerProcess(repo, "--response-cache-byte-size=1048576") as server:
        server.wait_ready()
        with grpcclient.InferenceServerClient(server.url) as client:
            value = grpcclient.InferInput("X", [1], "FP32")
            value.set_data_from_numpy(np.array([2.5], np.float32))
            for _ in range(2):
                assert client.infer("talker", [value]).as_numpy("Y")[0] == 2.5
            stats = client.get_inference_statistics("talker").model_stats[0].inference_stats
            assert (stats.cache_miss.count, stats.cache_hit.count) == (1, 1)


def test_an_unwritable_log_file_is_a_clear_error(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "shmserve.daemon", "serve",
                           "--model-repository", str(_repository(tmp_path)),
                           f"--log-file={tmp_path}/missing/dir/server.log"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "cannot open --log-file" in done.stderr


def test_model_config_name_picks_the_custom_config(tmp_path: Path) -> None:
    """One repository, a config per host type: configs/h100.pbtxt where a model has it (here
    with two instances and batching), config.pbtxt for the others; a broken custom config is
    named in the load error."""
    repo = _repository(tmp_path)
    custom = repo / "talker" / "configs"
    custom.mkdir()
    (custom / "h100.pbtxt").write_text((repo / "talker" / "config.pbtxt").read_text().replace(
        'backend: "python"', 'backend: "python"\nmax_batch_size: 4\n'
        'instance_group [ { count: 2, kind: KIND_CPU } ]'))
    plain = repo / "plain"
    plain.mkdir()
    for item in (repo / "talker").iterdir():
        if item.is_file():
            (plain / item.name).write_text(item.read_text().replace('"talker"', '"plain"'))
    (plain / "1").mkdir()
    (plain / "1" / "model.py").write_text((repo / "talker" / "1" / "model.py").read_text())
    with ServerProcess(repo, "--model-config-name=h100") as server:
        server.wait_ready()
        with grpcclient.InferenceServerClient(server.url) as client:
            talker = client.get_model_config("talker").config
            assert talker.max_batch_size == 4 and talker.instance_group[0].count == 2
            assert client.get_model_config("plain").config.max_batch_size == 0
    (custom / "h100.pbtxt").write_text('name: "talker"\nbackend: "python"\nmax_batch_size: -1\n')
    done = subprocess.run([sys.executable, "-m", "shmserve.daemon", "serve",
                           "--model-repository", str(repo), "--grpc-port", "0",
                           "--http-port", "0", "--metrics-port", "0",
                           "--model-config-name", "h100"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert f"{custom / 'h100.pbtxt'}: field 'max_batch_size' must be >= 0" in done.stderr


def _connectivity_after_a_call(server: ServerProcess, seconds: float) -> list[str]:
    """The connectivity states a channel goes through after one call, for ``seconds``."""
    states: list[str] = []
    lock = threading.Lock()

    def seen(state: grpc.ChannelConnectivity) -> None:
        with lock:
            states.append(state.name)

    with grpc.insecure_channel(server.url) as channel:
        live = channel.unary_unary("/inference.GRPCInferenceService/ServerLive",
                                   request_serializer=lambda m: m.SerializeToString(),
                                   response_deserializer=pb.ServerLiveResponse.FromString)
        assert live(pb.ServerLiveRequest(), timeout=10).live
        channel.subscribe(seen)
        time.sleep(seconds)
        channel.unsubscribe(seen)
    with lock:
        return list(states)


@pytest.mark.parametrize("age_flags", [[], ["--grpc-max-connection-age=300",
                                            "--grpc-max-connection-age-grace=100"]])
def test_max_connection_age_closes_connections(tmp_path: Path, age_flags: list[str]) -> None:
    """With --grpc-max-connection-age the server ends an idle client's connection (GOAWAY):
    the channel leaves READY; without it the connection stays."""
    with ServerProcess(_repository(tmp_path), *age_flags,
                       "--grpc-keepalive-permit-without-calls=true") as server:
        server.wait_ready()
        states = _connectivity_after_a_call(server, 1.5)
    assert states[0] == "READY", states
    assert ("IDLE" in states or "CONNECTING" in states) == bool(age_flags), states


ECHO_PARAMETERS_PY = """
    import numpy as np
    import triton_python_backend_utils as pb_utils

    class TritonPythonModel:
        def execute(self, requests):
            return [pb_utils.InferenceResponse([pb_utils.Tensor(
                "PARAMETERS", np.array([r.parameters().encode()], dtype=object))])
                for r in requests]
"""


def test_header_forward_patterns(tmp_path: Path) -> None:
    """Matching headers reach the model as string parameters, over gRPC and HTTP; a reserved
    name is refused with Triton's text."""
    repo = _write_model(tmp_path, "echo_parameters", ECHO_PARAMETERS_PY, "PARAMETERS",
                        "TYPE_STRING")
    with ServerProcess(repo, "--grpc-header-forward-pattern=^(x-tenant|triton_)",
                       "--http-header-forward-pattern=^x-region$") as server:
        server.wait_ready()
        with grpcclient.InferenceServerClient(server.url) as client:
            value = grpcclient.InferInput("X", [1], "FP32")
            value.set_data_from_numpy(np.ones(1, np.float32))
            result = client.infer("echo_parameters", [value], parameters={"mine": 1},
                                  headers={"x-tenant-id": "acme", "x-region": "eu"})
            assert json.loads(result.as_numpy("PARAMETERS")[0]) == {"mine": 1,
                                                                    "x-tenant-id": "acme"}
            with pytest.raises(InferenceServerException) as refused:
                client.infer("echo_parameters", [value], headers={"triton_secret": "1"})
            assert refused.value.message() == ("Header 'triton_secret' is reserved for Triton "
                                               "usage and cannot be forwarded.")
        with httpclient.InferenceServerClient(server.http_url) as client:
            value = httpclient.InferInput("X", [1], "FP32")
            value.set_data_from_numpy(np.ones(1, np.float32))
            result = client.infer("echo_parameters", [value],
                                  headers={"x-region": "eu", "x-tenant-id": "acme"})
            assert json.loads(result.as_numpy("PARAMETERS")[0]) == {"x-region": "eu"}


LOGGER_PY = """
    import numpy as np
    import triton_python_backend_utils as pb_utils

    class TritonPythonModel:
        def execute(self, requests):
            for request in requests:
                tag = pb_utils.get_input_tensor_by_name(request, "X").as_numpy()[0]
                pb_utils.Logger.log_info(f"info from the model {tag:g}")
                pb_utils.Logger.log_warn(f"warning from the model {tag:g}")
            return [pb_utils.InferenceResponse([pb_utils.Tensor(
                "Y", pb_utils.get_input_tensor_by_name(r, "X").as_numpy())]) for r in requests]
"""


def test_workers_follow_the_logging_api(tmp_path: Path) -> None:
    """The model's pb_utils.Logger lines obey log_info and log_format as the logging API sets
    them, in the running worker."""
    with ServerProcess(_write_model(tmp_path, "logger", LOGGER_PY)) as server:
        server.wait_ready()
        with grpcclient.InferenceServerClient(server.url) as client:
            def run(tag: float) -> None:
                value = grpcclient.InferInput("X", [1], "FP32")
                value.set_data_from_numpy(np.array([tag], np.float32))
                client.infer("logger", [value])
                deadline = time.monotonic() + 10
                while f"warning from the model {tag:g}" not in server.log() \
                        and time.monotonic() < deadline:
                    time.sleep(0.05)

            run(1)
            client.update_log_settings({"log_info": False, "log_format": "ISO8601"})
            run(2)
            client.update_log_settings({"log_info": True, "log_format": "default"})
            run(3)
        text = server.log()
    assert "info from the model 1" in text and "info from the model 3" in text
    assert "info from the model 2" not in text
    second = next(line for line in text.splitlines() if "warning from the model 2" in line)
    assert ISO_LINE.match(second), second
    third = next(line for line in text.splitlines() if "warning from the model 3" in line)
    assert not ISO_LINE.match(third), third


FLAKY_START_PY = """
    import json
    import os
    import triton_python_backend_utils as pb_utils

    class TritonPythonModel:
        def initialize(self, args):
            config = json.loads(args["model_config"])
            marker = config["parameters"]["MARKER"]["string_value"]
            if not os.path.exists(marker):
                open(marker, "w").close()
                raise RuntimeError("the first start fails")

        def execute(self, requests):
            return [pb_utils.InferenceResponse([pb_utils.Tensor(
                "Y", pb_utils.get_input_tensor_by_name(r, "X").as_numpy())]) for r in requests]
"""


@pytest.mark.parametrize("retries", [0, 1])
def test_model_load_retry_count(tmp_path: Path, retries: int) -> None:
    """A model whose first start fails serves after one retry, and stays unavailable
    without."""
    repo = _write_model(tmp_path, "flaky", FLAKY_START_PY)
    config = repo / "flaky" / "config.pbtxt"
    config.write_text(config.read_text() + 'parameters { key: "MARKER" value: { '
                      f'string_value: "{tmp_path / "started-once"}" }} }}\n')
    with ServerProcess(repo, f"--model-load-retry-count={retries}",
                       "--exit-on-error=false") as server:
        server.wait_started()
        with grpcclient.InferenceServerClient(server.url) as client:
            assert client.is_model_ready("flaky") == bool(retries)
        if retries:
            assert "the first start fails" in server.log() and "retrying (1 of 1)" \
                in server.log()


@pytest.mark.parametrize("reuse", [False, True])
def test_reuse_ports(tmp_path: Path, reuse: bool) -> None:
    """With --reuse-grpc-port and --reuse-http-port a second server binds the same ports
    (a replacement starting before the old one stops); without, it cannot start."""
    repo = _repository(tmp_path)
    flags = ["--reuse-grpc-port=true", "--reuse-http-port=true"] if reuse else []
    with ServerProcess(repo, *flags) as first:
        first.wait_ready()
        second = subprocess.Popen(
            [sys.executable, "-m", "shmserve.daemon", "serve", "--model-repository", str(repo),
             "--grpc-address", "127.0.0.1", "--grpc-port", str(first.port),
             "--http-address", "127.0.0.1", "--http-port", str(first.http_port),
             "--metrics-port", "0", "--grpc-frontends", "1", "--local-socket", "none",
             "--exit-timeout-secs", "5", *flags],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            output = ""
            deadline = time.monotonic() + 60
            while second.poll() is None and time.monotonic() < deadline:
                line = second.stdout.readline() if second.stdout else ""
                output += line
                if "Started HTTPService" in output and "Started GRPCInferenceService" in output:
                    break
            if reuse:
                assert second.poll() is None, output   # listening beside the first
            else:
                assert second.wait(30) != 0, output
                assert "cannot listen on" in output or "address already in use" in \
                    output.lower(), output
        finally:
            if second.poll() is None:
                second.terminate()
                second.wait(30)
            if second.stdout:
                second.stdout.close()


AFFINITY_PY = """
    import os
    import numpy as np
    import triton_python_backend_utils as pb_utils

    class TritonPythonModel:
        def execute(self, requests):
            cpus = ",".join(str(c) for c in sorted(os.sched_getaffinity(0)))
            return [pb_utils.InferenceResponse([pb_utils.Tensor(
                "Y", np.array([cpus.encode()], dtype=object))]) for _ in requests]
"""


def _affinity(server: ServerProcess) -> str:
    with grpcclient.InferenceServerClient(server.url) as client:
        value = grpcclient.InferInput("X", [1], "FP32")
        value.set_data_from_numpy(np.ones(1, np.float32))
        return client.infer("where", [value]).as_numpy("Y")[0].decode()


def test_host_policy_pins_the_workers(tmp_path: Path) -> None:
    """--host-policy=cpu,cpu-cores=N: the CPU instance's worker runs on CPU N only; the
    NUMA node of the host's first CPUs gives them all; a node that does not exist stops the
    start."""
    repo = _write_model(tmp_path, "where", AFFINITY_PY, "Y", "TYPE_STRING")
    usable = sorted(os.sched_getaffinity(0))
    last = usable[-1]
    with ServerProcess(repo, f"--host-policy=cpu,cpu-cores={last}") as server:
        server.wait_ready()
        assert _affinity(server) == str(last)
    node0 = Path("/sys/devices/system/node/node0/cpulist")
    if node0.exists():
        with ServerProcess(repo, "--host-policy=cpu,numa-node=0") as server:
            server.wait_ready()
            pinned = [int(c) for c in _affinity(server).split(",")]
            assert set(pinned) <= set(usable) and pinned
    done = subprocess.run([sys.executable, "-m", "shmserve.daemon", "serve",
                           "--model-repository", str(repo), "--grpc-port", "0",
                           "--http-port", "0", "--metrics-port", "0",
                           "--host-policy=cpu,numa-node=99"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "host policy 'cpu': NUMA node 99 does not exist on this host" in done.stderr
