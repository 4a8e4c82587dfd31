"""Compile exported models ahead of time: ``python -m model.compile model/artifacts/*.pt``.

Writes ``NAME.pt2`` beside each ``NAME.pt``: the same network compiled with ``torch.export`` and
AOTInductor for this machine's CPU, with the ``.pt``'s metadata and its sha256 (format in
``protos/artifact.py``). The server serves the package where it is faster, for passes of
``--compiled-min-batch`` images or more (``--compiled-min-batch-wide`` on more than one thread), and
the ``.pt`` for the rest, explanations and filters (docs/compiled.md). Needs a C++ compiler (how
long it takes: model/README.md, "Compiling ahead of time"). A package compiled on one machine runs on another only with the same vector instructions and the same torch;
the server checks both and refuses it otherwise.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from cifar10_serving.model.export import COMPILED_MAX_BATCH, export_compiled, load_eager
from cifar10_serving.protos import artifact

log = logging.getLogger("model.compile")


def compile_artifact(source: str | Path, out: str | Path | None = None, max_batch: int = COMPILED_MAX_BATCH) -> Path:
    """Compiles the artifact at ``source`` into ``out`` (default: beside it, ``.pt2``)."""
    source = Path(source)
    net, metadata = load_eager(source)  # quiet about TorchScript's deprecation, as every loader here is
    return export_compiled(net, out or source.with_suffix(artifact.COMPILED_SUFFIX), metadata, source, max_batch)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m model.compile", description=__doc__.splitlines()[0])
    p.add_argument("artifacts", nargs="+", help="exported *.pt files; each gets a .pt2 beside it")
    p.add_argument("--max-batch", type=int, default=COMPILED_MAX_BATCH,
                   help="largest batch the package runs (the server's --max-batch-size; larger passes run the .pt)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("torch").setLevel(logging.ERROR)
    for source in args.artifacts:
        t0 = time.perf_counter()
        out = compile_artifact(source, max_batch=args.max_batch)
        log.info("%s: %.1f MB in %.0f s", out, out.stat().st_size / 1e6, time.perf_counter() - t0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
