"""Vocabulary of the shapes dataset: the single source of truth for every attribute value.

Renderer, captions, oracle and evaluation all read their values from here. Canonical values
are short identifiers (``"top_left"``, ``"cyan"``); captions use the synonyms below.

Geometry is in normalised image coordinates: x to the right, y downwards, both in [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RGB = tuple[int, int, int]

NONE = "none"
"""Value the oracle returns for an attribute it cannot read (blank image, noise)."""

# Object colours: pairwise RGB distance >= 0.39 (on the [0, 1] scale), >= 0.41 from every
# background, so blur, noise and a slight colour shift cannot turn one into another.
COLOURS: dict[str, RGB] = {
    "red": (215, 35, 35),
    "orange": (255, 140, 0),
    "yellow": (240, 230, 40),
    "green": (35, 165, 55),
    "cyan": (20, 200, 210),
    "blue": (40, 75, 230),
    "purple": (140, 50, 200),
    "pink": (240, 90, 200),
}

BACKGROUNDS: dict[str, RGB] = {
    "grey": (128, 128, 128),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "beige": (225, 205, 160),
    "navy": (25, 35, 100),
}

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")

SIZES: dict[str, float] = {"small": 0.30, "large": 0.56}
"""Nominal side of the shape's bounding box, as a fraction of the image side."""
SIZE_JITTER = 0.03  # the side is drawn uniformly in nominal +- SIZE_JITTER

POSITIONS: tuple[str, ...] = ("top_left", "top_right", "bottom_left", "bottom_right", "centre")
MARGIN = 0.06  # gap between a corner object's bounding box and the image edge
POSITION_JITTER = 0.025  # bounding-box centre drawn uniformly in anchor +- POSITION_JITTER

RELATIONS: tuple[str, ...] = ("left_of", "right_of", "above", "below")
"""Spatial relation of the first object to the second, in two-object scenes."""

# Ordered position pairs (first object, second object) of two-object scenes, with the relation
# they express. Both objects are small; diagonal pairs and the centre are left out so the
# relation is never ambiguous.
PAIR_LAYOUTS: dict[tuple[str, str], str] = {
    ("top_left", "top_right"): "left_of",
    ("bottom_left", "bottom_right"): "left_of",
    ("top_right", "top_left"): "right_of",
    ("bottom_right", "bottom_left"): "right_of",
    ("top_left", "bottom_left"): "above",
    ("top_right", "bottom_right"): "above",
    ("bottom_left", "top_left"): "below",
    ("bottom_right", "top_right"): "below",
}

# Words a caption may use for each value. Within a category, no value's phrase occurs (as whole
# words) inside a caption about another value (tests/test_shapes.py checks this), so every
# caption names its attributes unambiguously while still needing to be read, not matched.
SYNONYMS: dict[str, dict[str, tuple[str, ...]]] = {
    "colour": {
        "red": ("red", "crimson", "scarlet"),
        "orange": ("orange", "tangerine", "amber"),
        "yellow": ("yellow", "lemon", "golden"),
        "green": ("green", "emerald", "grass-green"),
        "cyan": ("cyan", "turquoise", "aqua", "teal"),
        "blue": ("blue", "cobalt", "royal blue"),
        "purple": ("purple", "violet", "lilac"),
        "pink": ("pink", "magenta", "hot pink", "fuchsia"),
    },
    "shape": {
        "circle": ("circle", "disc", "disk", "round shape"),
        "square": ("square", "box", "block", "square shape"),
        "triangle": ("triangle", "triangular shape", "three-sided shape"),
        "cross": ("cross", "plus sign", "plus", "cross shape"),
    },
    "size": {
        "small": ("small", "tiny", "little", "smallish"),
        "large": ("large", "big", "huge", "giant"),
    },
    # Bare position names ("red disc, small, upper left").
    "position": {
        "top_left": ("top left", "top-left", "upper left", "upper-left corner", "top left corner"),
        "top_right": (
            "top right",
            "top-right",
            "upper right",
            "upper-right corner",
            "top right corner",
        ),
        "bottom_left": (
            "bottom left",
            "bottom-left",
            "lower left",
            "lower-left corner",
            "bottom left corner",
        ),
        "bottom_right": (
            "bottom right",
            "bottom-right",
            "lower right",
            "lower-right corner",
            "bottom right corner",
        ),
        "centre": ("centre", "center", "middle", "central", "centred"),
    },
    # Prepositional phrases ("a small red circle in the top left corner").
    "where": {
        "top_left": (
            "in the top left corner",
            "at the top left",
            "in the upper left",
            "in the top-left corner",
            "at the upper-left",
        ),
        "top_right": (
            "in the top right corner",
            "at the top right",
            "in the upper right",
            "in the top-right corner",
            "at the upper-right",
        ),
        "bottom_left": (
            "in the bottom left corner",
            "at the bottom left",
            "in the lower left",
            "in the bottom-left corner",
            "at the lower-left",
        ),
        "bottom_right": (
            "in the bottom right corner",
            "at the bottom right",
            "in the lower right",
            "in the bottom-right corner",
            "at the lower-right",
        ),
        "centre": ("in the centre", "in the center", "in the middle", "at the centre", "centred"),
    },
    "background": {
        "grey": ("grey", "gray"),
        "white": ("white", "snow-white"),
        "black": ("black", "jet-black"),
        "beige": ("beige", "cream", "sand-coloured"),
        "navy": ("navy", "midnight"),
    },
    "relation": {
        "left_of": ("to the left of", "left of", "on the left of"),
        "right_of": ("to the right of", "right of", "on the right of"),
        "above": ("above", "over", "higher than"),
        "below": ("below", "under", "beneath"),
    },
}

