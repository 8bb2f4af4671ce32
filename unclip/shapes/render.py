"""Deterministic renderer of shapes scenes.

Geometry is resolution-free: each object is a shape inside an axis-aligned square bounding
box given by its centre and side in normalised coordinates (fractions of the image side,
y downwards). Pixels are the area coverage of the shape, estimated on a supersampled grid,
so a render at 32 px equals a 64 px render box-downscaled by 2, up to supersampling error.

Shapes inside the unit bounding box [-1/2, 1/2]^2 (u right, v down):
    circle    inscribed disc
    square    the whole box
    triangle  apex at the top centre, base along the bottom edge (height = base = side)
    cross     plus sign, arm width side/3
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

from unclip.shapes.attributes import (
    BACKGROUNDS,
    COLOURS,
    MARGIN,
    POSITION_JITTER,
    RGB,
    SIZE_JITTER,
    SIZES,
    Attributes,
    ObjectAttributes,
    check_value,
)
from unclip.shapes.captions import item_rng, sample_item

SUPERSAMPLE = 4

# Area of each shape and offset of its centroid below the bounding-box centre, both for a
# unit bounding box (the oracle fits shapes by these moments).
SHAPE_AREA: dict[str, float] = {
    "circle": np.pi / 4,
    "square": 1.0,
    "triangle": 0.5,
    "cross": 5 / 9,
}
SHAPE_CENTROID_DY: dict[str, float] = {
    "circle": 0.0,
    "square": 0.0,
    "triangle": 1 / 6,
    "cross": 0.0,
}


@dataclass(frozen=True)
class Placement:
    """One object to draw: shape, colour and bounding box (centre cx, cy and side, normalised)."""

    shape: str
    rgb: RGB
    cx: float
    cy: float
    side: float


@dataclass(frozen=True)
class Item:
    """One dataset item: ``image`` is RGB of the requested size."""

    id: str
    caption: str
    attributes: Attributes
    image: Image.Image


def _inside(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean mask of points (u, v) (unit-box coordinates, broadcast) inside ``shape``."""
    in_box = (np.abs(u) <= 0.5) & (np.abs(v) <= 0.5)
    if shape == "circle":
        return u * u + v * v <= 0.25
    if shape == "square":
        return in_box
    if shape == "triangle":
        return in_box & (np.abs(u) <= (v + 0.5) / 2)
    if shape == "cross":
        return in_box & ((np.abs(u) <= 1 / 6) | (np.abs(v) <= 1 / 6))
    check_value("shape", shape, allow_none=False)
    raise AssertionError("unreachable")


def coverage(
    shape: str, cx: float, cy: float, side: float, size: int, supersample: int = SUPERSAMPLE
) -> np.ndarray:
    """Fraction of each pixel covered by the shape: float32 (size, size) in [0, 1].

    cx, cy, side are normalised (fractions of the image side). Only the bounding box (plus one
    pixel) is sampled, on a ``supersample`` x ``supersample`` grid per pixel.
    """
    out = np.zeros((size, size), dtype=np.float32)
    half = side / 2
    x0, x1 = (
        max(0, int(np.floor((cx - half) * size)) - 1),
        min(size, int(np.ceil((cx + half) * size)) + 1),
    )
    y0, y1 = (
        max(0, int(np.floor((cy - half) * size)) - 1),
        min(size, int(np.ceil((cy + half) * size)) + 1),
    )
    if x1 <= x0 or y1 <= y0 or side <= 0:
        return out
    step = 1.0 / (size * supersample)
    xs = (np.arange(x0 * supersample, x1 * supersample) + 0.5) * step  # sample centres
    ys = (np.arange(y0 * supersample, y1 * supersample) + 0.5) * step
    inside = _inside(shape, ((xs - cx) / side)[None, :], ((ys - cy) / side)[:, None])
    h, w = y1 - y0, x1 - x0
    out[y0:y1, x0:x1] = inside.reshape(h, supersample, w, supersample).mean(axis=(1, 3))
    return out


def render(
    placements: tuple[Placement, ...] | list[Placement],
    background: RGB,
    size: int = 64,
    supersample: int = SUPERSAMPLE,
) -> Image.Image:
    """Draw ``placements`` in order over a flat ``background``; returns an RGB image (size, size)."""
    if size < 4:
        raise ValueError(f"image size must be >= 4 px, got {size}")
    canvas = np.empty((size, size, 3), dtype=np.float32)
    canvas[:] = np.asarray(background, dtype=np.float32)
    for p in placements:
        alpha = coverage(p.shape, p.cx, p.cy, p.side, size, supersample)[..., None]  # (H, W, 1)
        canvas += alpha * (np.asarray(p.rgb, dtype=np.float32) - canvas)
    return Image.fromarray(np.rint(canvas).astype(np.uint8))


def anchor(position: str, side: float) -> tuple[float, float]:
    """Bounding-box centre (cx, cy) of an object of ``side`` at ``position``, before jitter."""
    offset = 0.5 - MARGIN - side / 2  # corner objects keep MARGIN from the image edges
    if position == "centre":
        return 0.5, 0.5
    check_value("position", position, allow_none=False)
    vertical, horizontal = position.split("_")
    cx = 0.5 - offset if horizontal == "left" else 0.5 + offset
    cy = 0.5 - offset if vertical == "top" else 0.5 + offset
    return cx, cy


def place(obj: ObjectAttributes, rng: np.random.Generator) -> Placement:
    """Jittered geometry for one object (side, then centre jitter, drawn from ``rng``)."""
    side = SIZES[obj.size] + rng.uniform(-SIZE_JITTER, SIZE_JITTER)
    cx, cy = anchor(obj.position, side)
    jx, jy = rng.uniform(-POSITION_JITTER, POSITION_JITTER, size=2)
    return Placement(obj.shape, COLOURS[obj.colour], cx + jx, cy + jy, side)


def render_attributes(
    attributes: Attributes, rng: np.random.Generator, size: int = 64
) -> Image.Image:
    """Render ``attributes`` with jitter drawn from ``rng``."""
    placements = [place(obj, rng) for obj in attributes.objects]
    return render(placements, BACKGROUNDS[attributes.background], size)


def item_id(seed: int, index: int) -> str:
    """Stable id of item ``index`` of dataset ``seed`` (file stem of its .png and .txt)."""
    return f"{seed}_{index:07d}"


def make_item(seed: int, index: int, size: int = 64, two_object_fraction: float = 0.0) -> Item:
    """Item ``index`` of the dataset made with ``seed``: a function of (seed, index) only."""
    attributes, text = sample_item(seed, index, two_object_fraction)
    image = render_attributes(attributes, item_rng(seed, index, 1), size)
    return Item(item_id(seed, index), text, attributes, image)


def png_bytes(image: Image.Image) -> bytes:
    """Encode as PNG (deterministic for a given Pillow/zlib)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()
