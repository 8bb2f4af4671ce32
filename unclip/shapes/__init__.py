"""The procedural "shapes" dataset: vocabulary, renderer, captions and the attribute oracle.

Pure numpy/PIL (no Ray, no torch). Typical use::

    from unclip.shapes import make_item, sample_captions, score
    item = make_item(seed=0, index=7)                 # .id .caption .attributes .image
    held_out = sample_captions(100, seed=12345)       # [(Attributes, caption)], no rendering
    score(generated_image, held_out[0][0])            # {"colour": True, "shape": False, ...}
"""

from unclip.shapes.attributes import (
    BACKGROUNDS,
    COLOURS,
    NONE,
    POSITIONS,
    RELATIONS,
    SHAPES,
    SIZES,
    SYNONYMS,
    Attributes,
    ObjectAttributes,
    sample_attributes,
)
from unclip.shapes.captions import caption, sample_captions, sample_item
from unclip.shapes.oracle import analyse, analyse_batch, analyse_objects, detect, score
from unclip.shapes.render import Item, make_item, png_bytes, render, render_attributes

__all__ = [
    "BACKGROUNDS",
    "COLOURS",
    "NONE",
    "POSITIONS",
    "RELATIONS",
    "SHAPES",
    "SIZES",
    "SYNONYMS",
    "Attributes",
    "Item",
    "ObjectAttributes",
    "analyse",
    "analyse_batch",
    "analyse_objects",
    "caption",
    "detect",
    "make_item",
    "png_bytes",
    "render",
    "render_attributes",
    "sample_attributes",
    "sample_captions",
    "sample_item",
    "score",
]
