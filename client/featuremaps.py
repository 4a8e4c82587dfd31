"""Feature maps as pictures: one PNG grid per layer, one tile per channel (as in ConvNetJS's demo)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image

MIN_TILE_PX = 32  # small maps (4x4 after the last pool) are scaled up so a person can see them
GAP_PX = 1


def _normalise(channel: np.ndarray) -> np.ndarray:
    """Each channel to 0..255 over its own range: what matters is where a filter fired, not how much."""
    lo, hi = float(channel.min()), float(channel.max())
    if hi - lo < 1e-12:
        return np.zeros(channel.shape, dtype=np.uint8)
    return ((channel - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def feature_grid(fmap: np.ndarray) -> Image.Image:
    """A C x H x W map as a near-square grid of C greyscale tiles; a vector (N,) as one strip."""
    fmap = np.asarray(fmap, dtype=np.float32)
    if fmap.ndim == 1:
        fmap = fmap.reshape(1, 1, -1)  # one tile, one row of N values
    channels, h, w = fmap.shape
    scale = max(1, math.ceil(MIN_TILE_PX / max(h, w))) if max(h, w) > 1 else MIN_TILE_PX
    th, tw = h * scale, w * scale
    cols = math.ceil(math.sqrt(channels))
    rows = math.ceil(channels / cols)
    grid = np.full((rows * (th + GAP_PX) - GAP_PX, cols * (tw + GAP_PX) - GAP_PX), 64, dtype=np.uint8)
    for c in range(channels):
        tile = np.kron(_normalise(fmap[c]), np.ones((scale, scale), dtype=np.uint8))
        r, k = divmod(c, cols)
        grid[r * (th + GAP_PX) : r * (th + GAP_PX) + th, k * (tw + GAP_PX) : k * (tw + GAP_PX) + tw] = tile
    return Image.fromarray(grid, mode="L")


def save_feature_maps(maps: dict[str, np.ndarray], out_dir: str | Path) -> list[Path]:
    """Writes ``<layer>.png`` for each map into ``out_dir``; returns the paths in layer order."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for layer, fmap in maps.items():
        path = out_dir / f"{layer}.png"
        feature_grid(fmap).save(path)
        paths.append(path)
    return paths