INVERSE_RELATION: dict[str, str] = {
    "left_of": "right_of",
    "right_of": "left_of",
    "above": "below",
    "below": "above",
}

_VOCAB: dict[str, tuple[str, ...]] = {
    "colour": tuple(COLOURS),
    "shape": SHAPES,
    "size": tuple(SIZES),
    "position": POSITIONS,
    "background": tuple(BACKGROUNDS),
    "relation": RELATIONS,
}


def check_value(kind: str, value: str, allow_none: bool = True) -> str:
    """Return ``value`` if it is a valid ``kind`` value, else raise ValueError with the choices."""
    valid = _VOCAB[kind]
    if value in valid or (allow_none and value == NONE):
        return value
    raise ValueError(f"unknown {kind} {value!r}; valid: {', '.join(valid)}")


@dataclass(frozen=True)
class ObjectAttributes:
    """One object's attributes (no background)."""

    colour: str
    shape: str
    size: str
    position: str

    def __post_init__(self) -> None:
        for kind in ("colour", "shape", "size", "position"):
            check_value(kind, getattr(self, kind))


@dataclass(frozen=True)
class Attributes:
    """What an image shows: one object on a background, or optionally a second object.

    ``relation`` is the relation of the first object to the second (``"left_of"``: the first
    object is to the left of the second); both are None in one-object scenes.
    """

    colour: str
    shape: str
    size: str
    position: str
    background: str
    second: ObjectAttributes | None = None
    relation: str | None = None

    def __post_init__(self) -> None:
        for kind in ("colour", "shape", "size", "position", "background"):
            check_value(kind, getattr(self, kind))
        if (self.second is None) != (self.relation is None):
            raise ValueError("second object and relation must be given together")
        if self.relation is not None:
            check_value("relation", self.relation, allow_none=False)

    @property
    def first(self) -> ObjectAttributes:
        return ObjectAttributes(self.colour, self.shape, self.size, self.position)

    @property
    def objects(self) -> tuple[ObjectAttributes, ...]:
        return (self.first,) if self.second is None else (self.first, self.second)

    def to_row(self) -> dict[str, str | None]:
        """Flat dict with the ``attributes.parquet`` columns (second-object columns nullable)."""
        second = self.second
        return {
            "colour": self.colour,
            "shape": self.shape,
            "size": self.size,
            "position": self.position,
            "background": self.background,
            "colour2": second.colour if second else None,
            "shape2": second.shape if second else None,
            "size2": second.size if second else None,
            "position2": second.position if second else None,
            "relation": self.relation,
        }

    @classmethod
    def from_row(cls, row: dict[str, str | None]) -> Attributes:
        """Inverse of :meth:`to_row` (extra keys such as id and caption are ignored)."""
        second = None
        if row.get("colour2") is not None:
            second = ObjectAttributes(
                str(row["colour2"]), str(row["shape2"]), str(row["size2"]), str(row["position2"])
            )
        return cls(
            colour=str(row["colour"]),
            shape=str(row["shape"]),
            size=str(row["size"]),
            position=str(row["position"]),
            background=str(row["background"]),
            second=second,
            relation=None if second is None else str(row["relation"]),
        )


ROW_COLUMNS: tuple[str, ...] = tuple(
    Attributes("red", "circle", "small", "centre", "grey").to_row()
)


def _pick(rng: np.random.Generator, values: tuple[str, ...] | list[str]) -> str:
    return values[int(rng.integers(len(values)))]


def sample_attributes(rng: np.random.Generator, two_objects: bool = False) -> Attributes:
    """Draw one attribute tuple uniformly (every value equally likely, independently).

    Two-object scenes have two small objects differing in both colour and shape, placed in
    one of :data:`PAIR_LAYOUTS`, so swapping colours between them (a binding error) changes
    the scene.
    """
    background = _pick(rng, tuple(BACKGROUNDS))
    colours, shapes = tuple(COLOURS), SHAPES
    if not two_objects:
        return Attributes(
            colour=_pick(rng, colours),
            shape=_pick(rng, shapes),
            size=_pick(rng, tuple(SIZES)),
            position=_pick(rng, POSITIONS),
            background=background,
        )
    c1, c2 = (colours[i] for i in rng.choice(len(colours), size=2, replace=False))
    s1, s2 = (shapes[i] for i in rng.choice(len(shapes), size=2, replace=False))
    layouts = list(PAIR_LAYOUTS)
    p1, p2 = layouts[int(rng.integers(len(layouts)))]
    return Attributes(
        colour=c1,
        shape=s1,
        size="small",
        position=p1,
        background=background,
        second=ObjectAttributes(c2, s2, "small", p2),
        relation=PAIR_LAYOUTS[(p1, p2)],
    )
