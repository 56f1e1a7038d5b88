"""Small ONNX test models built with the ``onnx`` package's helpers (no .onnx is committed).

Import only after ``pytest.importorskip("onnx")``. Each builder returns a ModelProto;
:func:`write_model` puts one into ``<repo>/<name>/1/model.onnx`` with an optional config.pbtxt.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
W1 = (np.arange(32, dtype=np.float32).reshape(4, 8) - 16) / 10
B1 = np.linspace(-1, 1, 8, dtype=np.float32)
W2 = (np.arange(24, dtype=np.float32).reshape(8, 3) - 12) / 10
B2 = np.array([0.5, -0.5, 1.0], dtype=np.float32)


def _model(nodes: list[onnx.NodeProto], inputs: list[onnx.ValueInfoProto],
           outputs: list[onnx.ValueInfoProto],
           initializers: list[onnx.TensorProto] | None = None) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializers or [])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8          # readable by every onnxruntime >= 1.17
    onnx.checker.check_model(model)
    return model


def mlp(batch: int | str = "N") -> onnx.ModelProto:
    """Y = relu(X @ W1 + B1) @ W2 + B2; X [batch, 4] -> Y [batch, 3]."""
    return _model(
        [helper.make_node("MatMul", ["X", "W1"], ["h0"]), helper.make_node("Add", ["h0", "B1"],
                                                                        ["h1"]),
         helper.make_node("Relu", ["h1"], ["h2"]), helper.make_node("MatMul", ["h2", "W2"],
                                                                     ["h3"]),
         helper.make_node("Add", ["h3", "B2"], ["Y"])],
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [batch, 4])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [batch, 3])],
        [numpy_helper.from_array(W1, "W1"), numpy_helper.from_array(B1, "B1"),
         numpy_helper.from_array(W2, "W2"), numpy_helper.from_array(B2, "B2")])


def mlp_reference(x: np.ndarray) -> np.ndarray:
    return np.asarray(np.maximum(x @ W1 + B1, 0) @ W2 + B2, dtype=np.float32)


def multi_io() -> onnx.ModelProto:
    """A, B FP32 [N,4], C INT32 [N,2] -> SUM = A+B, DIFF = A-B, TWICE = C*2."""
    return _model(
        [helper.make_node("Add", ["A", "B"], ["SUM"]), helper.make_node("Sub", ["A", "B"],
                                                                         ["DIFF"]),
         helper.make_node("Mul", ["C", "two"], ["TWICE"])],
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["N", 4]),
         helper.make_tensor_value_info("B", TensorProto.FLOAT, ["N", 4]),
         helper.make_tensor_value_info("C", TensorProto.INT32, ["N", 2])],
        [helper.make_tensor_value_info("SUM", TensorProto.FLOAT, ["N", 4]),
         helper.make_tensor_value_info("DIFF", TensorProto.FLOAT, ["N", 4]),
         helper.make_tensor_value_info("TWICE", TensorProto.INT32, ["N", 2])],
        [numpy_helper.from_array(np.array([2], dtype=np.int32), "two")])


def strings() -> onnx.ModelProto:
    """S STRING [N] -> T (the same strings)."""
    return _model([helper.make_node("Identity", ["S"], ["T"])],
                  [helper.make_tensor_value_info("S", TensorProto.STRING, ["N"])],
                  [helper.make_tensor_value_info("T", TensorProto.STRING, ["N"])])


def identity_like(dims: tuple[int | str, ...] = ("N", "D")) -> onnx.ModelProto:
    """Y = X + 0 (an elementwise op that writes every output byte): the large-tensor model."""
    return _model([helper.make_node("Add", ["X", "zero"], ["Y"])],
                  [helper.make_tensor_value_info("X", TensorProto.FLOAT, list(dims))],
                  [helper.make_tensor_value_info("Y", TensorProto.FLOAT, list(dims))],
                  [numpy_helper.from_array(np.zeros([1], np.float32), "zero")])


def flatten_unknown() -> onnx.ModelProto:
    """X [N,4] -> Y = X flattened, declared [K]: a shape known only after the run."""
    return _model([helper.make_node("Reshape", ["X", "flat"], ["Y"])],
                  [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 4])],
                  [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["K"])],
                  [numpy_helper.from_array(np.array([-1], dtype=np.int64), "flat")])



def sequence_controls() -> onnx.ModelProto:
    """A sequence model: OUTPUT = INPUT + 1000 * START + 10 * READY and CORRID_SEEN = CORRID
    (its control inputs, [N, 1] each)."""
    int32 = [helper.make_tensor_value_info(name, TensorProto.INT32, ["N", 1])
             for name in ("INPUT", "START", "READY")]
    corrid = helper.make_tensor_value_info("CORRID", TensorProto.UINT64, ["N", 1])
    return _model(
        [helper.make_node("Mul", ["START", "thousand"], ["started"]),
         helper.make_node("Mul", ["READY", "ten"], ["readied"]),
         helper.make_node("Add", ["INPUT", "started"], ["partial"]),
         helper.make_node("Add", ["partial", "readied"], ["OUTPUT"]),
         helper.make_node("Identity", ["CORRID"], ["CORRID_SEEN"])],
        [*int32, corrid],
        [helper.make_tensor_value_info("OUTPUT", TensorProto.INT32, ["N", 1]),
         helper.make_tensor_value_info("CORRID_SEEN", TensorProto.UINT64, ["N", 1])],
        [numpy_helper.from_array(np.array(1000, np.int32), "thousand"),
         numpy_helper.from_array(np.array(10, np.int32), "ten")])


def accumulator_state() -> onnx.ModelProto:
    """Implicit state: OUTPUT = INPUT + STATE_IN, and STATE_OUT the same ([N, 1] INT32)."""
    tensors = [helper.make_tensor_value_info(name, TensorProto.INT32, ["N", 1])
               for name in ("INPUT", "STATE_IN", "OUTPUT", "STATE_OUT")]
    return _model([helper.make_node("Add", ["INPUT", "STATE_IN"], ["OUTPUT"]),
                   helper.make_node("Identity", ["OUTPUT"], ["STATE_OUT"])],
                  tensors[:2], tensors[2:])

def write_model(repository: Path, name: str, model: onnx.ModelProto,
                config: str | None = None, filename: str = "model.onnx") -> Path:
    """``<repository>/<name>/1/<filename>`` and, when given, ``config.pbtxt``."""
    version = repository / name / "1"
    version.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(version / filename))
    if config is not None:
        (repository / name / "config.pbtxt").write_text(config)
    return repository / name
