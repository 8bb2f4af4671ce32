"""Image decoding and caption reading for the embedding ETL: plain Python, no Ray.

Every function here either returns a usable value or raises :class:`RowError` with the ETL
stage (``decode`` / ``caption``) and a one-line reason that goes into the errors table.

Images: only the formats of ``ACCEPTED_FORMATS`` are parsed at all (Pillow's other
plugins, e.g. EPS through Ghostscript, never see the bytes); the header is checked before
any pixel is decoded (zero bytes, not an image, a format not accepted, too many pixels), then the image is fully loaded (a truncated file fails here), its EXIF
orientation applied, and it is brought to 8-bit RGB: alpha (RGBA, LA, transparent palette)
is composited on white, 16-bit greyscale is scaled (not clipped) to 8 bits, CMYK and
greyscale are converted. Each output image is a centre square crop resized with an
antialiasing filter.

One row never fails a job: any other exception while reading or decoding a row (a Pillow
plugin bug, a storage error) becomes that row's error, and a unit whose read fails as a
whole records each of its rows (``decode_unit``).
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from PIL import Image, ImageOps, UnidentifiedImageError

from pipelines.sources import Problem, RawRow, read_unit, unit_entries
from unclip.images import square, to_rgb

# Pillow's own limit (about 89 MP): above it Pillow warns, above twice it refuses.
DEFAULT_MAX_PIXELS = int(Image.MAX_IMAGE_PIXELS or 89_478_485)
# The image formats the ETL decodes (Pillow format names); anything else is a decode error.
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
ACCEPTED_NAMES = "JPEG, PNG, WebP, GIF, BMP, TIFF"
# Signatures of common formats outside the list, only to name them in the error.
OTHER_FORMATS = (
    (0, b"8BPS", "PSD"),
    (0, b"%PDF", "PDF"),
    (0, b"%!PS", "PostScript/EPS"),
    (0, b"\xc5\xd0\xd3\xc6", "EPS"),
    (0, b"\x00\x00\x01\x00", "ICO"),
    (0, b"icns", "ICNS"),
    (0, b"DDS ", "DDS"),
    (0, b"qoif", "QOI"),
    (0, b"gimp xcf", "XCF"),
    (0, b"\xff\x4f\xff\x51", "JPEG 2000"),
    (4, b"jP  ", "JPEG 2000"),
    (0, b"\xff\x0a", "JPEG XL"),
    (4, b"JXL ", "JPEG XL"),
    (4, b"ftypheic", "HEIC"),
    (4, b"ftypheix", "HEIC"),
    (4, b"ftypmif1", "HEIF"),
    (4, b"ftypavif", "AVIF"),
    (0, b"<svg", "SVG"),
    (0, b"<?xml", "XML/SVG"),
)
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


def other_format(data: bytes) -> str | None:
    """The name of a known image format outside ``ACCEPTED_FORMATS`` (by signature)."""
    for offset, magic, name in OTHER_FORMATS:
        if data[offset : offset + len(magic)] == magic:
            return name
    return None


def open_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Parse the header only and check it; raise RowError(stage="decode") if unusable."""
    if not data:
        raise RowError("decode", "empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except Image.DecompressionBombError as e:
        raise RowError("decode", f"refused before decoding: {e}") from None
    except UnidentifiedImageError:
        name = other_format(data[:256].lstrip())
        if name:
            raise RowError(
                "decode",
                f"image format {name} is not accepted (accepted: {ACCEPTED_NAMES}); "
                "convert the image to one of them",
            ) from None
        raise RowError(
            "decode",
            f"not an image in an accepted format ({ACCEPTED_NAMES}): unrecognised data, "
            f"{len(data)} bytes",
        ) from None
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
            stage = "caption"
            try:
                caption = read_caption(r.caption)
                stage = "decode"
                img = decode_image(r.image or b"", clip_size, out_size, max_pixels)
                png, pixels = img.png, img.pixels.tobytes()
                width, height = img.width, img.height
            except RowError as e:
                problem = Problem(r.id, r.source, e.stage, e.message)
            except Exception as e:  # noqa: BLE001 - one row never fails the job
                problem = Problem(r.id, r.source, stage, f"unexpected {type(e).__name__}: {e}")
            if problem is not None:
                caption = png = pixels = width = height = None
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
    """One unit of ``pipelines.sources.make_units``: read, then decode each row. If the
    unit cannot be read at all (a shard or row group gone bad), each of its rows is
    recorded with stage ``read`` and the reason."""
    try:
        rows = read_unit(unit)
    except Exception as e:  # noqa: BLE001 - recorded per row, the job goes on
        msg = f"cannot read the rows' shard: {type(e).__name__}: {e}"
        rows = [
            RawRow(u.id, u.source, None, None, Problem(u.id, u.source, "read", msg))
            for u in unit_entries(unit)
        ]
    return decode_rows(rows, clip_size, out_size, max_pixels)


def decode_units(
    batch: pa.Table, clip_size: int, out_size: int = 0, max_pixels: int = DEFAULT_MAX_PIXELS
) -> Iterator[pa.Table]:
    """The CPU stage of the ETL: a batch of units (column ``unit``) -> decoded tables."""
    for unit in batch.column("unit").to_pylist():
        yield decode_unit(unit, clip_size, out_size, max_pixels)
