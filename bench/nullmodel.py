"""A do-nothing model: an artifact of the project's format with the real model's input and output
shapes and almost no compute, so that a server running it spends its CPU on everything but the model.

``export_null(directory)`` writes ``null.pt``: uint8 N x 3 x 32 x 32 in, ten softmax scores out (the
softmax of the first ten red pixels of each image's top row: cheap, but made from the input, so no
optimiser can fold the pass away). Two named layers, ``corner`` (those ten pixels) and ``fc`` (the
scores before softmax: the same ten values), so feature requests work; no weights. ``forward`` is
three tensor ops on its own (half the time of going through ``forward_with_features``): as little
model as a server can be given. ``bench.overhead`` reports what it still costs.
"""

# No "from __future__ import annotations": TorchScript reads the class annotations below.

from pathlib import Path
from typing import Dict, List, Tuple

import torch
from torch import Tensor, nn

from cifar10_serving.model.data import CLASSES
from cifar10_serving.model.export import export_torchscript
from cifar10_serving.protos import artifact

NAME = "null"
INPUT_SHAPE = (3, 32, 32)  # the real models' (C, H, W)


class NullNet(nn.Module):
    layer_names: List[str]

    def __init__(self) -> None:
        super().__init__()
        self.layer_names = ["corner", "fc"]

    def forward(self, x: Tensor) -> Tensor:
        return torch.softmax(x[:, 0, 0, :10].float(), dim=1)

    @torch.jit.export
    def forward_with_features(self, x: Tensor, layers: List[str]) -> Tuple[Tensor, Dict[str, Tensor]]:
        for name in layers:
            if name not in self.layer_names:
                raise ValueError("unknown layer: " + name)
        corner = x[:, 0, 0, :10].float()
        features: Dict[str, Tensor] = {}
        for name in layers:
            features[name] = corner
        return torch.softmax(corner, dim=1), features


def metadata(name: str = NAME) -> dict:
    c, h, w = INPUT_SHAPE
    return {
        "format_version": artifact.FORMAT_VERSION,
        "name": name,
        "version": "null",
        "class_names": list(CLASSES),
        "input": {"dtype": "uint8", "shape": [-1, c, h, w], "layout": "NCHW", "color": "RGB", "range": [0, 255],
                  "normalization": "none: the scores are the softmax of ten pixels"},
        "output": {"kind": "softmax", "shape": [-1, len(CLASSES)]},
        "layers": [{"name": "corner", "kind": "crop", "output_shape": [len(CLASSES)], "flops": 0},
                   {"name": "fc", "kind": "fc", "output_shape": [len(CLASSES)], "flops": 0}],
        "flops_per_image": 0,
        "parameters": 0,
        "torch_version": torch.__version__,
        "validation": None,
    }


def export_null(directory: str | Path, name: str = NAME) -> Path:
    """Writes ``<directory>/<name>.pt`` and returns its path."""
    return export_torchscript(NullNet(), Path(directory) / f"{name}.pt", metadata(name))
