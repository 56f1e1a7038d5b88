"""Triton's classification extension: an output requested with ``class_count`` (tritonclient's
name for the ``classification`` parameter) is answered as its top entries, "value:index:label",
over gRPC and HTTP, through the supervisor and through frontend processes."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from shmserve.protos import shmserve_service_pb2 as pb
from shmserve.tests.conftest import GRPC_FRONTENDS, frontends_id
from shmserve.tests.serverproc import ServerProcess, build_repository
from shmserve.workers.classification import ClassificationError, classify

IDENTITY_PY = """
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        return [pb_utils.InferenceResponse([pb_utils.Tensor(
            "OUT", pb_utils.get_input_tensor_by_name(r, "IN").as_numpy())]) for r in requests]
"""
# (name, max_batch_size, datatype, dims, labels)
MODELS = [("scores", 4, "TYPE_FP32", "[ 5 ]", ["cat", "dog", "bird", "fish", "frog"]),
          ("counts", 0, "TYPE_INT32", "[ -1 ]", None)]
LABELS = MODELS[0][4]


def _write_models(repo: Path) -> None:
    for name, max_batch_size, datatype, dims, labels in MODELS:
        folder = repo / name
        (folder / "1").mkdir(parents=True)
        (folder / "1" / "model.py").write_text(IDENTITY_PY)
        label = ' label_filename: "labels.txt"' if labels else ""
        (folder / "config.pbtxt").write_text(
            f'backend: "python"\nmax_batch_size: {max_batch_size}\n'
            f'input [ {{ name: "IN" data_type: {datatype} dims: {dims} }} ]\n'
            f'output [ {{ name: "OUT" data_type: {datatype} dims: {dims}{label} }} ]\n')
        if labels:
            (folder / "labels.txt").write_text("\n".join(labels) + "\n")


@pytest.fixture(scope="module", params=GRPC_FRONTENDS, ids=frontends_id)
def server(tmp_path_factory: pytest.TempPathFactory,
           request: pytest.FixtureRequest) -> Iterator[ServerProcess]:
    repo = build_repository(tmp_path_factory.mktemp("classification") / "repo",
                            ["string_upper"])
    _write_models(repo)
    with ServerProcess(repo, "--grpc-frontends", str(request.param)) as process:
        process.wait_ready()
        yield process


# --- the ranking itself -------------------------------------------------------------------------

def test_top_entries_as_value_index_label() -> None:
    scores = np.array([[0.1, 0.7, 0.2, 0.7, 0.0]], np.float32)
    assert classify(scores, 3, True, LABELS).tolist() == [
        [b"0.700000:1:dog", b"0.700000:3:fish", b"0.200000:2:bird"]]  # ties: lower index first
    assert classify(scores[0], 2, False, None).tolist() == [b"0.700000:1", b"0.700000:3"]


def test_each_batch_entry_is_ranked_on_its_own_and_k_is_cut() -> None:
    values = np.array([[3, 1, 2], [-5, 9, 0]], np.int32)
    assert classify(values, 10, True, ["a", "b"]).tolist() == [
        [b"3:0:a", b"2:2", b"1:1:b"], [b"9:1:b", b"0:2", b"-5:0:a"]]
    assert classify(values, 2, False, None).tolist() == [b"9:4", b"3:0"]


def test_unsigned_values_rank_without_overflow() -> None:
    values = np.array([0, 2**64 - 1, 7], np.uint64)
    assert classify(values, 3, False, None).tolist() == [
        f"{2**64 - 1}:1".encode(), b"7:2", b"0:0"]


@pytest.mark.parametrize(("values", "name"), [(np.array(["a"], np.object_), "BYTES"),
                                              (np.array([1.0], np.float16), "FP16"),
                                              (np.array([True]), "BOOL")])
def test_types_without_an_order_are_refused(values: np.ndarray, name: str) -> None:
    with pytest.raises(ClassificationError) as caught:
        classify(values, 1, False, None)
    assert str(caught.value) == (f"class result not available for output due to unsupported "
                                 f"type '{name}'")


# --- through the doors --------------------------------------------------------------------------

def _grpc_scores(server: ServerProcess, data: np.ndarray, class_count: int) -> np.ndarray:
    client = grpcclient.InferenceServerClient(server.url)
    tensor = grpcclient.InferInput("IN", list(data.shape), "FP32")
    tensor.set_data_from_numpy(data)
    result = client.infer("scores", [tensor],
                          outputs=[grpcclient.InferRequestedOutput("OUT", class_count=class_count)])
    described = result.get_output("OUT")
    assert described.datatype == "BYTES"
    return result.as_numpy("OUT")


def test_grpc_classification_with_labels_per_batch_entry(server: ServerProcess) -> None:
    assert "classification" in grpcclient.InferenceServerClient(
        server.url).get_server_metadata().extensions
    data = np.array([[0.1, 0.5, 0.2, 0.9, 0.3], [1, 0, 0, 0, 2]], np.float32)
    got = _grpc_scores(server, data, 2)
    assert got.shape == (2, 2)
    assert got.tolist() == [[b"0.900000:3:fish", b"0.500000:1:dog"],
                            [b"2.000000:4:frog", b"1.000000:0:cat"]]


def test_http_classification_json_and_binary(server: ServerProcess) -> None:
    client = httpclient.InferenceServerClient(server.http_url)
    tensor = httpclient.InferInput("IN", [7], "INT32")
    tensor.set_data_from_numpy(np.array([4, 8, 1, 8, 0, 3, 2], np.int32))
    for binary in (True, False):
        result = client.infer("counts", [tensor], outputs=[
            httpclient.InferRequestedOutput("OUT", binary_data=binary, class_count=3)])
        assert result.get_output("OUT")["datatype"] == "BYTES"
        assert result.get_output("OUT")["shape"] == [3]
        assert [bytes(v) if not isinstance(v, str) else v.encode()
                for v in result.as_numpy("OUT").tolist()] == [b"8:1", b"8:3", b"4:0"]


def _raw_grpc_error(server: ServerProcess, parameters: dict[str, Any]) -> grpc.RpcError:
    """ModelInfer for `scores` whose output OUT has ``parameters`` (tritonclient itself refuses
    some of these combinations before sending them)."""
    request = pb.ModelInferRequest(model_name="scores")
    request.inputs.add(name="IN", datatype="FP32", shape=[1, 5])
    request.raw_input_contents.append(np.zeros(5, np.float32).tobytes())
    output = request.outputs.add(name="OUT")
    for key, value in parameters.items():
        if isinstance(value, str):
            output.parameters[key].string_param = value
        else:
            output.parameters[key].int64_param = value
    with grpc.insecure_channel(server.url) as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                                   request_serializer=pb.ModelInferRequest.SerializeToString,
                                   response_deserializer=pb.ModelInferResponse.FromString)
        with pytest.raises(grpc.RpcError) as caught:
            call(request, timeout=20)
    return caught.value


def test_classification_errors_use_tritons_texts(server: ServerProcess) -> None:
    client = grpcclient.InferenceServerClient(server.url)
    tensor = grpcclient.InferInput("TEXT", [1, 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[b"a"]], np.object_))
    with pytest.raises(InferenceServerException) as caught:
        client.infer("string_upper", [tensor],
                     outputs=[grpcclient.InferRequestedOutput("UPPER", class_count=1)])
    assert "class result not available for output due to unsupported type 'BYTES'" in \
        caught.value.message()
    in_region = {"classification": 1, "shared_memory_region": "anywhere",
                 "shared_memory_byte_size": 20}
    for parameters, text in (
            (in_region, "output can't set both 'shared_memory_region' and 'classification'"),
            ({"classification": 0}, "invalid value for 'classification' parameter, expected "
                                    ">= 0"),
            ({"classification": "3"}, "invalid value type for 'classification' parameter, "
                                      "expected int64_param")):
        error = _raw_grpc_error(server, parameters)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error.details() == text
    body = json.dumps({"inputs": [{"name": "IN", "datatype": "FP32", "shape": [1, 5],
                                   "data": [0, 0, 0, 0, 0]}],
                       "outputs": [{"name": "OUT", "parameters": in_region}]}).encode()
    with pytest.raises(urllib.error.HTTPError) as http_error:
        urllib.request.urlopen(urllib.request.Request(
            f"http://{server.http_url}/v2/models/scores/infer", data=body, method="POST"),
            timeout=20)
    assert http_error.value.code == 400
    assert json.loads(http_error.value.read()) == {
        "error": "Output can't set both 'shared_memory_region' and 'classification'"}
    # The server and the model are unaffected.
    assert _grpc_scores(server, np.eye(5, dtype=np.float32)[2:3], 1).tolist() == [
        [b"1.000000:2:bird"]]
