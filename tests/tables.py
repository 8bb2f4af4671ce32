"""Small schema-v1 embedding tables for tests, written without the ETL.

Images are simple synthetic scenes (a coloured disc or square on a grey background),
captions name the colour and the shape, and the embeddings come from a given CLIP, so the
table is exactly what ``unclip embed`` would write, only smaller.
"""

from __future__ import annotations

import io
import itertools

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from unclip import fs
from unclip.clip import Clip
from unclip.schema import table_schema

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220)}
SHAPES = ("circle", "square")


def render(colour: str, shape: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """(size, size, 3) uint8: one coloured shape at a jittered centre on a grey background."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    cx, cy = rng.uniform(0.35, 0.65, 2)
    r = rng.uniform(0.18, 0.28)
    if shape == "circle":
        inside = (xx - cx) ** 2 + (yy - cy) ** 2 < r**2
    else:
        inside = (abs(xx - cx) < r * 0.9) & (abs(yy - cy) < r * 0.9)
    img = np.full((size, size, 3), 128, dtype=np.uint8)
    img[inside] = COLOURS[colour]
    return img


def png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def write_table(
    uri: str,
    clip: Clip,
    n: int = 96,
    image_size: int = 32,
    files: int = 2,
    seed: int = 0,
    with_image: bool = True,
    nan_rows: int = 0,
) -> list[str]:
    """Write an ``n``-row table in ``files`` Parquet files under ``uri``; returns the ids.

    ``nan_rows`` > 0 replaces the image embedding of that many rows by NaN (bad data).
    """
    rng = np.random.default_rng(seed)
    kinds = list(itertools.product(COLOURS, SHAPES))
    picks = [kinds[i % len(kinds)] for i in rng.permutation(n)]
    images = np.stack([render(c, s, image_size, rng) for c, s in picks])  # (n, S, S, 3)
    captions = [f"a {c} {s}" for c, s in picks]
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        image_emb = clip.encode_images(x).numpy()
        tokens, _ = clip.tokenize(captions)
        text_emb = clip.encode_text(tokens).numpy()
    if nan_rows:
        image_emb[:nan_rows] = np.nan
    ids = [f"item-{seed}-{i:05d}" for i in range(n)]
    schema = table_schema(clip.identity.embed_dim, clip.identity, with_image=with_image)
    dim = clip.identity.embed_dim
    fs.makedirs(uri)
    for k, rows in enumerate(np.array_split(np.arange(n), files)):
        cols = {
            "id": pa.array([ids[i] for i in rows], pa.string()),
            "caption": pa.array([captions[i] for i in rows]),
            "source": pa.array([f"mem://{ids[i]}.png" for i in rows]),
        }
        if with_image:
            cols["image"] = pa.array([png(images[i]) for i in rows], pa.binary())
        for name, arr in (("text_emb", text_emb), ("image_emb", image_emb)):
            flat = pa.array(arr[rows].reshape(-1), pa.float32())
            cols[name] = pa.FixedSizeListArray.from_arrays(flat, dim)
        cols["text_tokens"] = pa.array(Clip.strip_tokens(tokens[rows]), pa.list_(pa.int32()))
        table = pa.table(cols, schema=schema)
        pafs, path = fs.pyarrow_fs(fs.join(uri, f"part-{k:03d}.parquet"))
        pq.write_table(table, path, filesystem=pafs)
    return ids
