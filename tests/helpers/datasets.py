"""Small synthetic data sets for the trainer's tests: images with a photograph's correlations, and a
CIFAR-10 Python-format folder whose classes show in their colour."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from cifar10_serving.model.data import PYTHON_FORMAT_DIR


def smooth_images(n: int, seed: int = 0) -> torch.Tensor:
    """uint8 images with neighbouring pixels and channels correlated, as in real photographs."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 1, 8, 8, generator=gen) * 200 + torch.rand(n, 3, 8, 8, generator=gen) * 40
    fine = F.interpolate(coarse, size=32, mode="bilinear", align_corners=False)
    return (fine + torch.rand(n, 3, 32, 32, generator=gen) * 40).clamp(0, 255).to(torch.uint8)


def python_format_dataset(root: Path, per_class: int = 40) -> Path:
    """A CIFAR-10 Python-format folder of synthetic images whose class shows in their colour."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), per_class)
    base = rng.integers(0, 256, (10, 3))
    images = np.clip(base[labels][:, :, None, None] + rng.integers(-40, 41, (len(labels), 3, 32, 32)), 0, 255)
    folder = root / PYTHON_FORMAT_DIR
    folder.mkdir(parents=True)
    for i, (chunk, lab) in enumerate(zip(np.array_split(images.astype(np.uint8), 5), np.array_split(labels, 5)), 1):
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump({b"data": chunk.reshape(len(chunk), -1), b"labels": lab.tolist()}, f)
    return root
