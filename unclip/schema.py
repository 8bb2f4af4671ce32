"""The embedding table: Parquet schema version 1 (docs/formats.md, "Embedding table").

A table is a folder (local or ``s3://``) of Parquet files, one row per (image, caption):
id, caption, source, image (optional), text_emb, image_emb, text_tokens, and optionally the
source metadata url, width, height; every file carries the ``unclip.*`` key-value metadata
below. Rows that could not be processed go to the sibling errors table ``<table>_errors``
(id, source, stage, error).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.parquet as pq

from unclip import fs

if TYPE_CHECKING:  # readers of a table need no torch (the ETL's writer tasks don't load it)
    from unclip.clip_identity import ClipIdentity

SCHEMA_VERSION = "1"
META_VERSION = b"unclip.schema_version"
META_MODEL = b"unclip.clip_model"
META_PRETRAINED = b"unclip.clip_pretrained"
META_DIM = b"unclip.embed_dim"
META_FINGERPRINT = b"unclip.clip_fingerprint"
META_CONTEXT = b"unclip.clip_context_length"
META_TEXT_WIDTH = b"unclip.clip_text_width"

ERRORS_SUFFIX = "_errors"
# download: the tool that fetched the image (img2dataset) reported a failure
ERROR_STAGES = ("download", "read", "decode", "caption", "embed")
SOURCE_META_COLUMNS = ("url", "width", "height")


class DataError(ValueError):
    """The data is not a usable embedding table (or not the one the caller needs)."""


def table_schema(
    dim: int,
    identity: ClipIdentity | None = None,
    with_image: bool = True,
    with_source_meta: bool = False,
) -> pa.Schema:
    """Arrow schema of version 1 for embeddings of size ``dim`` (with metadata if given).

    ``with_source_meta`` adds the optional nullable columns ``url`` (where the image was
    fetched from, if the input says), ``width`` and ``height`` (the image as stored)."""
    fields = [
        pa.field("id", pa.string(), nullable=False),
        pa.field("caption", pa.string()),
        pa.field("source", pa.string()),
    ]
    if with_image:
        fields.append(pa.field("image", pa.binary()))
    fields += [
        pa.field("text_emb", pa.list_(pa.float32(), dim)),
        pa.field("image_emb", pa.list_(pa.float32(), dim)),
        pa.field("text_tokens", pa.list_(pa.int32())),
    ]
    if with_source_meta:
        fields += [
            pa.field("url", pa.string()),
            pa.field("width", pa.int32()),
            pa.field("height", pa.int32()),
        ]
    return pa.schema(fields, metadata=metadata(identity) if identity else None)


def errors_schema() -> pa.Schema:
    return pa.schema(
        [
            pa.field("id", pa.string()),
            pa.field("source", pa.string()),
            pa.field("stage", pa.string()),
            pa.field("error", pa.string()),
        ]
    )


def errors_uri(table_uri: str) -> str:
    return table_uri.rstrip("/") + ERRORS_SUFFIX


def metadata(identity: ClipIdentity) -> dict[bytes, bytes]:
    """The key-value metadata written on every file of the table."""
    return {
        META_VERSION: SCHEMA_VERSION.encode(),
        META_MODEL: identity.model.encode(),
        META_PRETRAINED: identity.pretrained.encode(),
        META_DIM: str(identity.embed_dim).encode(),
        META_FINGERPRINT: identity.fingerprint.encode(),
        META_CONTEXT: str(identity.context_length).encode(),
        META_TEXT_WIDTH: str(identity.text_width).encode(),
    }


@dataclass(frozen=True)
class TableInfo:
    """What a table says about itself (from the Parquet footers)."""

    schema_version: str
    clip_model: str
    clip_pretrained: str
    embed_dim: int
    fingerprint: str
    files: tuple[str, ...]  # URIs of the data files
    num_rows: int
    has_image: bool
    has_source_meta: bool = False  # the optional url / width / height columns


def parquet_files(uri: str) -> list[str]:
    """URIs of the ``.parquet`` files directly in a table folder (sorted)."""
    if not fs.exists(uri):
        return []
    fsys, path = fs.get_fs(uri)
    names = [p for p in fsys.ls(path, detail=False) if p.endswith(".parquet")]
    prefix = "s3://" if uri.startswith("s3://") else ""
    return sorted(prefix + p for p in names)


def read_table_info(uri: str) -> TableInfo:
    """Read and check the metadata of every file in a table; raise DataError if unusable."""
    files = parquet_files(uri)
    if not files:
        raise DataError(
            f"no embedding table at {uri!r} (no .parquet files); make one with `unclip embed`"
        )
    infos = []
    rows = 0
    has_image = has_meta = True
    for f in files:
        pafs, path = fs.pyarrow_fs(f)
        meta = pq.read_metadata(path, filesystem=pafs)
        kv = meta.metadata or {}
        if kv.get(META_VERSION) != SCHEMA_VERSION.encode():
            raise DataError(
                f"{f}: not an unclip embedding table of schema version {SCHEMA_VERSION} "
                f"(found {kv.get(META_VERSION)!r}); re-run `unclip embed`"
            )
        infos.append(
            (
                kv[META_MODEL].decode(),
                kv.get(META_PRETRAINED, b"").decode(),
                int(kv[META_DIM]),
                kv.get(META_FINGERPRINT, b"").decode(),
            )
        )
        rows += meta.num_rows
        names = meta.schema.to_arrow_schema().names
        has_image = has_image and "image" in names
        has_meta = has_meta and all(c in names for c in SOURCE_META_COLUMNS)
    if len(set(infos)) > 1:
        raise DataError(f"table {uri!r} mixes embeddings of different CLIPs: {sorted(set(infos))}")
    model, pretrained, dim, fingerprint = infos[0]
    return TableInfo(
        SCHEMA_VERSION, model, pretrained, dim, fingerprint, tuple(files), rows, has_image, has_meta
    )


def check_clip(info: TableInfo, *, embed_dim: int, fingerprint: str = "", what: str = "") -> None:
    """Refuse a table embedded with another CLIP than the one ``what`` expects."""
    who = what or "this stage"
    if info.embed_dim != embed_dim:
        raise DataError(
            f"the table was embedded with {info.clip_model!r} (dim {info.embed_dim}) but "
            f"{who} expects CLIP embeddings of size {embed_dim}; re-embed the data with the "
            "same CLIP or change the config"
        )
    if fingerprint and info.fingerprint and fingerprint != info.fingerprint:
        raise DataError(
            f"the table was embedded with CLIP {info.clip_model!r} ({info.fingerprint}) but "
            f"{who} uses {fingerprint}; embed with the same CLIP"
        )
