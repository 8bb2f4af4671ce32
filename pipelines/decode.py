"""Image decoding and caption reading for the embedding ETL: plain Python, no Ray.

Every function here either returns a usable value or raises :class:`RowError` with the ETL
stage (``decode`` / ``caption``) and a one-line reason that goes into the errors table.

Images: the header is checked before any pixel is decoded (zero bytes, not an image,
too many pixels), then the image is fully loaded (a truncated file fails here), its EXIF
orientation applied, and it is brought to 8-bit RGB: alpha (RGBA, LA, transparent palette)
is composited on white, 16-bit greyscale is scaled (not clipped) to 8 bits, CMYK and
greyscale are converted. Each output image is a centre square crop resized with an
antialiasing filter.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from PIL import Image, ImageOps, UnidentifiedImageError

from pipelines.sources import Problem, RawRow, read_unit
from unclip.images import square, to_rgb

# Pillow's own limit (about 89 MP): above it Pillow warns, above twice it refuses.
DEFAULT_MAX_PIXELS = int(Image.MAX_IMAGE_PIXELS or 89_478_485)
PNG_COMPRESS_LEVEL = 3  # fast and still ~as small as the default 6 on small images

# Between the decode tasks and the embedding actors (one row per input row).
DECODED_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("source", pa.string()),
        ("caption", pa.string()),
        ("image", pa.binary()),  # re-encoded PNG (null if no image column or bad row)
        ("pixels", pa.binary()),  # (S, S, 3) uint8 at the CLIP input size, row-major
        ("stage", pa.string()),  # null, or the ETL stage where the row failed
        ("error", pa.string()),
        ("url", pa.string()),  # where the source tool fetched the image (null if unknown)
        ("width", pa.int32()),  # the image as stored, after EXIF rotation (null if bad)
        ("height", pa.int32()),
    ]
)


class RowError(Exception):
    """One input row cannot be used; ``stage`` is an ETL stage of unclip.schema."""

    def __init__(self, stage: str, message: str) -> None:
        super().__init__(message)
        self.stage = stage
        self.message = message


@dataclass(frozen=True)
class DecodedImage:
    pixels: np.ndarray  # (S, S, 3) uint8: the CLIP input size
    png: bytes | None  # the re-encoded image column (None when not requested)
    width: int  # original size, after EXIF rotation
    height: int


def read_caption(data: bytes | str | None, where: str = "") -> str:
    """Caption text from a ``.txt`` file's bytes (or a string column); strict UTF-8.

    A UTF-8 byte-order mark and surrounding whitespace are removed. Missing, empty or
    undecodable captions raise RowError(stage="caption").
    """
    if data is None:
        raise RowError("caption", f"missing caption{(' ' + where) if where else ''}")
    if isinstance(data, bytes):
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            bad = data[e.start : e.start + 1].hex()
            raise RowError(
                "caption",
                f"caption is not valid UTF-8 (byte 0x{bad} at offset {e.start}); "
                "re-save it as UTF-8",
            ) from None
    else:
        text = data
    text = text.strip()
    if not text:
        raise RowError("caption", "empty caption")
    if "\x00" in text:
        raise RowError("caption", "caption contains NUL characters (binary file?)")
    return text


def open_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Parse the header only and check it; raise RowError(stage="decode") if unusable."""
    if not data:
        raise RowError("decode", "empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise RowError("decode", f"refused before decoding: {e}") from None
    except UnidentifiedImageError:
        raise RowError("decode", f"not an image (unrecognised format, {len(data)} bytes)") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise RowError("decode", f"unreadable image header: {e}") from None
    w, h = img.size
    if w < 1 or h < 1:
        raise RowError("decode", f"image has no pixels ({w}x{h})")
    if w * h > max_pixels:
        raise RowError(
            "decode",
            f"image is {w}x{h} = {w * h / 1e6:.0f} MP, above the limit of "
            f"{max_pixels / 1e6:.0f} MP; refused before decoding (decompression bomb?)",
        )
    return img


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buf.getvalue()


def decode_image(
    data: bytes,
    clip_size: int,
    out_size: int = 0,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> DecodedImage:
    """Bytes -> CLIP-size RGB pixels and (if ``out_size``) a PNG of the square image."""
    img = open_image(data, max_pixels)
    try:
        img.load()
        img = ImageOps.exif_transpose(img)
        rgb = to_rgb(img)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise RowError("decode", f"corrupt image ({img.format}): {e}") from None
    pixels = np.asarray(square(rgb, clip_size), dtype=np.uint8)
    png = png_bytes(square(rgb, out_size)) if out_size else None
    return DecodedImage(pixels, png, rgb.width, rgb.height)


def decode_rows(
    rows: Iterable[RawRow], clip_size: int, out_size: int = 0, max_pixels: int = DEFAULT_MAX_PIXELS
) -> pa.Table:
    """Read rows -> a ``DECODED_SCHEMA`` table: a bad row keeps its id with stage + error."""
    cols: dict[str, list] = {name: [] for name in DECODED_SCHEMA.names}
    for r in rows:
        caption = png = pixels = width = height = None
        problem = r.problem
        if problem is None:
            try:
                caption = read_caption(r.caption)
                img = decode_image(r.image or b"", clip_size, out_size, max_pixels)
                png, pixels = img.png, img.pixels.tobytes()
                width, height = img.width, img.height
            except RowError as e:
                problem = Problem(r.id, r.source, e.stage, e.message)
                caption = None
        cols["id"].append(r.id)
        cols["source"].append(r.source)
        cols["caption"].append(caption)
        cols["image"].append(png)
        cols["pixels"].append(pixels)
        cols["stage"].append(problem.stage if problem else None)
        cols["error"].append(problem.error if problem else None)
        cols["url"].append(r.url)
        cols["width"].append(width)
        cols["height"].append(height)
    return pa.Table.from_pydict(cols, schema=DECODED_SCHEMA)


def decode_unit(
    unit: str, clip_size: int, out_size: int = 0, max_pixels: int = DEFAULT_MAX_PIXELS
) -> pa.Table:
    """One unit of ``pipelines.sources.make_units``: read, then decode each row."""
    return decode_rows(read_unit(unit), clip_size, out_size, max_pixels)


def decode_units(
    batch: pa.Table, clip_size: int, out_size: int = 0, max_pixels: int = DEFAULT_MAX_PIXELS
) -> Iterator[pa.Table]:
    """The CPU stage of the ETL: a batch of units (column ``unit``) -> decoded tables."""
    for unit in batch.column("unit").to_pylist():
        yield decode_unit(unit, clip_size, out_size, max_pixels)
