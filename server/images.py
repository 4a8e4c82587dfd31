"""Decode and validate one request image into a uint8 C x H x W array, the model's input.

Protocol-free: an image is ``Encoded`` (PNG or JPEG bytes) or ``Raw`` (a tensor's bytes, shape,
dtype and layout), and the size rule is a ``Resize``; each API's front-end translates its own
messages into these. Every failure raises ``ImageError`` with a message that names the image's index
and says what to send instead; the front-ends answer it as INVALID_ARGUMENT. Encoded images are
refused from their header when they declare too many pixels, before any pixel is decoded:
``open_image`` reads and checks the header, and its result's ``decode`` does the work
(``server.decode_lanes`` schedules it).
"""

from __future__ import annotations

import enum
import io
import warnings
from dataclasses import dataclass
from typing import Callable, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from cifar10_serving.server.jpeg_markers import check_encoded

import torch
from torchvision.io import ImageReadMode
from torchvision.io import decode_image as _torch_decode

# torchvision 0.29 warns on every decode that TorchCodec will replace these decoders; they are still
# sound, and a catch_warnings() per call would cost more than the decode itself.
warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torchvision\.io\.image")

_RGB = ImageReadMode.RGB

ACCEPTED_FORMATS = ("PNG", "JPEG")
# Modes that convert to RGB without loss; others (grey, alpha, 16-bit, CMYK) are refused, since a
# silent conversion would classify a different image than the caller holds.
LOSSLESS_TO_RGB = ("RGB", "P")
RAW_DTYPES = (np.dtype(np.uint8), np.dtype("<f4"))  # 0..255, or 0..1 rounded to the nearest 1/255


class ImageError(ValueError):
    """A request image that cannot be classified; the message is meant for the caller."""


class Resize(enum.Enum):
    """What to do with an image that is not the model's size."""

    REJECT = "reject"  # refuse it, saying its size
    CENTER_CROP = "center_crop"  # scale the shorter side to the model's, then crop the centre


@dataclass(frozen=True)
class Encoded:
    """A PNG or JPEG file."""

    data: bytes


@dataclass(frozen=True)
class Raw:
    """A tensor of one RGB image: ``shape`` is [H, W, 3] when ``channels_last``, else [3, H, W]."""

    data: bytes
    shape: tuple[int, ...]
    dtype: np.dtype  # one of RAW_DTYPES
    channels_last: bool = True


Source = Union[Encoded, Raw]


@dataclass(frozen=True)
class Opened:
    """An image whose header has been read and checked: ``pixels`` is what decoding it produces
    (after a JPEG's reduced-scale draft), known before any pixel is decoded."""

    index: int
    pixels: int
    decode: Callable[[], np.ndarray]  # H x W x 3 uint8 at the model's size; raises ImageError


def decode_into(image: Source, index: int, out: np.ndarray, resize: Resize, max_pixels: int) -> None:
    """Writes ``image`` into ``out`` (uint8, 3 x H x W, the model's input size)."""
    out[...] = open_image(image, index, out.shape[1:], resize, max_pixels).decode().transpose(2, 0, 1)


def open_image(image: Source, index: int, size: tuple[int, int], resize: Resize, max_pixels: int) -> Opened:
    """Reads and checks ``image``'s header (every check that needs no pixels); decoding is left to
    the result's ``decode``, so a caller can weigh the work first."""
    if isinstance(image, Encoded):
        return _open_encoded(image.data, index, tuple(size), resize, max_pixels)
    return _open_raw(image, index, tuple(size), resize, max_pixels)


def _open_encoded(data: bytes, index: int, size: tuple[int, int], resize: Resize, max_pixels: int) -> Opened:
    if not data:
        raise ImageError(f"image {index}: encoded bytes are empty")
    if (refusal := check_encoded(data, index, max_pixels)) is not None:  # before Pillow's slower header walk
        raise ImageError(refusal)
    try:
        # Reads the header only. (PIL's own bomb check only warns below 2 x 89 Mpixel; ours is below.)
        img = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except UnidentifiedImageError:
        raise ImageError(f"image {index}: not a PNG or JPEG file ({len(data)} bytes); send PNG or JPEG") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):  # PIL's own, larger limit
        raise ImageError(f"image {index}: declares more pixels than the limit of {max_pixels}; "
                         "refused from its header") from None
    except Exception as exc:  # a header PIL cannot parse: OSError, SyntaxError, ...
        raise ImageError(f"image {index}: not a decodable PNG or JPEG ({_reason(exc)})") from None
    w, h = img.size
    if w < 1 or h < 1 or w * h > max_pixels:
        raise ImageError(f"image {index}: {img.format} declares {w}x{h} pixels, over the limit of {max_pixels}")
    if img.mode not in LOSSLESS_TO_RGB:
        raise ImageError(
            f"image {index}: {img.format} has mode {img.mode!r}; expected 8-bit RGB (3 channels, no alpha)"
        )
    _check_size(index, img.format, (h, w), size, resize)
    if (h, w) == size and img.format == "JPEG":
        # PNG stays with PIL: torchvision 0.29's decode_png segfaults on any libpng error, so one
        # truncated or corrupt 32x32 PNG killed the whole server (pytorch/vision#3613 is that kind).
        return Opened(index, w * h, lambda: _decode_native(data, index, img.format))
    if img.format == "JPEG":
        img.draft("RGB", (size[1], size[0]))  # let libjpeg decode at a reduced scale: far less work
    dw, dh = img.size

    def decode() -> np.ndarray:
        try:
            rgb = img.convert("RGB")  # decodes
        except Exception as exc:
            raise ImageError(f"image {index}: {img.format} is truncated or corrupt ({_reason(exc)})") from None
        return _fit(np.asarray(rgb), size)

    return Opened(index, dw * dh, decode)


