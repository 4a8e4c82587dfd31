"""Tiny exported models: a real CifarNet artifact in milliseconds, for servers under test."""

from __future__ import annotations

from pathlib import Path

import torch

from cifar10_serving.model.export import build_metadata, export_torchscript
from cifar10_serving.model.network import CifarNet, NetConfig

TINY_WIDTHS = (4, 8, 8)  # fast on any CPU, still three pooled stages


def export_tiny(directory: Path, name: str, pool: str = "max", pool_size: int = 2, seed: int = 0,
                residual: bool = False, version: str = "test", filename: str | None = None) -> Path:
    """A randomly initialised tiny CifarNet, with BN statistics made non-trivial, exported as ``name``
    at ``version``, to ``directory / filename`` (default ``name.pt``)."""
    torch.manual_seed(seed)
    net = CifarNet(NetConfig(pool=pool, pool_size=pool_size, widths=TINY_WIDTHS, residual=residual))
    with torch.no_grad():  # a few batches in train mode give BN real running statistics
        net.train()
        for _ in range(3):
            net.logits(torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8))
        for module in net.modules():  # residual branches start with zero BN weights: wake them up
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
    net.eval()
    meta = build_metadata(net, name, version, validation={"images": 0, "accuracy": None})
    return export_torchscript(net, Path(directory) / (filename or f"{name}.pt"), meta)
