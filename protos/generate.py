"""Regenerate the committed protobuf Python code from protos/*.proto.

Usage (from the repository root)::

    python protos/generate.py          # rewrite protos/shmserve_*_pb2.py / .pyi
    python protos/generate.py --check  # exit 1, naming the stale files, if they differ

The .proto files are copied into a temporary tree as ``shmserve/protos/<name>.proto``
and compiled with ``grpc_tools.protoc`` against that root, so the generated imports
read ``from shmserve.protos import shmserve_model_config_pb2`` (the installed package
name) and the descriptors register under file names like
``shmserve/protos/shmserve_service.proto`` that cannot clash with tritonclient's
``grpc_service.proto`` / ``model_config.proto``. No *_grpc.py stubs are generated:
the server registers its method handlers by hand under the wire name
``inference.GRPCInferenceService``.

The output depends only on the .proto files and the grpcio-tools version (whose bundled
protoc stamps its version into the generated code), so it is deterministic.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

PROTOS_DIR = Path(__file__).resolve().parent
# Import path of protos/ once installed (pyproject maps shmserve.protos -> protos/).
PACKAGE_PATH = Path("shmserve", "protos")
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi")


def proto_files(protos_dir: Path = PROTOS_DIR) -> list[Path]:
    """The .proto sources, in a stable order."""
    return sorted(protos_dir.glob("shmserve_*.proto"))


def expected_outputs(protos_dir: Path = PROTOS_DIR) -> list[str]:
    """File names (relative to protos/) the generator produces."""
    return sorted(
        f"{proto.stem}{suffix}"
        for proto in proto_files(protos_dir)
        for suffix in GENERATED_SUFFIXES
    )


def protoc_version() -> str:
    """Version line of the protoc bundled with grpcio-tools, e.g. 'libprotoc 33.5'."""
    result = subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "--version"],
        check=True,
        capture_output=True,
        text=True,
    )
    return result.stdout.strip()


def generate(protos_dir: Path = PROTOS_DIR) -> dict[str, bytes]:
    """Compile the .proto files; return {file name relative to protos/: contents}.

    Runs protoc in a subprocess (``python -m grpc_tools.protoc``) so that importing this
    module never imports grpc_tools, and protoc's state stays out of the caller's process.
    """
    sources = proto_files(protos_dir)
    if not sources:
        raise FileNotFoundError(f"no shmserve_*.proto files in {protos_dir}")
    with tempfile.TemporaryDirectory(prefix="shmserve-protoc-") as tmp:
        root = Path(tmp)
        src_root = root / "src"
        out_root = root / "out"
        package_dir = src_root / PACKAGE_PATH
        package_dir.mkdir(parents=True)
        out_root.mkdir()
        for source in sources:
            shutil.copyfile(source, package_dir / source.name)
        relative_sources = [(PACKAGE_PATH / source.name).as_posix() for source in sources]
        command = [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{src_root}",
            f"--python_out={out_root}",
            f"--pyi_out={out_root}",
            *relative_sources,
        ]
        # cwd=src_root: protoc resolves the relative source paths against -I.
        result = subprocess.run(command, cwd=src_root, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(
                f"protoc failed (exit {result.returncode}):\n{result.stderr}{result.stdout}"
            )
        produced: dict[str, bytes] = {}
        for name in expected_outputs(protos_dir):
            path = out_root / PACKAGE_PATH / name
            if not path.is_file():
                raise RuntimeError(f"protoc did not produce {PACKAGE_PATH / name}")
            produced[name] = path.read_bytes()
        return produced


def stale_files(
    generated: dict[str, bytes], protos_dir: Path = PROTOS_DIR
) -> list[str]:
    """Names under protos/ that differ from ``generated``, are missing, or are orphans."""
    stale = [
        name
        for name, data in sorted(generated.items())
        if not (protos_dir / name).is_file() or (protos_dir / name).read_bytes() != data
    ]
    for suffix in GENERATED_SUFFIXES:
        for path in sorted(protos_dir.glob(f"shmserve_*{suffix}")):
            if path.name not in generated:
                stale.append(path.name)
    return stale


def write(generated: dict[str, bytes], protos_dir: Path = PROTOS_DIR) -> list[str]:
    """Write changed files, delete orphaned generated files; return what changed."""
    changed = stale_files(generated, protos_dir)
    for name in changed:
        path = protos_dir / name
        if name in generated:
            path.write_bytes(generated[name])
        else:
            path.unlink()
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check",
        action="store_true",
        help="do not write; exit 1 and list the stale files if the committed code differs",
    )
    args = parser.parse_args(argv)
    generated = generate()
    if args.check:
        stale = stale_files(generated)
        if stale:
            print(
                f"stale generated protobuf code ({protoc_version()}); "
                "run `python protos/generate.py`:",
                file=sys.stderr,
            )
            for name in stale:
                print(f"  protos/{name}", file=sys.stderr)
            return 1
        print("generated protobuf code is up to date")
        return 0
    changed = write(generated)
    for name in changed:
        print(f"wrote protos/{name}" if name in generated else f"removed protos/{name}")
    if not changed:
        print("generated protobuf code is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
