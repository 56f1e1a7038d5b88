"""TorchScript test models, built by the tests into a temporary repository (no .pt is committed).

Import this module only after ``pytest.importorskip("torch")``. Each ``pt_*`` folder in
tests/models holds the config.pbtxt; :func:`build_pt_repository` copies the folders and writes
``<version>/model.pt`` with ``torch.jit.script``.
"""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from shmserve.tests.serverproc import TEST_MODELS


class Linear(torch.nn.Module):
    """y = x @ W + b with fixed W (4x3) and b (3)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(
            torch.arange(12, dtype=torch.float32).reshape(4, 3) / 10, requires_grad=False)
        self.bias = torch.nn.Parameter(torch.tensor([1.0, 2.0, 3.0]), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias


class Named(torch.nn.Module):
    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x + bias, x - bias


class BatchProbe(torch.nn.Module):
    """(x * 2, the batch size forward saw, one per row)."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = x.shape[0]
        return x * 2, torch.full([rows, 1], rows, dtype=torch.int64, device=x.device)


class Simple(torch.nn.Module):
    """Triton's "simple" model with the tensor names as forward arguments."""

    def forward(self, INPUT0: torch.Tensor,
                INPUT1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return INPUT0 + INPUT1, INPUT0 - INPUT1


class InPlace(torch.nn.Module):
    """Adds 1 to its input in place; returns a copy and the CUDA device index it ran on."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x.add_(1)
        index = -1
        device_index = x.device.index
        if device_index is not None:
            index = device_index
        return x.clone(), torch.tensor([index], dtype=torch.int64)


class DictOutputs(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"double": x * 2, "negative": -x}


class Strings(torch.nn.Module):
    """List[str] in, List[str] out (Triton's TYPE_STRING convention for TorchScript)."""

    def forward(self, words: list[str]) -> list[str]:
        return [word.upper() for word in words]


class Fails(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool(x.sum() < 0):
            raise RuntimeError("negative input")
        return x


class SumRows(torch.nn.Module):
    """Drops the batch dimension: not a valid output of a batching model."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.sum(dim=0)


class SequenceAccumulator(torch.nn.Module):
    """A sequence model with implicit state (tests/models/pt_sequence): the sum so far."""

    def forward(self, INPUT__0: torch.Tensor, START__1: torch.Tensor, STATE_IN__2: torch.Tensor,
                CORRID__3: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        total = INPUT__0 + STATE_IN__2
        return total, START__1.clone(), total, CORRID__3.clone()


class WrongDtype(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.double()


MODELS: dict[str, Callable[[], torch.nn.Module]] = {
    "pt_linear": Linear,
    "pt_named": Named,
    "pt_batching": BatchProbe,
    "pt_bad_inputs": Named,
    "pt_gpu_kind": Linear,
    "pt_simple": Simple,
    "pt_inplace": InPlace,
    "pt_sequence": SequenceAccumulator,
}


def save_scripted(module: torch.nn.Module, path: Path) -> Path:
    """``torch.jit.script`` + save (TorchScript is deprecated in new torch; it still works)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)  # torch >= 2.10 says so
        torch.jit.save(torch.jit.script(module), str(path))
    return path


def save_traced(module: torch.nn.Module, example: torch.Tensor, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)  # torch >= 2.10 says so
        torch.jit.save(torch.jit.trace(module, example), str(path))  # type: ignore[no-untyped-call]
    return path


def build_pt_repository(target: Path, names: Iterable[str], version: int = 1) -> Path:
    """Copy tests/models/<name> for each name and write its TorchScript ``<version>/model.pt``.

    Names without a module in :data:`MODELS` (e.g. pt_missing_file) get an empty version folder.
    """
    target.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copytree(TEST_MODELS / name, target / name)
        version_dir = target / name / str(version)
        version_dir.mkdir(parents=True, exist_ok=True)
        factory = MODELS.get(name)
        if factory is not None:
            save_scripted(factory(), version_dir / "model.pt")
    return target