def _decode_native(data: bytes, index: int, fmt: str) -> np.ndarray:
    """Decodes a JPEG with libjpeg-turbo through torchvision, faster than PIL at the model's size.
    Its errors come back as RuntimeError (fuzzed: bench/fuzz.py)."""
    try:
        chw = _torch_decode(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=_RGB)
    except RuntimeError as exc:
        raise ImageError(f"image {index}: {fmt} is truncated or corrupt ({_reason(exc)})") from None
    return chw.permute(1, 2, 0).numpy()


def _open_raw(raw: Raw, index: int, size: tuple[int, int], resize: Resize, max_pixels: int) -> Opened:
    dtype, shape = np.dtype(raw.dtype), tuple(raw.shape)
    if dtype not in RAW_DTYPES:
        raise ImageError(f"image {index}: raw dtype {dtype.name} not accepted; use uint8 or float32")
    channel_axis = 2 if raw.channels_last else 0
    if len(shape) != 3 or shape[channel_axis] != 3:
        expected = "[H, W, 3]" if raw.channels_last else "[3, H, W]"
        shown = list(shape) if len(shape) <= 4 else f"of {len(shape):,} dimensions"
        raise ImageError(f"image {index}: raw shape {shown} with channels {'last' if raw.channels_last else 'first'}; "
                         f"expected {expected}")
    h, w = (shape[0], shape[1]) if channel_axis == 2 else (shape[1], shape[2])
    if h < 1 or w < 1 or h * w > max_pixels:
        raise ImageError(f"image {index}: raw image is {w}x{h} pixels; allowed 1 to {max_pixels}")
    expected_bytes = 3 * h * w * dtype.itemsize
    if len(raw.data) != expected_bytes:
        raise ImageError(
            f"image {index}: raw data is {len(raw.data)} bytes; shape {list(shape)} of "
            f"{dtype.name} needs {expected_bytes}"
        )
    _check_size(index, "raw image", (h, w), size, resize)

    def decode() -> np.ndarray:
        array = np.frombuffer(raw.data, dtype=dtype).reshape(shape)
        if channel_axis == 0:
            array = array.transpose(1, 2, 0)
        return _fit(np.ascontiguousarray(to_uint8(array, f"image {index}: raw FLOAT32")), size)

    return Opened(index, h * w, decode)


def to_uint8(array: np.ndarray, what: str) -> np.ndarray:
    """Pixels as uint8: uint8 as they are, float32 in [0, 1] rounded to the nearest of 0..255.
    ``what`` names the data in the error (``image 3: raw float32``)."""
    if array.dtype == np.uint8:
        return array
    if not np.isfinite(array).all():
        raise ImageError(f"{what} data holds NaN or Inf")
    if array.min(initial=0.0) < 0.0 or array.max(initial=0.0) > 1.0:
        raise ImageError(f"{what} values must lie in [0, 1]")
    return np.rint(array * 255.0).astype(np.uint8)


def _check_size(index: int, what: str, hw: tuple[int, int], size: tuple[int, int], resize: Resize) -> None:
    if tuple(hw) != tuple(size) and resize is Resize.REJECT:
        raise ImageError(
            f"image {index}: {what} is {hw[1]}x{hw[0]}, expected {size[1]}x{size[0]} "
            "(or send resize=RESIZE_CENTER_CROP)"
        )


def _fit(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Scales the shorter side to the model's size and crops the centre (H x W x 3 uint8).

    It resizes only the centre box, straight to the output size: scaling the whole image first would
    turn a 16,777,216 x 1 image (within the pixel limit) into a 536,870,912 x 32 intermediate."""
    h, w = rgb.shape[:2]
    th, tw = size
    if (h, w) == (th, tw):
        return rgb
    scale = max(th / h, tw / w)
    nh, nw = max(th, round(h * scale)), max(tw, round(w * scale))
    top, left = (nh - th) // 2, (nw - tw) // 2  # the crop, in the scaled image's pixels
    box = (left / scale, top / scale, (left + tw) / scale, (top + th) / scale)
    img = Image.fromarray(rgb).resize((tw, th), Image.Resampling.BILINEAR, box=box, reducing_gap=None)
    return np.asarray(img)


def _reason(exc: Exception) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 120 else text[:117] + "..."
