"""Pictures from arrays, with numpy and Pillow only: enlarged images, feature-map grids with their
layer name, shape and value scale, and heat-map overlays for explanations.

Text uses Pillow's own bundled font (``ImageFont.load_default(size=...)``, Aileron since Pillow 10.1),
so a picture looks the same on any machine, with or without system fonts.
"""

from __future__ import annotations

import base64
import io
import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont

GAP_PX = 1
GAP_GREY = 64  # the lines between tiles: darker than a tile's mean, lighter than its black
LABEL_PX = 12  # font size of the captions on saved grids


def font(size: int = LABEL_PX) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow 10.0 has only the small bitmap font, without a size
        return ImageFont.load_default()


def normalise(values: np.ndarray, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    """``values`` to uint8 0..255 over [lo, hi] (default: their own range); a flat array is black."""
    values = np.asarray(values, dtype=np.float32)
    lo = float(values.min()) if lo is None else lo
    hi = float(values.max()) if hi is None else hi
    if not math.isfinite(hi - lo) or hi - lo < 1e-12:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.clip((values - lo) * (255.0 / (hi - lo)), 0, 255).astype(np.uint8)


def enlarge(pixels: np.ndarray, scale: int) -> np.ndarray:
    """Nearest-neighbour: each value becomes a ``scale`` x ``scale`` block, so no pixel is invented."""
    return np.repeat(np.repeat(pixels, scale, axis=0), scale, axis=1)


def as_volume(fmap: np.ndarray) -> np.ndarray:
    """A layer's output as C x H x W: a vector (N,), after flatten or fc, as one tile in near-square rows."""
    fmap = np.asarray(fmap, dtype=np.float32)
    if fmap.ndim == 3:
        return fmap
    flat = fmap.reshape(-1)
    cols = math.ceil(math.sqrt(flat.size))
    rows = math.ceil(flat.size / cols)
    padded = np.full(rows * cols, flat.min() if flat.size else 0.0, dtype=np.float32)
    padded[: flat.size] = flat
    return padded.reshape(1, rows, cols)


def tile_scale(h: int, w: int, channels: int, width_px: int) -> int:
    """The integer enlargement that fits a near-square grid of ``channels`` tiles into about ``width_px``."""
    cols = math.ceil(math.sqrt(channels))
    return max(1, min(32, (width_px // cols) // max(h, w)))


def grid(fmap: np.ndarray, scale: int) -> tuple[np.ndarray, bool]:
    """A C x H x W map (or a vector) as a near-square grid of greyscale tiles, uint8.

    Each tile is stretched over its own channel's range: what matters is where a filter fired, not
    how much. Tiles of one value (1 x 1 after global pooling, or a vector) share the layer's range
    instead, since one value has no range of its own. Also answers whether the range is per tile."""
    volume = as_volume(fmap)
    channels, h, w = volume.shape
    per_tile = h * w > 1 and channels > 1
    lo, hi = (None, None) if per_tile else (float(volume.min()), float(volume.max()))
    cols = math.ceil(math.sqrt(channels))
    rows = math.ceil(channels / cols)
    th, tw = h * scale, w * scale
    out = np.full((rows * (th + GAP_PX) - GAP_PX, cols * (tw + GAP_PX) - GAP_PX), GAP_GREY, dtype=np.uint8)
    for c in range(channels):
        r, k = divmod(c, cols)
        y, x = r * (th + GAP_PX), k * (tw + GAP_PX)
        out[y : y + th, x : x + tw] = enlarge(normalise(volume[c], lo, hi), scale)
    return out, per_tile


def captioned_grid(fmap: np.ndarray, title: str, scale: int) -> Image.Image:
    """``grid`` with a title above (layer name, kind, shape) and a value scale below, greyscale."""
    pixels, per_tile = grid(fmap, scale)
    values = np.asarray(fmap, dtype=np.float32)
    lo, hi = float(values.min()), float(values.max())
    legend = (f"black..white: each tile's own min..max (layer {lo:.3g} to {hi:.3g}); enlarged {scale}x"
              if per_tile else f"black {lo:.3g} .. white {hi:.3g}; enlarged {scale}x")
    f = font()
    line = LABEL_PX + 6
    ramp_h = 8
    width = max(pixels.shape[1], _text_width(title, f), _text_width(legend, f)) + 8
    height = line + pixels.shape[0] + 4 + ramp_h + line
    canvas = Image.new("L", (width, height), 255)
    canvas.paste(Image.fromarray(pixels, mode="L"), (4, line))
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 2), title, fill=0, font=f)
    ramp_y = line + pixels.shape[0] + 4
    ramp_w = min(256, width - 8)
    ramp = np.tile(np.linspace(0, 255, ramp_w).astype(np.uint8), (ramp_h, 1))
    canvas.paste(Image.fromarray(ramp, mode="L"), (4, ramp_y))
    draw.text((4, ramp_y + ramp_h + 2), legend, fill=0, font=f)
    return canvas


def _text_width(text: str, f: ImageFont.ImageFont) -> int:
    left, _, right, _ = f.getbbox(text)
    return int(right - left)


def heat(values: np.ndarray) -> np.ndarray:
    """Values to an H x W x 4 RGBA heat map (transparent blue-black through red to yellow), by their range."""
    t = normalise(values).astype(np.float32) / 255.0
    rgba = np.empty(t.shape + (4,), dtype=np.float32)
    rgba[..., 0] = np.clip(3 * t, 0, 1)
    rgba[..., 1] = np.clip(3 * t - 1, 0, 1)
    rgba[..., 2] = np.clip(3 * t - 2, 0, 1)
    rgba[..., 3] = 0.15 + 0.7 * t  # low values let the image show through
    return (rgba * 255).astype(np.uint8)


def overlay(image: np.ndarray, values: np.ndarray, scale: int) -> np.ndarray:
    """An H x W x 3 uint8 image, in grey, with a heat map of ``values`` (same H x W) over it, enlarged."""
    # The image in grey under the heat map, so the map's colours stand out from the image's own.
    base = Image.fromarray(enlarge(np.asarray(image, dtype=np.uint8), scale)).convert("L").convert("RGBA")
    top = Image.fromarray(enlarge(heat(values), scale), mode="RGBA")
    return np.asarray(Image.alpha_composite(base, top).convert("RGB"))


def png_bytes(pixels: np.ndarray | Image.Image) -> bytes:
    image = pixels if isinstance(pixels, Image.Image) else Image.fromarray(pixels)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def data_uri(pixels: np.ndarray | Image.Image) -> str:
    """A PNG inlined as a ``data:`` URI, so a page carries its pictures and needs no other file."""
    return "data:image/png;base64," + base64.b64encode(png_bytes(pixels)).decode("ascii")
