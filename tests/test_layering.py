"""Each door holds the core and nothing of another door (checked on the sources' imports)."""

from __future__ import annotations

import ast
from pathlib import Path

FRONTEND = Path(__file__).parent.parent / "daemon" / "frontend"
# door -> its modules in daemon/frontend (BLS requests come through the local door: its
# channels opened on workers' sockets, bls.py)
DOORS = {"grpc": {"service", "infer_grpc", "wire"}, "local": {"local", "local_fds", "bls"},
         "http": {"http", "http_infer"}}
NEVER = {"shmserve.daemon.worker_process", "shmserve.daemon.scheduler",
         "shmserve.daemon.dispatcher"}


def _imports(module: str) -> set[str]:
    tree = ast.parse((FRONTEND / f"{module}.py").read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_every_frontend_module_belongs_to_a_door() -> None:
    modules = {p.stem for p in FRONTEND.glob("*.py")} - {"__init__"}
    assert modules == set().union(*DOORS.values())


def test_no_door_imports_another_door_or_the_worker_side() -> None:
    for door, modules in DOORS.items():
        others = {f"shmserve.daemon.frontend.{m}" for d, ms in DOORS.items() if d != door
                  for m in ms}
        for module in modules:
            imported = _imports(module)
            assert not imported & others, f"{module}.py imports another door"
            assert not imported & NEVER, f"{module}.py reaches past the core"
            assert "shmserve.daemon.core" in imported or module in ("infer_grpc", "wire",
                                                                     "http_infer")


def test_the_supervisor_never_imports_a_framework() -> None:
    """Framework packages (optional extras) are imported by workers only: no daemon module
    names them (tests/test_onnx_backend.py also checks the running supervisor's mappings)."""
    frameworks = {"onnxruntime", "onnx", "torch", "nvidia.dali"}
    for path in (FRONTEND.parent).rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) and node.module
                     else [])
            for name in names:
                assert not any(name == f or name.startswith(f + ".") for f in frameworks), \
                    f"{path.name} imports {name}"
