"""Figures for the model card, measured from the shipped artifacts themselves.

    python -m model.card                       # every model/artifacts/*.pt, CPU, 2 threads
    python -m model.card --data ../shared/datasets/cifar10-jpeg/train.tar.gz

For each artifact: parameters, FLOPs per image, file size, the validation accuracy stored in its
metadata and the same figure re-computed now by loading the file with ``torch.jit.load`` alone and
scoring the same seeded validation split, and raw CPU throughput at batch 1 and 64 (frozen, as the
server serves it). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import torch

from cifar10_serving.model.data import DEFAULT_DATA, REPO, load_training_set, validation_split
from cifar10_serving.model.export import load_scripted
from cifar10_serving.protos import artifact


def load(path: Path):
    module, metadata = load_scripted(path)
    return module.eval(), metadata


def as_served(module: torch.jit.ScriptModule) -> torch.jit.ScriptModule:
    """Frozen like the server's ``optimize_for_serving`` (batch norm folded into the convolutions),
    keeping the names the format exports. (The server also saves and reloads the frozen module, for its
    error messages rather than for speed; the model package does not import the server.)"""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.freeze(module, preserved_attrs=list(artifact.EXPORTED_NAMES))


def throughput(module, batch: int, seconds: float = 3.0) -> float:
    x = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8)
    with torch.inference_mode():
        for _ in range(3):
            module(x)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            module(x)
            n += 1
    return batch * n / (time.perf_counter() - t0)


@torch.inference_mode()
def accuracy(module, images: torch.Tensor, labels: torch.Tensor) -> float:
    correct = 0
    for start in range(0, len(images), 500):
        correct += (module(images[start : start + 500]).argmax(1) == labels[start : start + 500]).sum().item()
    return correct / len(images)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m model.card", description=__doc__.split("\n")[0])
    p.add_argument("artifacts", nargs="*", type=Path, help="default: model/artifacts/*.pt")
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--cache-dir", default=str(REPO / ".cache"))
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    paths = args.artifacts or sorted((REPO / "model" / "artifacts").glob("*.pt"))
    data = load_training_set(args.data, cache_dir=args.cache_dir)
    rows = []
    for path in paths:
        module, meta = load(path)
        validation = meta.get("validation") or {}
        _, val_idx = validation_split(data.labels, validation.get("images", 5000) // 10 or 500,
                                      validation.get("split_seed", 0))
        measured = accuracy(module, data.images[val_idx], data.labels[val_idx])
        served = as_served(module)
        training = meta.get("training", {})
        rows.append({
            "model": meta["name"], "pooling": f"{meta['pooling']['kind']} {meta['pooling']['window']}",
            "params": meta["parameters"], "mflop": meta["flops_per_image"] / 1e6,
            "mb": path.stat().st_size / 1e6, "val_meta": validation.get("accuracy"),
            "val_now": measured, "val_tta": validation.get("accuracy_flip_tta"),
            "b1": throughput(served, 1), "b64": throughput(served, 64),
            "train_s": training.get("seconds"), "hardware": training.get("hardware"),
            "command": training.get("command"), "data": meta.get("dataset", {}).get("source"),
        })
    print("| model | pooling | params | MFLOP/img | file MB | val acc (metadata) | val acc (re-run) | "
          "val acc flip-TTA | CPU img/s b1 | CPU img/s b64 | training |")
    print("|" + " --- |" * 11)
    for r in rows:
        print(f"| {r['model']} | {r['pooling']} | {r['params']:,} | {r['mflop']:.1f} | {r['mb']:.2f} | "
              f"{100 * r['val_meta']:.2f}% | {100 * r['val_now']:.2f}% | {100 * (r['val_tta'] or 0):.2f}% | "
              f"{r['b1']:.0f} | {r['b64']:.0f} | {r['train_s'] / 60:.0f} min, {r['hardware']} |")
    for r in rows:
        print(f"\n{r['model']}: `{r['command']}` (data: {r['data']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
