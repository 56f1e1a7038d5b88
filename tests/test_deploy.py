"""deploy/: the Kubernetes and KServe manifests validated offline, and their command lines,
probes and the container's entrypoint run for real.

The images cannot be built here, so the container is tested by what it runs: the entrypoint
script with the manifests' (and the Dockerfile's) exact arguments. Only model repository paths,
ports and the socket directory are mapped to this machine's (a test repository, free ports, a
temporary directory); every flag stays as written.
"""

from __future__ import annotations

import functools
import gzip
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate.utils as kubernetes_validate
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import yaml

from shmserve.client import Client
from shmserve.tests.serverproc import build_repository, free_port

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
ENTRYPOINT = DEPLOY / "container" / "entrypoint.sh"
CRDS = Path(__file__).resolve().parent / "data" / "kserve"
MANIFESTS = sorted((DEPLOY / "kserve").glob("*.yaml")) + sorted((DEPLOY / "k8s").glob("*.yaml"))
K8S_VERSION = "1.33.0"
PORT_FLAGS = ("--grpc-port", "--http-port", "--metrics-port")
REPOSITORY_FLAGS = ("--model-store", "--model-repository")
X = np.arange(16, dtype=np.int32).reshape(1, 16)


def _documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _refuse_unknown_fields(schema: Any) -> Any:
    """The schema with unknown fields refused wherever Kubernetes would prune them (kubectl
    --validate=strict): objects with declared properties and no other rule about extras."""
    if isinstance(schema, list):
        return [_refuse_unknown_fields(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    strict = {key: _refuse_unknown_fields(value) for key, value in schema.items()}
    if ("properties" in schema and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")):
        strict["additionalProperties"] = False
    return strict


@functools.cache
def _kserve_validator(kind: str, version: str) -> jsonschema.Draft4Validator:
    """OpenAPI v3 schemas are JSON Schema draft 4 plus keywords validators ignore (nullable,
    x-kubernetes-*). One validator per schema: jsonschema.validate() would check the 2 MB
    InferenceService schema against the meta-schema on every call."""
    plural = {"ServingRuntime": "servingruntimes", "InferenceService": "inferenceservices"}
    with gzip.open(CRDS / f"serving.kserve.io_{plural[kind]}.yaml.gz", "rt") as file:
        crd = yaml.load(file, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    for served in crd["spec"]["versions"]:
        if served["name"] == version:
            schema = served["schema"]["openAPIV3Schema"]
            return jsonschema.Draft4Validator(_refuse_unknown_fields(schema))
    raise AssertionError(f"KServe's {kind} CRD has no version {version}")


def _validate(doc: dict[str, Any]) -> None:
    group, _, version = doc["apiVersion"].rpartition("/")
    if group == "serving.kserve.io":
        error = jsonschema.exceptions.best_match(
            _kserve_validator(doc["kind"], version).iter_errors(doc))
        if error is not None:
            raise error
    else:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda path: path.name)
def test_manifest_is_valid_offline(manifest: Path) -> None:
    for doc in _documents(manifest):
        _validate(doc)


def test_validation_refuses_unknown_fields_and_wrong_types() -> None:
    runtime = _documents(DEPLOY / "kserve" / "servingruntime.yaml")[0]
    runtime["spec"]["containers"][0]["argz"] = runtime["spec"]["containers"][0].pop("args")
    with pytest.raises(jsonschema.ValidationError, match="argz"):
        _validate(runtime)
    service = _documents(DEPLOY / "kserve" / "inferenceservice.yaml")[0]
    service["spec"]["predictor"]["minReplicas"] = "one"
    with pytest.raises(jsonschema.ValidationError, match="one"):
        _validate(service)
    deployment = _documents(DEPLOY / "k8s" / "deployment.yaml")[0]
    deployment["spec"]["template"]["spec"]["volumes"][1]["emptyDir"]["medium"] = 1
    with pytest.raises(jsonschema.ValidationError):
        _validate(deployment)


def test_kserve_runtime_declares_what_kserve_needs() -> None:
    runtime = _documents(DEPLOY / "kserve" / "servingruntime.yaml")[0]["spec"]
    assert runtime["protocolVersions"] == ["v2", "grpc-v2"]
    (container,) = runtime["containers"]
    assert container["name"] == "kserve-container" and "command" not in container
    assert {p["containerPort"]: p["name"] for p in container["ports"]} == {8080: "http1",
                                                                          9000: "h2c"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": 8080}
    assert runtime["annotations"]["prometheus.kserve.io/port"] == "8002"
    dshm = next(v for v in runtime["volumes"] if v["name"] == "dshm")
    assert dshm["emptyDir"]["medium"] == "Memory" and dshm["emptyDir"]["sizeLimit"]
    assert any(m["mountPath"] == "/dev/shm" for m in container["volumeMounts"])


# --- the command lines, run ---------------------------------------------------------------------
def _pod_containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    if doc["kind"] == "ServingRuntime":
        return list(doc["spec"]["containers"])
    if doc["kind"] == "Deployment":
        return list(doc["spec"]["template"]["spec"]["containers"])
    return []


def _server_pods() -> Iterator[Any]:
    for manifest in MANIFESTS:
        for doc in _documents(manifest):
            containers = _pod_containers(doc)
            for container in containers:
                if container["image"].startswith("shmserve:"):
                    others = [c for c in containers if c is not container]
                    yield pytest.param(container, others, id=f"{manifest.name}:{container['name']}")


class Mapping:
    """Manifest ports, paths and socket directory -> this machine's."""

    def __init__(self, tmp_path: Path) -> None:
        self.repository = build_repository(tmp_path / "models", ["simple"])
        self.runtime_root = tmp_path / "run"   # what the emptyDir volume would be
        self.runtime_root.mkdir()
        self.ports: dict[int, int] = {}

    def port(self, port: int) -> int:
        return self.ports.setdefault(port, free_port())

    def argument(self, argument: str) -> str:
        flag, equals, value = argument.partition("=")
        if equals and flag in PORT_FLAGS:
            return f"{flag}={self.port(int(value))}"
        if equals and flag in REPOSITORY_FLAGS:
            return f"{flag}={self.repository}"
        return argument

    def environment(self, container: dict[str, Any]) -> dict[str, str]:
        environ = {}
        for variable in container.get("env", []):
            value = variable["value"]
            if variable["name"] == "RUNTIME_DIRECTORY":
                assert value.startswith("/var/run/shmserve/")
                value = str(self.runtime_root / value.removeprefix("/var/run/shmserve/"))
            environ[variable["name"]] = value
        return environ


def _start(arguments: list[str], environ: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",
               PYTHONUNBUFFERED="1", **environ)
    with open(log, "wb") as out:
        return subprocess.Popen([str(ENTRYPOINT), *arguments], env=env, stdout=out,
                                stderr=subprocess.STDOUT)


def _http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def _wait_for(url: str, process: subprocess.Popen[bytes], log: Path, within: float = 60
              ) -> None:
    deadline = time.monotonic() + within
    while _http_status(url) != 200:
        assert process.poll() is None, f"the server exited:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"{url} never answered 200:\n{log.read_text()}"
        time.sleep(0.1)


def _stop(process: subprocess.Popen[bytes], log: Path) -> None:
    """SIGTERM as the kubelet (through tini) sends it: the server itself gets it."""
    argv = Path(f"/proc/{process.pid}/cmdline").read_bytes().split(b"\0")
    process.send_signal(signal.SIGTERM)
    assert process.wait(30) == 0, log.read_text()
    assert argv[1].endswith(b"/shmserve"), f"the entrypoint must exec the server: {argv[:2]}"


def _probe_port(container: dict[str, Any], probe: dict[str, Any]) -> int:
    port = probe["httpGet"]["port"]
    if isinstance(port, str):
        port = next(p["containerPort"] for p in container["ports"] if p["name"] == port)
    return int(port)


@pytest.mark.parametrize(("container", "others"), list(_server_pods()))
def test_manifest_command_line_serves_and_its_probes_answer(
        container: dict[str, Any], others: list[dict[str, Any]], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    mapping = Mapping(tmp_path)
    arguments = [mapping.argument(a) for a in container["args"]]
    environ = mapping.environment(container)
    log = tmp_path / "server.log"
    process = _start(arguments, environ, log)
    try:
        probes = [container[name] for name in ("readinessProbe", "livenessProbe")
                  if name in container]
        assert probes
        for probe in probes:
            port = mapping.port(_probe_port(container, probe))
            _wait_for(f"http://127.0.0.1:{port}{probe['httpGet']['path']}", process, log)
        grpc_flag = next(a for a in container["args"] if a.startswith("--grpc-port="))
        grpc_port = mapping.port(int(grpc_flag.partition("=")[2]))
        with grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}") as triton:
            assert triton.is_server_ready() and triton.is_model_ready("simple")
        # The co-located client: the socket directory as the other containers see it.
        application = others[0] if others else container
        client_environ = mapping.environment(application)
        monkeypatch.setenv("RUNTIME_DIRECTORY", client_environ["RUNTIME_DIRECTORY"])
        url = client_environ.get("SHMSERVE_URL", f"127.0.0.1:{grpc_flag.partition('=')[2]}")
        host, _, port_text = url.rpartition(":")
        with Client(f"{host}:{mapping.port(int(port_text))}", transport="shm") as client:
            out = client.infer("simple", {"INPUT0": X, "INPUT1": X})
            assert client.transport == "shm", "the socket was not found where the pod shares it"
        np.testing.assert_array_equal(out["OUTPUT0"], X + X)
    finally:
        if process.poll() is None:
            _stop(process, log)
        process.wait()


def _dockerfile_instruction(name: str) -> list[str]:
    """An exec-form instruction of the Dockerfile's final stage, e.g. CMD."""
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    final = text.rsplit("\nFROM ", 1)[1]
    (line,) = [line for line in final.splitlines() if line.startswith(f"{name} ")]
    return list(json.loads(line[line.index("["):]))


def test_dockerfile_final_stage_and_its_command_line(tmp_path: Path) -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    final = text.rsplit("\nFROM ", 1)[1]
    assert "build-essential" not in final and "gcc" not in final
    assert re.search(r"^USER 1000", final, re.MULTILINE)
    assert 'VOLUME ["/models"]' in final
    entrypoint = _dockerfile_instruction("ENTRYPOINT")
    assert entrypoint == ["/usr/bin/tini", "--", "shmserve-entrypoint"]
    healthcheck = _dockerfile_instruction("HEALTHCHECK")
    assert healthcheck[:1] == ["shmserve-entrypoint"]
    mapping = Mapping(tmp_path)
    http = mapping.port(8000)
    # The image's CMD, on free ports (the image's defaults: 8000, 8001, 8002).
    command = [a.replace("=/models", f"={mapping.repository}")
               for a in _dockerfile_instruction("CMD")]
    command += [f"--http-port={http}", f"--grpc-port={mapping.port(8001)}",
                f"--metrics-port={mapping.port(8002)}"]
    environ = {"RUNTIME_DIRECTORY": str(mapping.runtime_root / "server")}
    health = [str(ENTRYPOINT), *healthcheck[1:], f"http://127.0.0.1:{http}/v2/health/ready"]
    assert subprocess.run(health, capture_output=True).returncode != 0  # nothing serves yet
    log = tmp_path / "server.log"
    process = _start(command, environ, log)
    try:
        _wait_for(f"http://127.0.0.1:{http}/v2/health/ready", process, log)
        assert subprocess.run(health, capture_output=True).returncode == 0
    finally:
        _stop(process, log)


def test_entrypoint_takes_tritonservers_own_command_line(tmp_path: Path) -> None:
    """KServe's Triton runtime's arguments, as they are (config/runtimes/
    kserve-tritonserver.yaml), with and without the program's name."""
    mapping = Mapping(tmp_path)
    triton = ["--model-store=/mnt/models", "--grpc-port=9000", "--http-port=8080",
              "--allow-grpc=true", "--allow-http=true", "--metrics-port=8002"]
    for form in (["tritonserver", *triton], triton):
        arguments = [mapping.argument(a) for a in form]
        log = tmp_path / "server.log"
        process = _start(arguments, {"RUNTIME_DIRECTORY": str(mapping.runtime_root / "s")}, log)
        try:
            _wait_for(f"http://127.0.0.1:{mapping.port(8080)}/v2/health/ready", process, log)
        finally:
            _stop(process, log)
