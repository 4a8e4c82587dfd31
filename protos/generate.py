"""Regenerate the Python code for the .proto files: ``python -m protos.generate [--out DIR]``.

Run from anywhere; paths are resolved against the repository root. protoc writes absolute imports
from the include root (``from protos.cifar10.v1 import classifier_pb2``); they are made relative
(``from . import classifier_pb2``) so the code works under whatever package name it is installed as
(``cifar10_serving.protos``). ``tests/test_protos.py`` fails when the committed code differs from what
this produces (grpcio-tools is pinned in pyproject.toml for that reason).
"""

from __future__ import annotations

import argparse
import re
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
    # Only what protoc wrote: the output root may be the repository, whose .cache/ can hold whole
    # virtual environments (their own *_pb2.py files and bytecode).
    generated = sorted(p for p in (out / "protos").rglob("*_pb2*.py*") if p.suffix in (".py", ".pyi"))
    for path in generated:
        path.write_text(_relative_imports(path.read_text(), path.parent.relative_to(out).as_posix()))
    return generated


def _relative_imports(code: str, package_dir: str) -> str:
    """``from protos.cifar10.v1 import x`` -> ``from . import x``, for modules of the same package."""
    package = re.escape(package_dir.replace("/", "."))
    return re.sub(rf"^from {package} import ", "from . import ", code, flags=re.MULTILINE)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m protos.generate", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT, help="output root (default: the repository)")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path, file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
