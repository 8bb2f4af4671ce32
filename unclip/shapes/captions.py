"""Captions for shapes scenes: templates with paraphrases and synonyms.

Every one-object caption names colour, shape, size and position (the background only
sometimes); every two-object caption names both objects' colour and shape and their relation.
Captions are drawn from attributes, so whoever holds a caption also holds its attributes:
nothing ever parses a caption.

Item ``index`` of a dataset with ``seed`` draws its attributes and caption from
``numpy.random.default_rng([seed, index, 0])`` (see :func:`sample_item`), so evaluation can
sample held-out captions without rendering and get exactly what the renderer would draw.
"""

from __future__ import annotations

import re

import numpy as np

from unclip.shapes.attributes import (
    INVERSE_RELATION,
    SYNONYMS,
    Attributes,
    ObjectAttributes,
    sample_attributes,
)

# Slots: {size} {colour} {shape} {where} (prepositional position) {pos} (bare position) {bg}.
# "a" before a vowel becomes "an" afterwards.
TEMPLATES: tuple[str, ...] = (
    "a {size} {colour} {shape} {where}",
    "a {size} {colour} {shape} {where} on a {bg} background",
    "{colour} {shape}, {size}, {pos}, on {bg}",
    "a {colour} {shape} {where}, {size}",
    "{where}, a {size} {colour} {shape}",
    "there is a {size} {shape} {where}; it is {colour}",
    "a {bg} background with a {size} {colour} {shape} {where}",
    "{size} {colour} {shape}, {pos}",
    "a picture of a {size} {colour} {shape} {where}",
    "{colour}, {size}, {shape}, {pos}",
    "a {size} {shape} coloured {colour}, {where}",
    "a {size} {shape} in {colour} {where} against {bg}",
    "{pos}: a {size} {colour} {shape} on {bg}",
    "a {colour} {shape} of {size} size, {pos}",
)

# Two-object templates. {o1}/{o2}: "<colour> <shape>" of the first/second object; {rel}: the
# first object's relation to the second, {inv}: the second's relation to the first.
PAIR_TEMPLATES: tuple[str, ...] = (
    "a {o1} {rel} a {o2}",
    "a {o1} {rel} a {o2} on a {bg} background",
    "a {o2} {inv} a {o1}",
    "two shapes: a {o1} {rel} a {o2}",
    "{o1} {rel} {o2}, on {bg}",
    "a {o2} with a {o1} {rel} it",
    "a {o1} placed {rel} a {o2}",
)

_ARTICLE = re.compile(r"\ba (?=[aeiou])")


def _pick(rng: np.random.Generator, values: tuple[str, ...]) -> str:
    return values[int(rng.integers(len(values)))]


def _object_phrase(rng: np.random.Generator, obj: ObjectAttributes) -> str:
    colour = _pick(rng, SYNONYMS["colour"][obj.colour])
    return f"{colour} {_pick(rng, SYNONYMS['shape'][obj.shape])}"


def caption(attributes: Attributes, rng: np.random.Generator) -> str:
    """Draw one caption for ``attributes`` (a template and one synonym per slot)."""
    if attributes.second is not None:
        assert attributes.relation is not None
        template = _pick(rng, PAIR_TEMPLATES)
        text = template.format(
            o1=_object_phrase(rng, attributes.first),
            o2=_object_phrase(rng, attributes.second),
            rel=_pick(rng, SYNONYMS["relation"][attributes.relation]),
            inv=_pick(rng, SYNONYMS["relation"][INVERSE_RELATION[attributes.relation]]),
            bg=_pick(rng, SYNONYMS["background"][attributes.background]),
        )
    else:
        template = _pick(rng, TEMPLATES)
        text = template.format(
            size=_pick(rng, SYNONYMS["size"][attributes.size]),
            colour=_pick(rng, SYNONYMS["colour"][attributes.colour]),
            shape=_pick(rng, SYNONYMS["shape"][attributes.shape]),
            where=_pick(rng, SYNONYMS["where"][attributes.position]),
            pos=_pick(rng, SYNONYMS["position"][attributes.position]),
            bg=_pick(rng, SYNONYMS["background"][attributes.background]),
        )
    return _ARTICLE.sub("an ", text)


def item_rng(seed: int, index: int, stream: int) -> np.random.Generator:
    """The generator of item ``index``: stream 0 draws attributes and caption, 1 geometry."""
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be >= 0, got seed={seed}, index={index}")
    return np.random.default_rng([seed, index, stream])


def sample_item(seed: int, index: int, two_object_fraction: float = 0.0) -> tuple[Attributes, str]:
    """Attributes and caption of item ``index`` of the dataset made with ``seed``."""
    rng = item_rng(seed, index, 0)
    two_objects = bool(rng.random() < two_object_fraction)  # always drawn: keeps streams aligned
    attributes = sample_attributes(rng, two_objects=two_objects)
    return attributes, caption(attributes, rng)


def sample_captions(
    n: int, seed: int, two_object_fraction: float = 0.0
) -> list[tuple[Attributes, str]]:
    """``n`` (attributes, caption) pairs, without rendering: items 0..n-1 of dataset ``seed``.

    For held-out evaluation, use a seed no training set used.
    """
    return [sample_item(seed, i, two_object_fraction) for i in range(n)]
