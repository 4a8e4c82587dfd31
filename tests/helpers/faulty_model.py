"""A real TorchScript model that misbehaves on marked images, for fault-injection tests.

``export_faulty`` wraps a tiny CifarNet in a scripted module with the same exported methods,
attributes and metadata, so the server loads it like any artifact (and freezes and optimises it
like any other). An image whose first four red pixels of the top row hold a marker makes the pass:

- ``POISON``: raise ``RuntimeError("poisoned input")``;
- ``HOG``: ask the allocator for 48 TiB, a real out-of-memory failure on any machine;
- ``SLOW`` with a fourth value n: do n units of extra work (one unit: a 1024 x 1024 matmul) and then
  answer normally; lets a test hold the model busy.
"""

# No "from __future__ import annotations": TorchScript reads the class annotations below.

from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from cifar10_serving.model.export import build_metadata, export_torchscript
from cifar10_serving.model.network import CifarNet, NetConfig

POISON = (1, 3, 3, 7)
HOG = (6, 6, 6, 6)
SLOW = (5, 5, 5)  # + units of work
WIDTHS = (4, 8, 8)


class FaultyNet(nn.Module):
    layer_names: List[str]

    def __init__(self, net: CifarNet) -> None:
        super().__init__()
        self.net = net
        self.config = net.config
        self.layer_names = net.layer_names

    def trouble(self, x: Tensor) -> Tensor:
        """Raises, allocates or works on marked images; returns 0, made from the work done so the
        optimiser cannot drop it."""
        extra = torch.zeros(1)
        heads = x[:, 0, 0, :4].to(torch.int64)
        for i in range(heads.shape[0]):
            head = heads[i]
            if bool(torch.equal(head, torch.tensor([1, 3, 3, 7]))):
                raise RuntimeError("poisoned input")
            if bool(torch.equal(head, torch.tensor([6, 6, 6, 6]))):
                # The size comes from the input: a constant one would be folded away when frozen.
                extra = extra + torch.empty([int(head[0]) << 43], dtype=torch.uint8)[:1].float()
            if bool(torch.equal(head[:3], torch.tensor([5, 5, 5]))):
                a = torch.full([1024, 1024], 1.0 / 1024)  # a fixed point of a @ a: no overflow however long
                for _ in range(int(head[3])):
                    a = a @ a
                extra = extra + a[:1, 0]
        return extra * 0.0

    def forward(self, x: Tensor) -> Tensor:
        extra = self.trouble(x)
        return self.net(x) + extra

    @torch.jit.export
    def forward_with_features(self, x: Tensor, layers: List[str]) -> Tuple[Tensor, Dict[str, Tensor]]:
        extra = self.trouble(x)
        probs, features = self.net.forward_with_features(x, layers)
        return probs + extra, features


def export_faulty(directory: Path, name: str = "faulty", seed: int = 0) -> Path:
    torch.manual_seed(seed)
    net = CifarNet(NetConfig(widths=WIDTHS)).eval()
    meta = build_metadata(net, name, "test", validation={"images": 0, "accuracy": None})
    return export_torchscript(FaultyNet(net), Path(directory) / f"{name}.pt", meta)


def marked(image: np.ndarray, marker: tuple[int, ...]) -> np.ndarray:
    """A copy of an H x W x 3 uint8 image carrying ``marker`` in its top row's red channel."""
    out = image.copy()
    out[0, : len(marker), 0] = marker
    return out
