"""A captioned image folder (local or s3://) as in-memory arrays for CLIP training.

The folder holds images (``.png``, ``.jpg``, ``.jpeg``, ``.webp``) each with a same-named
``.txt`` caption, e.g. the output of ``unclip shapes``. ``read_folder`` decodes every pair,
resizes it like ``Clip.preprocess`` (shorter side to S, centre crop) and tokenizes its caption:

    images  (N, 3, S, S) uint8
    tokens  (N, L) int32, open_clip SimpleTokenizer ids, zero-padded to the context length

Pairs that cannot be used (no caption, empty caption, undecodable image) are listed in
``ImageTextData.skipped`` with the reason, never silently dropped; an image-less folder is a
``DataError``. Rows are split into train and held-out by ``unclip.split`` (stable hash of id).
"""

from __future__ import annotations

import io
import os
import posixpath
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from unclip import fs
from unclip.schema import DataError
from unclip.split import is_heldout

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")


@dataclass(frozen=True)
class ImageTextData:
    """Decoded pairs, in id order."""

    ids: list[str]
    captions: list[str]
    images: np.ndarray  # (N, 3, S, S) uint8
    tokens: np.ndarray  # (N, L) int32
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, index: np.ndarray) -> ImageTextData:
        return ImageTextData(
            [self.ids[i] for i in index],
            [self.captions[i] for i in index],
            self.images[index],
            self.tokens[index],
        )

    def split(self, heldout_fraction: float) -> tuple[ImageTextData, ImageTextData]:
        """(train, held-out) by the project's one split rule."""
        held = np.array([is_heldout(i, heldout_fraction) for i in self.ids], dtype=bool)
        return self.subset(np.flatnonzero(~held)), self.subset(np.flatnonzero(held))


def tokenize(captions: list[str], context_length: int) -> np.ndarray:
    """(N, L) int32 ids with open_clip's SimpleTokenizer (what ``Clip.load`` will use)."""
    from open_clip.tokenizer import SimpleTokenizer

    tok = SimpleTokenizer(context_length=context_length)
    return tok(captions).numpy().astype(np.int32)


def decode_image(data: bytes, size: int) -> np.ndarray:
    """Image bytes -> (3, size, size) uint8: shorter side resized to ``size``, centre crop."""
    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("RGB")
        w, h = im.size
        if (w, h) != (size, size):
            scale = size / min(w, h)
            nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
            im = im.resize((nw, nh), Image.Resampling.BICUBIC, reducing_gap=None)
            left, top = (nw - size) // 2, (nh - size) // 2
            im = im.crop((left, top, left + size, top + size))
        return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1).copy()


def list_pairs(uri: str) -> tuple[list[tuple[str, str, str]], list[tuple[str, str]]]:
    """([(id, image URI, caption URI)], skipped) for the images directly in folder ``uri``."""
    filesystem, root = fs.get_fs(uri)
    if not filesystem.exists(root):
        raise FileNotFoundError(f"image folder {uri!r} does not exist")
    if not filesystem.isdir(root):
        raise DataError(f"{uri!r} is not a folder of images with .txt captions")
    names = set(fs.listdir(uri))
    pairs, skipped = [], []
    for name in sorted(names):
        stem, ext = os.path.splitext(name)
        if ext.lower() not in IMAGE_EXTENSIONS:
            continue
        if stem + ".txt" not in names:
            skipped.append((name, "no caption file " + stem + ".txt"))
            continue
        pairs.append((stem, fs.join(uri, name), fs.join(uri, stem + ".txt")))
    return pairs, skipped


def read_folder(
    uri: str, image_size: int, context_length: int, max_threads: int = 16
) -> ImageTextData:
    """Read and decode every image-caption pair of ``uri`` (threads: S3 is I/O bound)."""
    pairs, skipped = list_pairs(uri)
    if not pairs:
        raise DataError(
            f"no captioned images in {uri!r}: expected image files "
            f"({', '.join(IMAGE_EXTENSIONS)}) each with a same-named .txt caption"
            + (f" ({len(skipped)} image(s) without a caption)" if skipped else "")
        )

    def load(pair: tuple[str, str, str]) -> tuple[str, str, np.ndarray | None, str]:
        stem, image_uri, text_uri = pair
        try:
            text = fs.read_text(text_uri).strip()
        except UnicodeDecodeError:
            return stem, "", None, "caption is not UTF-8 text"
        if not text:
            return stem, "", None, "empty caption"
        try:
            return stem, text, decode_image(fs.read_bytes(image_uri), image_size), ""
        except Exception as e:  # noqa: BLE001 - PIL raises many kinds for corrupt files
            return stem, text, None, f"cannot decode image: {type(e).__name__}: {e}"

    threads = max_threads if fs.is_remote(uri) else min(4, max_threads)
    with ThreadPoolExecutor(threads) as pool:
        results = list(pool.map(load, pairs))
    ids, captions, images = [], [], []
    for (stem, image_uri, _), (_, text, image, error) in zip(pairs, results, strict=True):
        if image is None:
            skipped.append((posixpath.basename(image_uri), error))
            continue
        ids.append(stem)
        captions.append(text)
        images.append(image)
    if not ids:
        raise DataError(f"none of the {len(pairs)} images in {uri!r} is usable: {skipped[0][1]}")
    return ImageTextData(
        ids, captions, np.stack(images), tokenize(captions, context_length), skipped
    )


