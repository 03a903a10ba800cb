"""Images leave the server only as freshly encoded pixels, all of one byte length per study.

Every image (either arm, and the reference paintings) is decoded, converted to RGB and encoded
again as baseline JPEG with the same settings, so no PNG text chunk, EXIF, ICC profile, file name
or encoder fingerprint can tell the arms apart. Quality 90 with full-resolution colour (4:4:4)
is visually lossless for paintings and keeps a 512×512 image far below 400 KB.

The encoded length still differs by arm (one arm's images are often busier and compress worse),
so rated images are padded after the JPEG's end marker to one length for the whole study: the
largest encoded image of the study. Decoders ignore bytes after the end marker. The padding is
drawn from a per-session key, so two raters' copies of one image differ byte for byte. (Who may
fetch them, and at which address: media_access.py.)
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

from PIL import Image

JPEG_QUALITY = 90
ITEM_MAX_SIDE = 1024
# References are sent at zoom size: a rater compares brushwork in the full-size view.
REFERENCE_MAX_SIDE = 1024
THUMBNAIL_MAX_SIDE = 160
JPEG_END = b"\xff\xd9"


def encode_for_display(path: str | Path, max_side: int = ITEM_MAX_SIDE) -> bytes:
    with Image.open(path) as source:
        pixels = source.convert("RGB")
    if max(pixels.size) > max_side:
        pixels.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    # A fresh image from raw pixels carries no metadata over from the file.
    clean = Image.frombytes("RGB", pixels.size, pixels.tobytes())
    buffer = io.BytesIO()
    clean.save(buffer, format="JPEG", quality=JPEG_QUALITY, subsampling=0, optimize=True)
    return buffer.getvalue()


def pad(jpeg: bytes, length: int, key: bytes) -> bytes:
    """`jpeg` followed by filler up to exactly `length` bytes; the filler is a stream derived from `key`."""
    if not jpeg.endswith(JPEG_END):
        raise ValueError("not a complete JPEG (no end-of-image marker)")
    if len(jpeg) > length:
        raise ValueError(f"a {len(jpeg)}-byte image cannot be padded to {length} bytes")
    return jpeg + hashlib.shake_256(key).digest(length - len(jpeg))
