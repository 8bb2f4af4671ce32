"""Images in and out of the HTTP API: checked base64 decoding, base64 PNG encoding.

An uploaded image is checked in order of cost: length of the base64 text, decoded bytes,
then the pixel count from the header (``Image.open`` reads only the header), and only then
are the pixels decoded. Every failure is a ``RequestError`` naming the field.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from serving.limits import Limits
from unclip.pipeline import png_bytes

FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")


class RequestError(Exception):
    """A bad request: HTTP ``status`` with a message that starts with the field's name."""

    def __init__(self, field: str, message: str, status: int = 422) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
        self.status = status


def decode_image(text: str, limits: Limits, field: str = "image") -> Image.Image:
    """Base64 (optionally a ``data:image/...;base64,`` URL) -> a decoded RGB PIL image."""
    if text.startswith("data:"):
        _, _, text = text.partition(",")
    text = "".join(text.split())  # base64 may be wrapped over lines
    if not text:
        raise RequestError(field, "is empty; send a base64-encoded PNG, JPEG or WebP image")
    approx = len(text) * 3 // 4
    if approx > limits.max_image_bytes + 3:
        raise RequestError(
            field,
            f"about {approx} bytes, over the limit of {limits.max_image_bytes} bytes",
            413,
        )
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(field, "is not valid base64 (standard alphabet, padded)") from None
    if len(raw) > limits.max_image_bytes:
        raise RequestError(
            field, f"{len(raw)} bytes, over the limit of {limits.max_image_bytes} bytes", 413
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(raw), formats=FORMATS)
    except Image.DecompressionBombError:
        raise RequestError(
            field, f"has too many pixels (limit {limits.max_image_pixels})", 413
        ) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise RequestError(
            field, f"is not an image in a supported format ({', '.join(FORMATS)})"
        ) from None
    w, h = img.size
    if w * h > limits.max_image_pixels:
        raise RequestError(
            field,
            f"{w}x{h} = {w * h} pixels, over the limit of {limits.max_image_pixels} pixels",
            413,
        )
    if w < 1 or h < 1:
        raise RequestError(field, f"has no pixels ({w}x{h})")
    try:
        img.load()
        return img.convert("RGB")
    except Exception as e:  # noqa: BLE001 - decoders raise many kinds on corrupt data
        raise RequestError(field, f"could not be decoded ({type(e).__name__}: {e})") from None


def encode_png_b64(image: np.ndarray) -> str:
    """(H, W, 3) uint8 -> base64 PNG text."""
    return base64.b64encode(png_bytes(image)).decode("ascii")
