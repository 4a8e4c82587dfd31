"""Feature maps as pictures: one PNG grid per layer, one tile per channel (as in ConvNetJS's demo),
captioned with the layer's name, kind and shape and the scale its values were drawn on."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image

from cifar10_serving.client.pictures import as_volume, captioned_grid, tile_scale
from cifar10_serving.client.server_text import file_names, inside, printable

MIN_TILE_PX = 32  # small maps (4x4 after the last pool) are enlarged so a person can see them
GRID_WIDTH_PX = 768  # a grid's tiles are enlarged further while the grid fits about this wide


def shape_text(shape) -> str:
    return " x ".join(str(int(n)) for n in shape)


def readable_scale(fmap: np.ndarray) -> int:
    """The nearest-neighbour enlargement for a saved grid: tiles at least MIN_TILE_PX on a side."""
    channels, h, w = as_volume(fmap).shape
    return max(math.ceil(MIN_TILE_PX / max(h, w)), tile_scale(h, w, channels, GRID_WIDTH_PX))


def feature_grid(fmap: np.ndarray, layer: str = "", kind: str = "") -> Image.Image:
    """A C x H x W map (or a vector) as a captioned greyscale grid: name, kind and shape above, scale below."""
    title = printable("  ".join(part for part in (layer, kind, shape_text(np.shape(fmap))) if part))
    return captioned_grid(fmap, title, readable_scale(fmap))


def save_feature_maps(maps: dict[str, np.ndarray], out_dir: str | Path,
                      kinds: dict[str, str] | None = None) -> list[Path]:
    """Writes one PNG per map into ``out_dir``, named for its layer made a safe file name
    (``stage1.pool.png``; ``a/b`` becomes ``a_b.png``, see ``server_text.file_names``): the names come
    from the server, which must not choose where the client writes. ``kinds`` (layer -> kind, from
    ModelInfo) adds each layer's kind to its caption. Returns the paths in layer order."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stems = file_names(maps)
    paths = []
    for layer, fmap in maps.items():
        path = inside(out_dir, out_dir / f"{stems[layer]}.png")
        feature_grid(fmap, layer, (kinds or {}).get(layer, "")).save(path)
        paths.append(path)
    return paths
