"""Triton's classification extension: an output asked for with ``classification: k`` is answered
as its top ``k`` entries, as BYTES strings ``"<value>:<index>[:<label>]"``.

For a batching model each batch entry is ranked on its own (shape ``[batch, k]``), otherwise the
whole output is (shape ``[k]``); ``k`` is cut to the number of entries. Labels come from the
output's ``label_filename`` in the model's folder, one per line, by index. Values print as
C++'s ``std::to_string`` prints them (``0.750000`` for a float), as Triton's do.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

# Triton's bound on the entries it ranks (TopkClassifications).
MAX_ENTRIES = 1_000_000
_UNSUPPORTED = {"float16": "FP16", "bool": "BOOL", "object": "BYTES"}


class ClassificationError(ValueError):
    """Triton's texts for an output that cannot be classified."""


def classify(values: np.ndarray, count: int, batching: bool,
             labels: Sequence[str] | None) -> np.ndarray:
    """The top ``count`` entries of ``values`` as a BYTES (object) array."""
    kind = values.dtype.kind
    if kind not in "iuf" or values.dtype == np.float16:
        name = _UNSUPPORTED.get(values.dtype.name, values.dtype.name.upper())
        raise ClassificationError(f"class result not available for output due to "
                                  f"unsupported type '{name}'")
    rows = values.reshape(values.shape[0], -1) if batching and values.ndim > 0 \
        else values.reshape(1, -1)
    entries = rows.shape[1]
    if entries > MAX_ENTRIES:
        raise ClassificationError("classification output tensor too large")
    top = min(count, entries)
    text = _float_text if kind == "f" else _int_text
    result = np.empty((rows.shape[0], top), dtype=np.object_)
    for row_index, row in enumerate(rows):
        for rank, index in enumerate(_descending(row)[:top]):
            entry = f"{text(row[index])}:{index}"
            if labels is not None and index < len(labels) and labels[index]:
                entry += f":{labels[index]}"
            result[row_index, rank] = entry.encode()
    return result if batching and values.ndim > 0 else result.reshape(top)


def _descending(row: np.ndarray) -> np.ndarray:
    """Indices from the largest value down; equal values keep their order."""
    if row.dtype == np.uint64:
        key = np.iinfo(np.uint64).max - row
    else:
        key = -row.astype(np.float64)
    return np.argsort(key, kind="stable")


def _float_text(value: Any) -> str:
    return f"{float(value):f}"


def _int_text(value: Any) -> str:
    return str(int(value))


class Labels:
    """The ``label_filename`` labels of a model's outputs, read once each."""

    def __init__(self, config: Mapping[str, Any], model_dir: str) -> None:
        self._files = {str(output.get("name")): str(output["label_filename"])
                       for output in config.get("output") or []
                       if output.get("label_filename")}
        self._model_dir = Path(model_dir)
        self._read: dict[str, list[str] | None] = {}

    def of(self, output: str) -> list[str] | None:
        if output not in self._read:
            filename = self._files.get(output)
            labels = None
            if filename is not None:
                try:
                    labels = (self._model_dir / filename).read_text().splitlines()
                except OSError:
                    labels = None
            self._read[output] = labels
        return self._read[output]
