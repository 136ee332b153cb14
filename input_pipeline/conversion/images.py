"""One image as the training pipeline reads it: an RGB JPEG.

``tf.image.decode_and_crop_jpeg`` (the training decode) reads JPEG only. A
three-component JPEG that decodes is kept byte for byte; anything else that
decodes (a CMYK or greyscale JPEG, a PNG, a PNG under a JPEG name, GIF, BMP)
is decoded to RGB and re-encoded as a JPEG at ``QUALITY``, with the reason;
what does not decode raises ``UnreadableImageError`` with the reason.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import tensorflow as tf

#: JPEG quality of a re-encoded image.
QUALITY = 95

_SIGNATURES = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF8", "GIF"),
    (b"BM", "BMP"),
)
_JPEG_NAMES = (".jpg", ".jpeg")


class UnreadableImageError(Exception):
    """The file cannot be read as an image; the message is the reason."""


class Prepared(NamedTuple):
    data: bytes  # an RGB JPEG
    height: int
    width: int
    reencoded: str | None  # why it was re-encoded, or None when kept as is


def sniff(data: bytes) -> str | None:
    """The format the first bytes announce, whatever the file's name says."""
    for signature, name in _SIGNATURES:
        if data.startswith(signature):
            return name
    return None


def jpeg_components(data: bytes) -> int | None:
    """Colour components of a JPEG (1 grey, 3 YCbCr/RGB, 4 CMYK/YCCK), read from its
    start-of-frame segment; None when the header ends before one."""
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        # SOF0..SOF15 except DHT (C4), JPG (C8) and DAC (CC).
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return data[i + 9] if i + 9 < len(data) else None
        i += 2 + length
    return None


def _reason(fmt: str, components: int | None, filename: str) -> str | None:
    if fmt == "JPEG":
        return {1: "greyscale JPEG", 4: "CMYK JPEG"}.get(components, None)
    named_jpeg = os.path.splitext(filename)[1].lower() in _JPEG_NAMES
    return f"{fmt} named {os.path.splitext(filename)[1]}" if named_jpeg else fmt


def prepare(data: bytes, filename: str) -> Prepared:
    """``data`` as an RGB JPEG; raises ``UnreadableImageError`` naming why it cannot be."""
    if not data:
        raise UnreadableImageError("empty file")
    fmt = sniff(data)
    if fmt is None:
        raise UnreadableImageError("not an image (no JPEG, PNG, GIF or BMP signature)")
    components = jpeg_components(data) if fmt == "JPEG" else None
    try:
        image = tf.io.decode_image(data, channels=3, expand_animations=False)
    except tf.errors.InvalidArgumentError:
        raise UnreadableImageError(f"truncated or corrupt {fmt}") from None
    height, width = int(image.shape[0]), int(image.shape[1])
    if fmt == "JPEG" and components == 3:
        return Prepared(data, height, width, None)
    reason = _reason(fmt, components, filename) or f"JPEG with {components} components"
    encoded = tf.io.encode_jpeg(image, format="rgb", quality=QUALITY).numpy()
    return Prepared(encoded, height, width, reason)
