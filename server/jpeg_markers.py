"""Checks an encoded image's container structure before Pillow parses it: JPEG marker segments,
PNG chunks and the size of the whole file, each in time linear in what it lets through.

Pillow walks a JPEG's segments and a PNG's chunks in Python, and some of that walk is worse than
linear: ``JpegImagePlugin.APP`` grows ``info["exif"]`` by concatenation, so the time to open a file
of many small APP1 segments grows with the square of their number, on the one thread that reads
every request's headers, where no deadline or cancellation reaches it (security review, issue 28).
The linear parts cost too: Pillow steps through fill bytes one at a time and spends microseconds on
each segment or chunk, so a message of tiny PNG chunks takes seconds (the figures: bench/RESULTS.md,
"Smaller measurements"). ``check_encoded`` refuses such files after looking at no more than
its limits let through; a file whose structure is merely truncated or malformed is left to Pillow,
which refuses it with its own message.

Each limit is far above what cameras, phones and image libraries write: a JPEG's header holds
APP0 (JFIF), APP1 (Exif, and XMP), APP2 (an ICC profile in chunks of 64 KiB), APP13 (Photoshop),
APP14 (Adobe) and COM, a dozen segments at most, then a few DQT, DHT, SOF and DRI tables; a PNG holds
a handful of ancillary chunks (gAMA, cHRM, sRGB, iCCP, pHYs, tIME, eXIf, a few text chunks) and
IDAT chunks of 8 KiB (libpng) to 64 KiB (Pillow).
"""

from __future__ import annotations

import re
import struct

KiB = 1 << 10
MiB = 1 << 20

# JPEG, before the first scan (SOS), which is all Pillow parses in Python.
MAX_JPEG_METADATA_SEGMENTS = 64  # APPn + COM; real files have about 2-12 (more only for large ICC profiles)
MAX_JPEG_METADATA_BYTES = 1 * MiB  # APPn + COM payloads: Exif with a thumbnail ~64 KiB, ICC profiles a few 100 KiB
MAX_JPEG_SEGMENTS = 128  # every segment: the metadata's 64 and as many again for tables (real files: < 20)
MAX_JPEG_HEADER_BYTES = MAX_JPEG_METADATA_BYTES + 64 * KiB  # the tables take < 4 KiB; stray bytes are counted here too
MAX_JPEG_STRAY_BYTES = 1 * KiB  # fill (0xFF) and junk bytes between segments: Pillow steps through them one at a time

# PNG, the whole file: Pillow reads chunks before the first IDAT when it opens, the rest when it decodes.
MAX_PNG_ANCILLARY_CHUNKS = 64  # every chunk but IHDR, PLTE, IDAT, IEND; real files: < 15
# Pillow spends microseconds on each chunk, IDAT included, so this bounds its walk to about a tenth of a
# second (bench/RESULTS.md); with libpng's 8 KiB IDATs it allows 128 MiB, twice the largest request message.
MAX_PNG_CHUNKS = 16_384

# The encoded bytes of one image may exceed its raw RGB pixels at the pixel limit (3 bytes each) by this
# much: a PNG of incompressible pixels is a little over 3 bytes a pixel plus its metadata, and a larger
# encoding gains nothing over sending the raw pixels.
ENCODED_ALLOWANCE_BYTES = MAX_JPEG_HEADER_BYTES

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_CRITICAL = frozenset((b"IHDR", b"PLTE", b"IDAT", b"IEND"))
_SOI = b"\xff\xd8"
_SOS, _EOI, _TEM, _COM = 0xDA, 0xD9, 0x01, 0xFE
_STANDALONE = frozenset((_TEM, *range(0xD0, 0xD9)))  # TEM, RST0-7, SOI: markers without a length
_NOT_FF = re.compile(rb"[^\xff]")  # the end of a run of fill bytes, found at C speed
_FIX = "strip metadata (e.g. exiftool -all=) and resend"


def max_encoded_bytes(max_pixels: int) -> int:
    """The largest encoded image accepted when images may have up to ``max_pixels`` pixels: 3 bytes a
    pixel plus ``ENCODED_ALLOWANCE_BYTES`` (48 MiB + 1 MiB at the default 4096 x 4096)."""
    return 3 * max_pixels + ENCODED_ALLOWANCE_BYTES


