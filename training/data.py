"""Reading the embedding table (schema v1) for training, with Ray Data.

Each stage reads only the columns it needs (the prior never reads image bytes). Rows are
split into train and held-out by a stable hash of their ``id`` (``unclip.split``, the rule
the evaluation job uses too: the same row is held out in every run, whatever the layout). A batch becomes plain arrays:

    text_emb     (B, D) float32       image_emb (B, D) float32
    text_tokens  (B, L) int32, zero-padded to the CLIP context length
    image        (B, 3, S, S) uint8, decoded from PNG/WebP, centre-cropped, resized to S
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from unclip import fs
from unclip.config import ClipRef
from unclip.schema import META_CONTEXT, META_TEXT_WIDTH, DataError, TableInfo
from unclip.split import HELDOUT_FRACTION, heldout_score
from unclip.table_ids import Duplicates, first_occurrences

if TYPE_CHECKING:
    import ray.data

Split = Literal["train", "heldout"]


@dataclass(frozen=True)
class StageColumns:
    """What a stage reads from the table and how batches are shaped."""

    columns: tuple[str, ...]  # table columns besides ``id``
    image_size: int = 0  # decode ``image`` to this side (0 = no images)
    context_length: int = 0  # pad ``text_tokens`` to this length (0 = no tokens)


# ---------------------------------------------------------------------- held-out split
def heldout_mask(ids: Sequence[str], fraction: float = HELDOUT_FRACTION) -> np.ndarray:
    """(N,) bool: True for held-out rows (``unclip.split``: the project's one split rule)."""
    return np.fromiter((heldout_score(i) < fraction for i in ids), dtype=bool, count=len(ids))


# ---------------------------------------------------------------------- table metadata
def table_clip(info: TableInfo) -> ClipRef:
    """The CLIP a table was embedded with, as a stage config's ``ClipRef``."""
    pafs, path = fs.pyarrow_fs(info.files[0])
    kv = pq.read_metadata(path, filesystem=pafs).metadata or {}
    return ClipRef(
        model=info.clip_model,
        pretrained=info.clip_pretrained,
        embed_dim=info.embed_dim,
        fingerprint=info.fingerprint,
        text_width=int(kv.get(META_TEXT_WIDTH, b"0") or 0),
        context_length=int(kv.get(META_CONTEXT, b"0") or 0),
    )


# ---------------------------------------------------------------------- batches
def decode_image(data: bytes, size: int) -> np.ndarray:
    """PNG/WebP bytes -> (3, size, size) uint8 (RGB, centre-cropped square, bicubic)."""
    img = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = img.size
    if w != h:
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        img = img.crop((left, top, left + side, top + side))
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)


def _embeddings(table: pa.Table, name: str) -> np.ndarray:
    col = table.column(name).combine_chunks()
    if col.null_count:
        raise DataError(f"column {name!r} has {col.null_count} null row(s); re-run the ETL")
    flat = col.flatten().to_numpy(zero_copy_only=False)
    return flat.reshape(len(col), col.type.list_size).astype(np.float32, copy=False)


def train_embeddings(
    files: Sequence[str], max_rows: int, fraction: float = HELDOUT_FRACTION
) -> tuple[np.ndarray, np.ndarray]:
    """(image_emb, text_emb) of the first ``max_rows`` training rows (file order), read
    straight from Parquet: the same rows on every worker, held-out rows excluded, each id
    once (``unclip.table_ids``)."""
    images, texts, n = [], [], 0
    seen: set[str] = set()
    for uri in files:
        pafs, path = fs.pyarrow_fs(uri)
        table = pq.read_table(path, columns=["id", "image_emb", "text_emb"], filesystem=pafs)
        ids = table.column("id").to_pylist()
        keep = ~heldout_mask(ids, fraction) & first_occurrences(ids, seen)
        table = table.filter(pa.array(keep))
        images.append(_embeddings(table, "image_emb"))
        texts.append(_embeddings(table, "text_emb"))
        n += table.num_rows
        if n >= max_rows:
            break
    if not n:
        raise DataError("the table has no training rows")
    return np.concatenate(images)[:max_rows], np.concatenate(texts)[:max_rows]


def _tokens(table: pa.Table, length: int) -> np.ndarray:
    out = np.zeros((table.num_rows, length), dtype=np.int32)
    for i, row in enumerate(table.column("text_tokens").to_pylist()):
        row = (row or [])[:length]
        out[i, : len(row)] = row
    return out


