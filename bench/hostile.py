"""Hostile inputs: files that lie in their headers, broken files, and mutations of valid ones. Shared
by bench/fuzz.py and the tests (test_hostile.py, test_decode_lanes.py); here, since bench never imports tests."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image

from bench.inputs import encode

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_declaring(width: int, height: int, bit_depth: int = 8, color_type: int = 2, interlace: int = 0,
                  payload: bytes = b"\0" * 64) -> bytes:
    """A PNG with valid checksums whose header declares ``width`` x ``height``, and a few bytes of
    pixels: a decompression bomb when the size is large (the file stays under 200 bytes)."""
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, interlace)
    return (PNG_SIGNATURE + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(payload))
            + png_chunk(b"IEND", b""))


def jpeg_declaring(jpeg: bytes, width: int, height: int) -> bytes:
    """A real baseline JPEG whose frame header (SOF0) is rewritten to declare ``width`` x ``height``."""
    data = bytearray(jpeg)
    sof = data.find(b"\xff\xc0")
    if sof < 0:
        raise ValueError("not a baseline JPEG")
    struct.pack_into(">HH", data, sof + 5, height, width)
    return bytes(data)


def png16(array: np.ndarray) -> bytes:
    """A 16-bit greyscale PNG (mode I;16) of the array's first channel."""
    buffer = io.BytesIO()
    Image.fromarray(array[..., 0].astype(np.uint16) * 257).save(buffer, format="PNG")
    return buffer.getvalue()


def seed_files(rng: np.random.Generator) -> dict[str, bytes]:
    """Valid files of every accepted and refused kind, for mutation."""
    img = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    wide = rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)
    return {
        "png": encode(img), "jpeg": encode(img, "JPEG", quality=90), "png-wide": encode(wide),
        "jpeg-wide": encode(wide, "JPEG"), "png-palette": encode(img, mode="P"),
        "png-interlaced": _interlaced(img), "jpeg-progressive": encode(img, "JPEG", progressive=True),
        "png-grey": encode(img, mode="L"), "png-rgba": encode(img, mode="RGBA"), "png-16bit": png16(img),
        "jpeg-cmyk": encode(img, "JPEG", mode="CMYK"),
    }


def _interlaced(img: np.ndarray) -> bytes:
    """An Adam7-interlaced PNG (PIL does not write them): same pixels, another decoder path."""
    h, w = img.shape[:2]
    passes = ((0, 0, 8, 8), (0, 4, 8, 8), (4, 0, 4, 8), (0, 2, 4, 4), (2, 0, 2, 4), (0, 1, 2, 2), (1, 0, 1, 2))
    raw = b""
    for y0, x0, dy, dx in passes:
        sub = img[y0::dy, x0::dx]
        if sub.size:
            raw += b"".join(b"\0" + row.tobytes() for row in sub)
    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 1)
    return PNG_SIGNATURE + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(raw)) + png_chunk(b"IEND", b"")


def mutate(data: bytes, rng: np.random.Generator, edits: int) -> bytes:
    """``edits`` random byte flips, overwrites, insertions, deletions, truncations or splices."""
    out = bytearray(data)
    for _ in range(edits):
        op = rng.integers(6)
        at = int(rng.integers(len(out) + 1))
        if op == 0 and out:
            out[min(at, len(out) - 1)] ^= 1 << int(rng.integers(8))
        elif op == 1 and out:
            out[min(at, len(out) - 1)] = int(rng.choice([0, 1, 0x7F, 0x80, 0xFF, rng.integers(256)]))
        elif op == 2:
            out[at:at] = rng.bytes(int(rng.integers(1, 16)))
        elif op == 3:
            del out[at:at + int(rng.integers(1, 16))]
        elif op == 4:
            del out[at:]
        else:
            span = int(rng.integers(1, 32))
            src = int(rng.integers(max(1, len(out))))
            out[at:at] = out[src:src + span]
    return bytes(out)


def fix_png_crcs(data: bytes) -> bytes:
    """Recomputes every chunk checksum of a (mutated) PNG, so mutations reach the decoder instead
    of stopping at the first checksum."""
    if not data.startswith(PNG_SIGNATURE):
        return data
    out, at = bytearray(data[:8]), 8
    while at + 8 <= len(data):
        length = struct.unpack(">I", data[at:at + 4])[0]
        end = at + 8 + length
        if end + 4 > len(data):
            out += data[at:]
            break
        body = data[at + 4:end]
        out += data[at:end] + struct.pack(">I", zlib.crc32(body))
        at = end + 4
    else:
        out += data[at:]
    return bytes(out)
