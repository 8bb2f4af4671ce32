"""Deterministic attribute oracle: reads colour, shape, size, position and background of an image.

No learned weights: classical image analysis that inverts the renderer.

1. background = median colour of the border ring, named by the nearest background colour
   (``"none"`` if none is near); its noise level = the ring's robust spread;
2. objects = 4-connected components of pixels (3x3 box-smoothed) farther than ``CONTRAST``
   from the background, largest first;
3. colour guess = the palette colour whose mixing line background -> colour best explains the
   object's pixels (blurred edges are mixtures, so they lie on it);
4. coverage alpha = projection of each raw pixel onto that line (noise stays zero-mean); its
   mass and centroid are invariant to blur and fix, for each candidate shape, the side and
   centre of the only bounding box with that mass and centroid;
5. shape = the candidate whose rendered coverage (optionally Gaussian-blurred, amplitude
   refitted) is nearest alpha in L2; a poor fit (noise energy removed) gives ``"none"``;
6. colour = nearest palette colour to the colour unmixed by least squares with the fitted
   coverage; if it differs from the guess, step 4-5 are redone with it and the reading that
   confirms its own colour with the lower relative error wins;
7. size and position from the fitted bounding box (thresholds midway between the classes).

Inputs larger than ``MAX_SIDE`` are box-downscaled first; 32 px inputs work as they are.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from PIL import Image

from unclip.shapes.attributes import (
    BACKGROUNDS,
    COLOURS,
    NONE,
    SHAPES,
    SIZES,
    Attributes,
    ObjectAttributes,
)
from unclip.shapes.render import SHAPE_AREA, SHAPE_CENTROID_DY, coverage

ImageLike = Image.Image | np.ndarray

MAX_SIDE = 64  # larger inputs are analysed box-downscaled to 64 px
MIN_SIDE = 8  # smaller inputs have no readable objects
MAX_BACKGROUND_DISTANCE = 0.25  # farther from every background colour -> background "none"
CONTRAST = 0.18  # smoothed RGB distance from the background that counts as foreground
MIN_MASS = 0.01  # smallest object, as a fraction of the image area (a small triangle is ~0.036)
SECOND_OBJECT_RATIO = 0.3  # a further object must have >= this fraction of the largest's mass
COLOUR_TIE = 0.05  # mixing-line scores this close: read the object with both colours
MAX_COLOUR_RESIDUAL = 0.25  # worse mixing-line fit (RGB distance) -> colour "none"
MAX_SHAPE_ERROR = 0.2  # worse relative L2 template error (noise removed) -> "none"
TEMPLATE_BLURS = (0.0, 0.8, 1.6)  # Gaussian sigmas (px) tried on shape templates
MAX_AMPLITUDE_CHANGE = 0.15  # coverage may be fitted at 0.85..1.15 of the palette colour
SIZE_THRESHOLD = float(np.sqrt(SIZES["small"] * SIZES["large"]))  # side fraction
CENTRE_THRESHOLD = 0.075  # max |offset| of the box centre from the image centre for "centre"

_PALETTE = np.asarray(list(COLOURS.values()), dtype=np.float32) / 255  # (K, 3)
_BACKGROUNDS = np.asarray(list(BACKGROUNDS.values()), dtype=np.float32) / 255  # (B, 3)


@dataclass(frozen=True)
class Detection:
    """One object read from an image; cx, cy, side normalised like the renderer's geometry.

    ``mass`` is the coverage area as a fraction of the image, ``colour_residual`` the mean RGB
    distance of its pixels from the chosen mixing line, ``shape_error`` the relative L2 error
    of the best shape template.
    """

    colour: str
    shape: str
    size: str
    position: str
    cx: float
    cy: float
    side: float
    mass: float
    colour_residual: float
    shape_error: float

    @property
    def attributes(self) -> ObjectAttributes:
        return ObjectAttributes(self.colour, self.shape, self.size, self.position)


def to_array(image: ImageLike) -> np.ndarray:
    """Image as float32 RGB (H, W, 3) in [0, 1], downscaled to at most ``MAX_SIDE`` px, square.

    Accepts a PIL image of any mode, or an array (H, W), (H, W, 1|3|4), or (1|3, H, W):
    uint8 in [0, 255] or float in [0, 1] (values outside are clipped, NaN becomes 0).
    """
    if isinstance(image, Image.Image):
        pil = image.convert("RGB")
    else:
        arr = np.asarray(image)
        if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3, 4):
            arr = arr.transpose(1, 2, 0)  # CHW -> HWC
        if arr.ndim == 2:
            arr = arr[..., None]
        if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4) or 0 in arr.shape:
            raise ValueError(f"expected an image array (H, W[, C]), got shape {arr.shape}")
        arr = arr[..., :3] if arr.shape[-1] != 1 else np.repeat(arr, 3, axis=-1)
        if arr.dtype != np.uint8:
            scaled = np.nan_to_num(arr.astype(np.float32), nan=0.0)
            arr = np.rint(np.clip(scaled, 0.0, 1.0) * 255).astype(np.uint8)
        pil = Image.fromarray(np.ascontiguousarray(arr))
    w, h = pil.size
    side = min(max(w, h), MAX_SIDE)
    if (w, h) != (side, side):
        pil = pil.resize((side, side), Image.Resampling.BOX)
    return np.asarray(pil, dtype=np.float32) / 255


@functools.lru_cache(maxsize=64)
def _filter_matrix(n: int, kind: str, param: float) -> np.ndarray:
    """(n, n) matrix M with M @ x = x filtered along axis 0, edges replicated (read-only).

    kind "gauss": Gaussian of std ``param`` px; "box": box of radius ``param`` (int) px.
    """
    if kind == "gauss":
        r = int(np.ceil(3 * param))
        k = np.exp(-0.5 * (np.arange(-r, r + 1) / param) ** 2)
        k /= k.sum()
    else:
        r = int(param)
        k = np.ones(2 * r + 1)
    m = np.zeros((n, n), dtype=np.float32)
    for offset, w in zip(range(-r, r + 1), k, strict=True):
        cols = np.clip(np.arange(n) + offset, 0, n - 1)
        np.add.at(m, (np.arange(n), cols), w)
    m.setflags(write=False)
    return m


def _filter2d(x: np.ndarray, kind: str, param: float) -> np.ndarray:
    """Separable filter of (H, W) or (H, W, C) ``x`` (square images)."""
    m = _filter_matrix(x.shape[0], kind, param)
    if x.ndim == 2:
        return m @ x @ m.T
    return np.einsum("ij,jkc,lk->ilc", m, x, m, optimize=True)


def _box3(x: np.ndarray) -> np.ndarray:
    """3x3 mean filter of (H, W, C) ``x``."""
    return _filter2d(x, "box", 1) / 9


def _gaussian(x: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of (H, W) ``x`` with std ``sigma`` px (identity for sigma <= 0)."""
    return x if sigma <= 0 else _filter2d(x, "gauss", sigma)