def drop_duplicates(table: pa.Table, drop: Mapping[str, frozenset[str]]) -> pa.Table:
    """Rows of a batch read with its file's ``path``: without the ids that ``drop`` lists
    for that file (an earlier file has them) and without repeats inside the batch."""
    paths, ids = table.column("path").to_pylist(), table.column("id").to_pylist()
    # the listed copies go first: a batch may hold a later file's rows before the earlier
    # file's (Ray Data does not keep file order), and deduplicating first would then keep
    # the later copy and drop the earlier one as a repeat, losing the id
    listed = np.array([i in drop.get(p, ()) for p, i in zip(paths, ids, strict=True)], bool)
    table = table.filter(pa.array(~listed))
    first = first_occurrences(table.column("id").to_pylist(), set())
    return table.filter(pa.array(first)).drop_columns(["path"])


def prepare_batch(
    table: pa.Table,
    spec: StageColumns,
    split: Split,
    fraction: float,
    drop: Mapping[str, frozenset[str]] | None = None,
) -> dict[str, np.ndarray] | pa.Table:
    """One Arrow batch of the table -> the arrays of one split (see the module docstring).
    With ``drop`` (the batch has a ``path`` column), duplicate ids are skipped first."""
    if drop is not None:
        table = drop_duplicates(table, drop)
    held = heldout_mask(table.column("id").to_pylist(), fraction)
    table = table.filter(pa.array(held if split == "heldout" else ~held))
    if table.num_rows == 0:
        return _empty_block(table, spec)
    out: dict[str, np.ndarray] = {}
    for name in spec.columns:
        if name in ("text_emb", "image_emb"):
            out[name] = _embeddings(table, name)
        elif name == "text_tokens":
            out[name] = _tokens(table, spec.context_length)
        elif name == "image":
            S = spec.image_size
            images = np.zeros((table.num_rows, 3, S, S), dtype=np.uint8)
            for i, (rid, data) in enumerate(
                zip(table.column("id").to_pylist(), table.column("image").to_pylist(), strict=True)
            ):
                if data is None:
                    raise DataError(f"row {rid!r} has no image bytes; re-run the ETL with images")
                try:
                    images[i] = decode_image(data, S)
                except OSError as e:
                    raise DataError(f"row {rid!r}: image bytes do not decode: {e}") from None
            out[name] = images
        else:
            raise ValueError(f"unknown column {name!r}")
    return out


def _empty_block(table: pa.Table, spec: StageColumns) -> pa.Table:
    """A zero-row block with the schema of non-empty ones (Ray Data would store empty
    (0, D) arrays as pickled objects, not as tensors, and mix block types)."""
    from ray.data.block import BlockAccessor

    dim = {
        name: table.schema.field(name).type.list_size
        for name in ("text_emb", "image_emb")
        if name in spec.columns
    }
    one = {}
    for name in spec.columns:
        if name in dim:
            one[name] = np.zeros((1, dim[name]), np.float32)
        elif name == "text_tokens":
            one[name] = np.zeros((1, spec.context_length), np.int32)
        else:
            one[name] = np.zeros((1, 3, spec.image_size, spec.image_size), np.uint8)
    return BlockAccessor.batch_to_block(one).slice(0, 0)


def read_split(
    info: TableInfo,
    spec: StageColumns,
    split: Split,
    fraction: float,
    duplicates: Duplicates | None = None,
) -> ray.data.Dataset:
    """A lazy Ray Dataset of one split of the table, reading only ``spec.columns``; with
    ``duplicates`` (``unclip.table_ids.find_duplicates``), each id once."""
    import ray.data

    if "image" in spec.columns and not info.has_image:
        raise DataError(
            "the table has no image column; this stage trains on images, so embed the data "
            "with an image column (`unclip embed --image-size N`)"
        )
    pafs, _ = fs.pyarrow_fs(info.files[0])
    paths = [fs.pyarrow_fs(f)[1] for f in info.files]
    # select_columns right after the read is pushed down into it: other columns are not read
    drop = None
    if duplicates:  # which file each row comes from, to skip the copies of earlier files
        drop = {fs.pyarrow_fs(f)[1]: ids for f, ids in duplicates.drop.items()}
        ds = ray.data.read_parquet(paths, filesystem=pafs, include_paths=True)
        ds = ds.select_columns(["id", "path", *spec.columns])
    else:
        ds = ray.data.read_parquet(paths, filesystem=pafs).select_columns(["id", *spec.columns])
    return ds.map_batches(
        prepare_batch,
        batch_format="pyarrow",
        batch_size=256,
        fn_kwargs={"spec": spec, "split": split, "fraction": fraction, "drop": drop},
    )