# ---------------------------------------------------------------------- batches
def to_unit(images: Tensor) -> Tensor:
    """uint8 (B, 3, S, S) -> float in [0, 1]."""
    return images.float() / 255.0


def upsample_degrade(x: Tensor, factor: int = 2) -> Tensor:
    """What the decoder's output looks like: ``x`` (B, 3, S, S) in [0, 1] downscaled by
    ``factor`` (antialiased) and bicubically upsampled back, clamped to [0, 1]."""
    S = x.shape[-1]
    small = F.interpolate(x, size=S // factor, mode="bicubic", antialias=True, align_corners=False)
    return F.interpolate(small, size=S, mode="bicubic", align_corners=False).clamp(0, 1)


def normalise(x: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """[0, 1] pixels -> the image tower's input (as ``Clip.preprocess_tensor``)."""
    m = torch.tensor(mean, dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - m) / s


def augment(x: Tensor, fraction: float, generator: torch.Generator) -> Tensor:
    """Replace a random ``fraction`` of the [0, 1] images with their 2x-upsampled versions."""
    if fraction <= 0:
        return x
    pick = torch.rand(x.shape[0], generator=generator) < fraction
    if not pick.any():
        return x
    x = x.clone()
    x[pick] = upsample_degrade(x[pick])
    return x


def epoch_order(n: int, seed: int, epoch: int, groups: HardNegatives | None = None) -> np.ndarray:
    """The same order of ``range(n)`` on every worker for (seed, epoch): a permutation, or
    with ``groups`` a permutation of hard-negative groups (``hard_negative_order``)."""
    rng = np.random.default_rng([seed, epoch])
    if groups is None:
        return rng.permutation(n)
    return hard_negative_order(groups, rng)


@dataclass(frozen=True)
class HardNegatives:
    """Which images differ in one attribute only: ``key`` (N,) ids of everything else about
    an image, ``variant`` (N,) the attribute that may differ; ``size`` images per group."""

    key: np.ndarray
    variant: np.ndarray
    size: int


def hard_negative_order(groups: HardNegatives, rng: np.random.Generator) -> np.ndarray:
    """A random order of every index in which consecutive runs of up to ``groups.size``
    images share their ``key`` and differ in ``variant``, e.g. a red circle, a red square, a
    red triangle and a red cross, all small, top left, on grey.

    With random batches, two images that differ only in shape almost never meet in a batch
    of 128 of the shapes data (400 combinations of the other attributes), so the
    contrastive loss has no reason to encode shape; with groups every batch asks for it.
    Groups stay whole in batches whose size is a multiple of ``groups.size``.
    """
    n = len(groups.key)
    order = rng.permutation(n)
    pools: dict[tuple[int, int], list[int]] = {}
    for i in order:  # shuffled pools of each (key, variant)
        pools.setdefault((int(groups.key[i]), int(groups.variant[i])), []).append(int(i))
    variants = np.unique(groups.variant)
    used = np.zeros(n, dtype=bool)
    out: list[int] = []
    for i in order:
        if used[i]:
            continue
        members, key = [int(i)], int(groups.key[i])
        used[i] = True
        for v in rng.permutation(variants):
            if len(members) == groups.size:
                break
            if v == groups.variant[i]:
                continue
            pool = pools.get((key, int(v)), [])
            while pool and used[pool[-1]]:
                pool.pop()
            if pool:
                j = pool.pop()
                used[j] = True
                members.append(j)
        out.extend(members)
    return np.asarray(out)


def worker_batches(
    n: int,
    global_batch: int,
    rank: int,
    world: int,
    seed: int,
    start_step: int = 0,
    groups: HardNegatives | None = None,
):
    """Yield (step, index array) for this worker forever, from ``start_step`` on.

    Step ``s`` takes the ``s``-th global batch of its epoch's permutation (incomplete tails
    dropped); rank ``r`` gets rows ``r::world`` of it, so the workers' batches are disjoint
    and together form the global batch. Deterministic: resuming at a step sees the same data.
    """
    if global_batch % world:
        raise ValueError(f"batch_size {global_batch} is not divisible by {world} workers")
    per_epoch = n // global_batch
    if per_epoch < 1:
        raise DataError(f"only {n} training images: fewer than one batch of {global_batch}")
    step = start_step
    while True:
        epoch, k = divmod(step, per_epoch)
        order = epoch_order(n, seed, epoch, groups)
        rows = order[k * global_batch : (k + 1) * global_batch]
        yield step, np.sort(rows[rank::world])
        step += 1