def check_encoded(data: bytes, index: int, max_pixels: int) -> str | None:
    """Why encoded image ``index`` is refused before Pillow sees it, a message for the caller; None
    when its size and structure are within the limits (or it is neither JPEG nor PNG: Pillow says so)."""
    limit = max_encoded_bytes(max_pixels)
    if len(data) > limit:
        return (f"image {index}: encoded image is {len(data):,} bytes; the limit is {limit:,} (3 bytes a pixel "
                f"at the limit of {max_pixels:,} pixels, plus {ENCODED_ALLOWANCE_BYTES // KiB:,} KiB): send it "
                "smaller or at a lower quality")
    if data.startswith(_SOI):
        return _check_jpeg(data, index)
    if data.startswith(PNG_SIGNATURE):
        return _check_png(data, index)
    return None


def _check_jpeg(data: bytes, index: int) -> str | None:
    """Walks the segments from SOI to the first SOS; None at SOS, at EOI, or where the structure
    ends or breaks (truncated: Pillow refuses it)."""
    n = len(data)
    pos = 2
    segments = metadata_segments = metadata_bytes = stray = 0
    while pos < n:
        if data[pos] != 0xFF:  # junk before a marker: libjpeg skips it with a warning
            found = data.find(b"\xff", pos)
            if found < 0:
                return None
            stray += found - pos
            pos = found
        end = _NOT_FF.search(data, pos)
        if end is None:
            return None
        stray += end.start() - pos - 1  # a marker is 0xFF and its code; any other 0xFF before it is fill
        pos = end.start()
        if stray > MAX_JPEG_STRAY_BYTES:
            return (f"image {index}: JPEG has over {MAX_JPEG_STRAY_BYTES:,} fill or stray bytes between its "
                    "segments; re-encode it and resend")
        if pos > MAX_JPEG_HEADER_BYTES:
            return (f"image {index}: JPEG's header (the bytes before its image data) is over "
                    f"{MAX_JPEG_HEADER_BYTES:,} bytes; the limit is {MAX_JPEG_HEADER_BYTES:,}: {_FIX}")
        marker = data[pos]
        pos += 1
        if marker == _SOS or marker == _EOI:
            return None
        if marker == 0x00 or marker in _STANDALONE:  # 0xFF00 is a stuffed byte: stray here
            stray += 2 if marker == 0x00 else 0
            continue
        if pos + 2 > n:
            return None
        (length,) = struct.unpack_from(">H", data, pos)
        if length < 2:
            return None  # malformed: Pillow refuses it
        segments += 1
        if 0xE0 <= marker <= 0xEF or marker == _COM:
            metadata_segments += 1
            metadata_bytes += length - 2
            if metadata_segments > MAX_JPEG_METADATA_SEGMENTS:
                return (f"image {index}: JPEG has over {MAX_JPEG_METADATA_SEGMENTS} APP/COM segments before its "
                        f"image data; the limit is {MAX_JPEG_METADATA_SEGMENTS}: {_FIX}")
            if metadata_bytes > MAX_JPEG_METADATA_BYTES:
                return (f"image {index}: JPEG has over {MAX_JPEG_METADATA_BYTES // MiB} MiB of APP/COM metadata "
                        f"before its image data; the limit is {MAX_JPEG_METADATA_BYTES // MiB} MiB: {_FIX}")
        if segments > MAX_JPEG_SEGMENTS:
            return (f"image {index}: JPEG has over {MAX_JPEG_SEGMENTS} segments before its image data; the "
                    f"limit is {MAX_JPEG_SEGMENTS}: re-encode it and resend")
        pos += length
    return None


def _check_png(data: bytes, index: int) -> str | None:
    """Walks the chunks from the signature to IEND; None there, or where the structure ends."""
    n = len(data)
    pos = len(PNG_SIGNATURE)
    chunks = ancillary = 0
    while pos + 8 <= n:
        length, kind = struct.unpack_from(">I4s", data, pos)
        if kind == b"IEND":
            return None
        chunks += 1
        if kind not in _PNG_CRITICAL:
            ancillary += 1
            if ancillary > MAX_PNG_ANCILLARY_CHUNKS:
                return (f"image {index}: PNG has over {MAX_PNG_ANCILLARY_CHUNKS} ancillary chunks (text, "
                        f"metadata); the limit is {MAX_PNG_ANCILLARY_CHUNKS}: {_FIX}")
        if chunks > MAX_PNG_CHUNKS:
            return (f"image {index}: PNG has over {MAX_PNG_CHUNKS:,} chunks; the limit is {MAX_PNG_CHUNKS:,}: "
                    "re-encode it (fewer, larger IDAT chunks) and resend")
        pos += 12 + length  # length, type, data, CRC
    return None
