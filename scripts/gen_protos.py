"""Regenerate the Python stubs of the peftserve contract (``make protos``).

Runs grpcio-tools' bundled protoc with the mypy-protobuf plugins, so the output depends only on
pinned Python packages and the ``.proto`` files. The drift test calls ``generate`` into a
temporary directory and compares with the committed files.
"""

from __future__ import annotations

import argparse
import importlib.resources
import sys
from pathlib import Path

from grpc_tools import protoc

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO_ROOT / "protos"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")
# Well-known types (google/protobuf/timestamp.proto) ship inside grpcio-tools, not on the system.
WELL_KNOWN_ROOT = Path(str(importlib.resources.files("grpc_tools") / "_proto"))


def proto_files() -> list[Path]:
    return sorted((PROTO_ROOT / "peftserve" / "v1").glob("*.proto"))


def generate(out_dir: Path) -> list[Path]:
    """Write the generated modules under ``out_dir`` and return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    protos = [str(p.relative_to(PROTO_ROOT)) for p in proto_files()]
    # The mypy-protobuf plugins live next to this interpreter; name them explicitly so generation
    # works without the virtualenv's bin/ on PATH (as in `.venv/bin/python -m pytest`).
    bin_dir = Path(sys.executable).parent
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{WELL_KNOWN_ROOT}",
        f"--plugin=protoc-gen-mypy={bin_dir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bin_dir / 'protoc-gen-mypy_grpc'}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--mypy_out={out_dir}",
        f"--mypy_grpc_out={out_dir}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    return sorted(
        p for p in out_dir.rglob("*") if p.is_file() and p.name.endswith(GENERATED_SUFFIXES)
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "client" / "generated")
    args = parser.parse_args()
    for path in generate(args.out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
