"""Filters as pictures, numpy only: a first convolution's filters as small RGB patches, and a deeper
convolution's as one grid per output channel, a tile per input channel. Every filter is scaled by its
own largest magnitude so that its sign shows: zero is mid grey (RGB) or white (the diverging tiles),
whatever the filter's size.
"""

from __future__ import annotations

import math

import numpy as np

from cifar10_serving.client.pictures import GAP_GREY, GAP_PX, enlarge

GRID_PX = 96  # a deeper filter's grid aims at about this width, so three fit side by side in a column
MAX_SCALE = 8  # 3x3 kernels at most 24 px: larger adds nothing a person can read


def _signed_scale(values: np.ndarray) -> np.ndarray:
    """``values`` over their own largest magnitude: -1..1, zero staying zero (all zeros: zeros)."""
    values = np.asarray(values, dtype=np.float32)
    peak = float(np.abs(values).max()) if values.size else 0.0
    return values / peak if math.isfinite(peak) and peak > 0 else np.zeros_like(values)


def _tiles(tiles: list[np.ndarray], cols: int, background: int = GAP_GREY) -> np.ndarray:
    """Equal-sized H x W x 3 tiles in rows of ``cols``, GAP_PX apart."""
    th, tw = tiles[0].shape[:2]
    rows = math.ceil(len(tiles) / cols)
    out = np.full((rows * (th + GAP_PX) - GAP_PX, cols * (tw + GAP_PX) - GAP_PX, 3), background, dtype=np.uint8)
    for n, tile in enumerate(tiles):
        r, c = divmod(n, cols)
        out[r * (th + GAP_PX) : r * (th + GAP_PX) + th, c * (tw + GAP_PX) : c * (tw + GAP_PX) + tw] = tile
    return out


def rgb_patches(weight: np.ndarray, scale: int = MAX_SCALE) -> np.ndarray:
    """Filters out x 3 x F x F (reading the R, G, B input) as a near-square grid of RGB patches, each
    over its own largest magnitude: mid grey is 0, brighter in a colour means that colour raises the
    filter's output, darker lowers it."""
    weight = np.asarray(weight, dtype=np.float32)
    tiles = [enlarge(np.round(127.5 + 127.5 * _signed_scale(f).transpose(1, 2, 0)).astype(np.uint8), scale)
             for f in weight]
    return _tiles(tiles, math.ceil(math.sqrt(len(tiles))))


def diverging(values: np.ndarray) -> np.ndarray:
    """Values in -1..1 as RGB: blue for negative, white for zero, red for positive."""
    v = np.clip(np.asarray(values, dtype=np.float32), -1, 1)
    rgb = np.empty(v.shape + (3,), dtype=np.float32)
    rgb[..., 0] = np.where(v < 0, 1 + v, 1)
    rgb[..., 1] = 1 - np.abs(v)
    rgb[..., 2] = np.where(v > 0, 1 - v, 1)
    return np.round(255 * rgb).astype(np.uint8)


def kernel_scale(in_channels: int, kernel: int, width_px: int = GRID_PX) -> int:
    """The enlargement that fits one output channel's grid of ``in_channels`` tiles into about ``width_px``."""
    cols = math.ceil(math.sqrt(in_channels))
    return max(2, min(MAX_SCALE, width_px // max(1, cols * kernel)))


def channel_grid(kernels: np.ndarray, scale: int) -> np.ndarray:
    """One output channel's filter, in x F x F, as a grid of diverging tiles, one per input channel,
    all over the filter's own largest magnitude."""
    signed = _signed_scale(kernels)
    tiles = [enlarge(diverging(k), scale) for k in signed]
    return _tiles(tiles, math.ceil(math.sqrt(len(tiles))))


def strongest_channels(fmap: np.ndarray, count: int) -> list[int]:
    """The ``count`` channels of a C x H x W map with the largest values, in channel order."""
    fmap = np.asarray(fmap, dtype=np.float32)
    peaks = fmap.reshape(len(fmap), -1).max(axis=1)
    return sorted(int(c) for c in np.argsort(-peaks, kind="stable")[:count])