def _dilate(mask: np.ndarray, r: int) -> np.ndarray:
    """Binary dilation of (H, W) ``mask`` by a (2r+1)^2 square."""
    return _filter2d(mask.astype(np.float32), "box", r) > 0.5


def _label(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """4-connected components of a boolean (H, W) mask: labels int32 (H, W), 0 = none, count."""
    h, w = mask.shape
    padded = np.zeros((h, w + 2), dtype=np.int8)
    padded[:, 1:-1] = mask
    edges = np.diff(padded, axis=1)  # (H, W + 1): +1 where a run starts, -1 where it ends
    rows, starts = (a.tolist() for a in np.nonzero(edges == 1))
    ends = np.nonzero(edges == -1)[1].tolist()  # row-major order: pairs with starts
    parent = list(range(len(starts)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first = np.searchsorted(np.asarray(rows, dtype=np.int64), np.arange(h + 1)).tolist()
    for r in range(1, h):  # merge runs of consecutive rows that overlap
        i, j, i_end, j_end = first[r - 1], first[r], first[r], first[r + 1]
        while i < i_end and j < j_end:
            if starts[i] < ends[j] and starts[j] < ends[i]:
                a, b = find(i), find(j)
                if a != b:
                    parent[max(a, b)] = min(a, b)
            if ends[i] <= ends[j]:
                i += 1
            else:
                j += 1
    labels = np.zeros((h, w), dtype=np.int32)
    ids: dict[int, int] = {}
    for k, (r, s, e) in enumerate(zip(rows, starts, ends, strict=True)):
        labels[r, s:e] = ids.setdefault(find(k), len(ids) + 1)
    return labels, len(ids)


def _background(x: np.ndarray) -> tuple[str, np.ndarray, np.ndarray]:
    """Background of (H, W, 3) ``x`` from a border ring of width ~H/32.

    Returns its name (``"none"`` if no background colour is within ``MAX_BACKGROUND_DISTANCE``),
    its RGB (3,) (the ring's median) and the pixel noise std per channel (3,) (robust, MAD).
    """
    b = max(1, x.shape[0] // 32)
    ring = np.concatenate([x[:b], x[-b:], x[:, :b].swapaxes(0, 1), x[:, -b:].swapaxes(0, 1)])
    ring = ring.reshape(-1, 3)
    rgb = np.median(ring, axis=0)
    noise = 1.4826 * np.median(np.abs(ring - rgb), axis=0)
    dist = np.linalg.norm(_BACKGROUNDS - rgb, axis=1)
    k = int(np.argmin(dist))
    name = list(BACKGROUNDS)[k] if dist[k] <= MAX_BACKGROUND_DISTANCE else NONE
    return name, rgb, noise


def _colour_scores(pixels: np.ndarray, weights: np.ndarray, bg: np.ndarray) -> np.ndarray:
    """Per palette colour (K,): weighted mean RGB distance of ``pixels`` (N, 3) from the segment
    bg -> colour. Blurred edges are mixtures of object and background, so they lie on it."""
    v = _PALETTE - bg  # (K, 3)
    rel = pixels - bg  # (N, 3)
    t = np.clip(rel @ v.T / np.maximum((v * v).sum(1), 1e-6), 0.0, 1.0)  # (N, K)
    resid = np.linalg.norm(rel[:, None, :] - t[..., None] * v[None], axis=-1)  # (N, K)
    return weights @ resid / weights.sum()


def _position(cx: float, cy: float) -> str:
    dx, dy = cx - 0.5, cy - 0.5
    if max(abs(dx), abs(dy)) < CENTRE_THRESHOLD:
        return "centre"
    return ("top" if dy < 0 else "bottom") + "_" + ("left" if dx < 0 else "right")


class _Fit(NamedTuple):
    """A shape fitted to a coverage map; ``template`` (H, W) is its unit-amplitude coverage."""

    sq_error: float
    shape: str
    cy: float
    side: float
    amplitude: float
    template: np.ndarray


def _fit_shape(alpha: np.ndarray, cx: float, cy: float, area: float, amplitude: float) -> _Fit:
    """Best shape template for coverage ``alpha`` (H, W) with mass ``area`` and centroid cx, cy.

    Each shape's box has the side and centre that give its template (times ``amplitude``) the
    observed mass and centroid; templates are also tried Gaussian-blurred. The returned
    amplitude is the least-squares one of the best template (clamped).
    """
    size = alpha.shape[0]
    best = _Fit(np.inf, NONE, cy, 0.0, amplitude, np.zeros_like(alpha))
    for shape in SHAPES:
        side = float(np.sqrt(area / (amplitude * SHAPE_AREA[shape])))
        box_cy = cy - SHAPE_CENTROID_DY[shape] * side
        template = coverage(shape, cx, box_cy, side, size)
        for sigma in TEMPLATE_BLURS:
            t = _gaussian(template, sigma)
            sq = float(((alpha - amplitude * t) ** 2).sum())
            if sq < best.sq_error:
                fitted = float((alpha * t).sum()) / max(float((t * t).sum()), 1e-6)
                fitted = float(np.clip(fitted, 1 - MAX_AMPLITUDE_CHANGE, 1 + MAX_AMPLITUDE_CHANGE))
                best = _Fit(sq, shape, box_cy, side, fitted, t)
    return best


class _Reading(NamedTuple):
    """Coverage of an object along the colour line bg -> palette[k], and the shape fitted to it."""

    k: int
    alpha: np.ndarray  # (H, W) coverage, zero outside the object's region
    cx: float  # centroid x (normalised)
    area: float  # mass as a fraction of the image
    fit: _Fit
    unmixed_k: int  # palette colour nearest the colour unmixed with the fitted coverage


def _read_along(x: np.ndarray, bg: np.ndarray, region: np.ndarray, k: int) -> _Reading | None:
    """Fit the object in ``region`` (H, W) assuming colour ``k``; None if it has too little mass."""
    size = x.shape[0]
    v = _PALETTE[k] - bg
    alpha = np.where(region, (x - bg) @ v / float(v @ v), 0.0).astype(np.float32)  # (H, W)
    mass = float(alpha.sum())
    if mass < MIN_MASS * size * size:
        return None
    centres = (np.arange(size, dtype=np.float32) + 0.5) / size
    cx = float(alpha.sum(0) @ centres / mass)
    cy = float(alpha.sum(1) @ centres / mass)
    area = mass / (size * size)
    # Shapes are ranked by plain L2 error: pixel noise adds the same energy to every candidate.
    # The first pass assumes the palette colour (amplitude 1); if the best fit says the object
    # is fainter or stronger (shifted colours), refit all shapes with that amplitude.
    fit = _fit_shape(alpha, cx, cy, area, 1.0)
    if abs(fit.amplitude - 1.0) > 0.02:
        fit = _fit_shape(alpha, cx, cy, area, fit.amplitude)
    # Unmix the colour with the fitted coverage (blur included): least squares of
    # x - bg = coverage * (colour - bg) over the region.
    t = np.where(region, fit.template, 0.0)
    unmixed = bg + np.einsum("hw,hwc->c", t, x - bg) / max(float((t * t).sum()), 1e-6)
    unmixed_k = int(np.argmin(np.linalg.norm(_PALETTE - unmixed, axis=1)))
    return _Reading(k, alpha, cx, area, fit, unmixed_k)


def _read_object(
    x: np.ndarray, smooth: np.ndarray, bg: np.ndarray, noise: np.ndarray, comp: np.ndarray
) -> Detection | None:
    """Read the object of component mask ``comp`` (H, W); None if it has too little mass.

    x, smooth: raw and box-smoothed image (H, W, 3); bg, noise: background RGB and noise std (3,).
    A colour guess (the best mixing line, and the runner-up if within ``COLOUR_TIE``) fixes
    the coverage map and so the shape fit; the fit unmixes the colour, and if that names
    another palette colour the object is read with it too. The reading kept confirms its own
    colour and has the lowest relative shape error.
    """
    dist = np.linalg.norm(smooth[comp] - bg, axis=-1)
    scores = _colour_scores(smooth[comp], dist, bg)
    order = np.argsort(scores, kind="stable").tolist()
    candidates = [order[0]] + [k for k in order[1:2] if scores[k] - scores[order[0]] < COLOUR_TIE]
    region = _dilate(comp, 2)
    readings: dict[int, _Reading] = {}
    tried: set[int] = set()
    while candidates:
        k = candidates.pop(0)
        tried.add(k)
        reading = _read_along(x, bg, region, k)
        if reading is not None:
            readings[k] = reading
            if reading.unmixed_k not in tried | set(candidates):
                candidates.append(reading.unmixed_k)
    # Prefer readings that confirm their own colour, then the best relative shape fit.
    reading = min(
        readings.values(),
        key=lambda r: (r.unmixed_k != r.k, r.fit.sq_error / max(float((r.alpha**2).sum()), 1e-6)),
        default=None,
    )
    if reading is None:
        return None
    residual = float(scores[reading.k])
    fit = reading.fit
    v = _PALETTE[reading.k] - bg
    vv = float(v @ v)
    # Report the error relative to the signal energy, with the expected noise energy removed.
    noise_energy = float(region.sum()) * float((noise * noise) @ (v * v)) / vv**2
    signal = max(float((reading.alpha * reading.alpha).sum()) - noise_energy, 1e-6)
    err = max(fit.sq_error - noise_energy, 0.0) / signal
    return Detection(
        colour=list(COLOURS)[reading.k] if residual <= MAX_COLOUR_RESIDUAL else NONE,
        shape=fit.shape if err <= MAX_SHAPE_ERROR else NONE,
        size="large" if fit.side > SIZE_THRESHOLD else "small",
        position=_position(reading.cx, fit.cy),
        cx=reading.cx,
        cy=fit.cy,
        side=fit.side,
        mass=reading.area,
        colour_residual=residual,
        shape_error=err,
    )


def detect(image: ImageLike, max_objects: int = 2) -> tuple[str, list[Detection]]:
    """Background name and up to ``max_objects`` objects, largest (by mass) first."""
    x = to_array(image)
    background, bg, noise = _background(x)
    if x.shape[0] < MIN_SIDE:
        return background, []
    smooth = _box3(x)
    labels, count = _label(np.linalg.norm(smooth - bg, axis=-1) > CONTRAST)
    if count == 0:
        return background, []
    areas = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    candidates = np.argsort(-areas, kind="stable")[: max_objects + 2] + 1
    found = []
    for label in candidates:
        if areas[label - 1] < MIN_MASS * x.shape[0] * x.shape[1] / 2:
            break
        det = _read_object(x, smooth, bg, noise, labels == label)
        if det is not None:
            found.append(det)
    found.sort(key=lambda d: -d.mass)
    kept = [d for d in found if d.mass >= SECOND_OBJECT_RATIO * found[0].mass] if found else []
    return background, kept[:max_objects]


def analyse(image: ImageLike) -> Attributes:
    """Attributes of the largest object (all ``"none"`` but the background if there is none)."""
    background, found = detect(image, max_objects=1)
    if not found:
        return Attributes(NONE, NONE, NONE, NONE, background)
    d = found[0]
    return Attributes(d.colour, d.shape, d.size, d.position, background)


def analyse_batch(images: Iterable[ImageLike]) -> list[Attributes]:
    """:func:`analyse` over a batch (a list of images, or a (B, H, W, C) / (B, C, H, W) array)."""
    return [analyse(image) for image in images]


def analyse_objects(image: ImageLike, max_objects: int = 2) -> tuple[str, list[ObjectAttributes]]:
    """Background name and the attributes of up to ``max_objects`` objects, largest first."""
    background, found = detect(image, max_objects)
    return background, [d.attributes for d in found]


def _relation(a: Detection, b: Detection, relation: str) -> bool:
    """Whether ``a`` stands in ``relation`` to ``b`` (by box centres)."""
    dx, dy = a.cx - b.cx, a.cy - b.cy
    horizontal = abs(dx) >= abs(dy)
    return {
        "left_of": horizontal and dx < 0,
        "right_of": horizontal and dx > 0,
        "above": not horizontal and dy < 0,
        "below": not horizontal and dy > 0,
    }[relation]


def score(image: ImageLike, attributes: Attributes) -> dict[str, bool]:
    """Per-attribute correctness of ``image`` against the attributes it should show.

    One object: keys colour, shape, size, position, background, and ``all`` (the four object
    attributes right). Two objects: keys count (exactly two objects found), colour and shape
    (right multisets), binding (each object has its own colour-shape pair), relation (the
    objects stand in the stated relation), background, and ``all`` (count, binding, relation).
    """
    if attributes.second is None:
        got = analyse(image)
        result = {
            k: getattr(got, k) == getattr(attributes, k)
            for k in ("colour", "shape", "size", "position", "background")
        }
        result["all"] = all(result[k] for k in ("colour", "shape", "size", "position"))
        return result
    assert attributes.relation is not None
    background, found = detect(image, max_objects=3)
    want = attributes.objects
    pairs = {(d.colour, d.shape): d for d in found}
    first = pairs.get((want[0].colour, want[0].shape))
    second = pairs.get((want[1].colour, want[1].shape))
    result = {
        "count": len(found) == 2,
        "colour": sorted(d.colour for d in found) == sorted(o.colour for o in want),
        "shape": sorted(d.shape for d in found) == sorted(o.shape for o in want),
        "binding": first is not None and second is not None and first is not second,
        "relation": first is not None
        and second is not None
        and first is not second
        and _relation(first, second, attributes.relation),
        "background": background == attributes.background,
    }
    result["all"] = result["count"] and result["binding"] and result["relation"]
    return result
