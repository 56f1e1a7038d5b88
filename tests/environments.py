"""Python environments for tests that need a package to be genuinely absent.

``python_without(module, target)`` answers an interpreter that cannot import ``module``: this
one when it already cannot, otherwise a fresh virtual environment at ``target`` whose
site-packages holds links to everything installed here except the files of the
distribution(s) that provide ``module``. Nothing is hidden by a flag or a path trick that the
code under test would have to cooperate with: ``import module`` fails there the way it fails
on a host where the package was never installed.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import sysconfig
from importlib.metadata import distributions
from pathlib import Path


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def _files_providing(module: str) -> set[Path]:
    marker = Path(*module.split("."))
    owned: set[Path] = set()
    for distribution in distributions():
        files = distribution.files or []
        if any(Path(str(file)).parts[:len(marker.parts)] == marker.parts for file in files):
            owned.update(Path(str(distribution.locate_file(file))).resolve() for file in files)
    return owned


def _mirror(source: Path, target: Path, owned: set[Path], partly_owned: set[Path]) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for entry in source.iterdir():
        resolved = entry.resolve()
        if resolved in owned:
            continue
        if resolved in partly_owned and entry.is_dir():
            _mirror(entry, target / entry.name, owned, partly_owned)
            if not any((target / entry.name).iterdir()):
                (target / entry.name).rmdir()     # e.g. the distribution's .dist-info
            continue
        (target / entry.name).symlink_to(entry)


def python_without(module: str, target: Path) -> str:
    """An interpreter in which ``import module`` fails (see the module docstring)."""
    if not _installed(module):
        return sys.executable
    owned = _files_providing(module)
    partly_owned = {parent for path in owned for parent in path.parents}
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(target)], check=True)
    paths = sysconfig.get_paths()
    for site in dict.fromkeys(Path(paths[key]) for key in ("purelib", "platlib")):
        _mirror(site, target / site.relative_to(sys.prefix), owned, partly_owned)
    return str(target / "bin" / "python")
