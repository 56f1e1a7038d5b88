"""What the HTTP door's per-request work must not regress into (docs/performance.md, "Where
the HTTP door's time goes"): its response headers, joined from cached fragments, are exactly
the JSON they stand for. (Its answered requests freed by reference counting:
tests/test_door_cycles.py, with the other doors.)"""

from __future__ import annotations

import json

import numpy as np
import pytest

from shmserve.daemon.errors import ServeError
from shmserve.daemon.frontend.http_infer import json_tensor_bytes, render_response
from shmserve.daemon.reply import Reply
from shmserve.daemon.request import InferRequest, OutputTensor, RequestedOutput


def _request(model: str, version: int, request_id: str,
             outputs: list[RequestedOutput]) -> InferRequest:
    return InferRequest(model, version, request_id, [], outputs, 1, Reply())


@pytest.mark.parametrize("model,name,request_id", [
    ("simple", "OUTPUT0", ""),
    ('qu"oted', "back\\slash", "id-1"),
    ("ünïcode", "new\nline", 'i"d'),
])
def test_response_header_is_its_json(model: str, name: str, request_id: str) -> None:
    outputs = [OutputTensor(name, "INT32", [1, 4], np.arange(4, dtype=np.int32).tobytes()),
               OutputTensor(name + "2", "FP32", [2, 2], np.ones(4, np.float32).tobytes()),
               OutputTensor("in_region", "INT32", [0], None),
               OutputTensor("text", "BYTES", [], b"\x02\x00\x00\x00h\xc3")]
    request = _request(model, 3, request_id, [])
    head, parts = render_response(request, outputs, lambda output, _: output == name)
    expected: dict[str, object] = {"model_name": model, "model_version": "3", "outputs": [
        {"name": name, "datatype": "INT32", "shape": [1, 4],
         "parameters": {"binary_data_size": 16}},
        {"name": name + "2", "datatype": "FP32", "shape": [2, 2], "data": [1.0] * 4},
        {"name": "in_region", "datatype": "INT32", "shape": [0]},  # written to a region
        {"name": "text", "datatype": "BYTES", "shape": [], "data": ["h\ufffd"]}]}
    if request_id:
        expected["id"] = request_id
    assert head == json.dumps(expected, separators=(",", ":")).encode()
    assert [bytes(part) for part in parts] == [np.arange(4, dtype=np.int32).tobytes()]
    # The second time (fragments cached) says the same.
    assert render_response(request, outputs, lambda output, _: output == name)[0] == head


def test_response_without_outputs() -> None:
    head, parts = render_response(_request("m", 1, "", []), [], lambda *_: True)
    assert json.loads(head) == {"model_name": "m", "model_version": "1", "outputs": []}
    assert head == b'{"model_name":"m","model_version":"1","outputs":[]}'
    assert parts == []


@pytest.mark.parametrize("datatype,data,expected", [
    ("INT32", [[1, 2], [3, 4]], np.array([1, 2, 3, 4], np.int32).tobytes()),
    ("INT32", [[1, [2]], 3, [[4]]], np.array([1, 2, 3, 4], np.int32).tobytes()),  # uneven
    ("FP32", [1, 2.5, [3], 4], np.array([1, 2.5, 3, 4], np.float32).tobytes()),
    ("BOOL", [[True], [False, True, False]], np.array([1, 0, 1, 0], np.bool_).tobytes()),
    ("INT32", [1, 2, True, 4], None),     # a bool is not an integer
    ("INT32", [1, 2, 3.0, 4], None),      # nor is a float
    ("BOOL", [True, 1, False, True], None),
    ("FP32", [1.0, None, 2.0, 3.0], None),
    ("BYTES", [["a", "b"], ["c", 1]], None),
])
def test_json_tensor_values(datatype: str, data: object, expected: bytes | None) -> None:
    if expected is None:
        with pytest.raises(ServeError, match="'data' of"):
            json_tensor_bytes("x", datatype, [4], data, "m")
    else:
        assert json_tensor_bytes("x", datatype, [4], data, "m") == expected
