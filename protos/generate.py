"""Regenerate the Python code for the .proto files: ``python -m protos.generate [--out DIR]``.

Run from anywhere; paths are resolved against the repository root so the generated imports read
``from protos.cifar10.v1 import classifier_pb2``. ``tests/test_protos.py`` fails when the committed
code differs from what this produces (grpcio-tools is pinned in pyproject.toml for that reason).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTOS = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "protos").rglob("*.proto"))


def generate(out: Path) -> list[Path]:
    from grpc_tools import protoc

    out.mkdir(parents=True, exist_ok=True)
    args = ["grpc_tools.protoc", f"-I{ROOT}", f"--python_out={out}", f"--pyi_out={out}", f"--grpc_python_out={out}"]
    if protoc.main([*args, *PROTOS]) != 0:
        raise RuntimeError(f"protoc failed on {PROTOS}")
    return sorted(p for p in out.rglob("*_pb2*.py*"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m protos.generate", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT, help="output root (default: the repository)")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path, file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
