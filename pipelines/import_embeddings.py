"""``unclip import-embeddings``: precomputed CLIP embeddings -> an embedding table (no images).

Users who already ran clip-retrieval (``clip-retrieval inference``, or the embeddings
published for LAION) have, per shard ``N`` (the same zero-padded suffix in all three)::

    img_emb/img_emb_N.npy          (n, D) image embeddings (float16 or float32)
    text_emb/text_emb_N.npy        (n, D) text embeddings of the captions
    metadata/metadata_N.parquet    n rows: caption, and image_path / url / key / ...

This writes schema v1 without the image column (docs/formats.md), so the prior can train
on them with no image at hand; the decoder and upsamplers refuse such a table (they learn
from pixels). Plain numpy and pyarrow in one process, no Ray: each shard is read in chunks
of ``ROWS_PER_PART`` rows by ranged reads (local or S3), never whole.

Checked before anything is written (any failure: one line, nothing written):

- every shard has its three files, both arrays are 2-D float with the same D in every
  shard, and the three row counts of a shard agree;
- D equals the embedding size of the CLIP named by ``--clip`` / ``--pretrained`` (read from
  open_clip's model config or the checkpoint: no weights are loaded), so embeddings made
  by another CLIP are refused rather than trained on;
- the embeddings are L2-normalised, as CLIP's are: the first ``NORM_SAMPLE`` rows of each
  shard must have norms within ``NORM_TOLERANCE`` of 1 (float16 storage), else the input is
  refused unless ``--renormalize`` says to normalise them. Every written embedding is
  re-normalised exactly.

Per row: a missing / empty caption, a non-finite, zero or (without ``--renormalize``)
not-unit embedding, or an id seen before goes to the errors table ``<output>_errors``
(stage ``caption`` / ``embed`` / ``read``) with the reason; every other row is written. The id is the metadata's ``key`` (or ``id``)
column, else a hash of the row's position (``metadata_N.parquet#i``). Re-running adds
only ids not yet in the table, like ``unclip embed``.
"""

from __future__ import annotations

import argparse
import posixpath
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import table
from pipelines.lease import Lease
from pipelines.sources import Problem, hash_id
from unclip import fs
from unclip.clip_identity import ClipIdentity
from unclip.errors import UserError
from unclip.schema import DataError, check_clip, errors_uri, parquet_files, read_table_info

FORMATS = ("clip-retrieval",)
NORM_TOLERANCE = 0.02  # float16 storage keeps norms within ~1e-3 of 1
ROWS_PER_PART = 65536  # rows read, checked and committed together
NORM_SAMPLE = 4096  # first rows of each shard whose norms decide before anything is written
SHARD_RE = re.compile(r"^(img_emb|text_emb|metadata)_(.+)\.(npy|parquet)$")
ID_COLUMNS = ("key", "id")
SOURCE_COLUMNS = ("image_path", "url")


@dataclass(frozen=True)
class Shard:
    name: str  # the shared suffix, e.g. "0000"
    img: str
    text: str
    meta: str


@dataclass(frozen=True)
class ImportSummary:
    output: str
    shards: int
    rows: int  # rows in the input
    written: int
    skipped: int  # ids already in the table
    failed: int  # rows in the errors table (new this run)
    renormalized: bool
    elapsed_s: float

    def line(self) -> str:
        return (
            f"imported {self.written} rows from {self.shards} shard(s) ({self.rows} in the "
            f"input, {self.skipped} already in the table, {self.failed} to "
            f"{errors_uri(self.output)}); {self.elapsed_s:.1f} s -> {self.output}"
        )


# ---------------------------------------------------------------------------- CLI
def run(args: argparse.Namespace) -> int:
    summary = import_clip_retrieval(
        args.input,
        args.output,
        args.clip,
        args.pretrained,
        renormalize=args.renormalize,
        log=lambda m: print(m, file=sys.stderr, flush=True),
    )
    print(summary.line())
    return 0


# ---------------------------------------------------------------------------- layout
def find_shards(uri: str) -> list[Shard]:
    """The shards of a clip-retrieval output folder, each with its three files."""
    if not fs.exists(uri):
        raise FileNotFoundError(f"input {uri!r} does not exist")
    files: dict[str, dict[str, str]] = {}
    for sub in ("img_emb", "text_emb", "metadata"):
        folder = fs.join(uri, sub)
        if not fs.exists(folder):
            raise UserError(
                f"{uri!r} is not a clip-retrieval output: no {sub}/ folder (expected "
                "img_emb/img_emb_N.npy, text_emb/text_emb_N.npy, metadata/metadata_N.parquet)"
            )
        for name in fs.listdir(folder):
            m = SHARD_RE.match(name)
            if m and m.group(1) == sub:
                files.setdefault(m.group(2), {})[sub] = fs.join(folder, name)
    if not files:
        raise UserError(f"no img_emb_N.npy / text_emb_N.npy / metadata_N.parquet under {uri!r}")
    shards = []
    for name in sorted(files):
        have = files[name]
        missing = [s for s in ("img_emb", "text_emb", "metadata") if s not in have]
        if missing:
            raise UserError(
                f"shard {name} of {uri!r} lacks {', '.join(missing)} (it has "
                f"{', '.join(posixpath.basename(p) for p in have.values())}); the prior needs "
                "image and text embeddings and the captions of every row"
            )
        shards.append(Shard(name, have["img_emb"], have["text_emb"], have["metadata"]))
    return shards


@dataclass(frozen=True)
class NpyHeader:
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran_order: bool
    offset: int  # byte offset of the data


def npy_header(uri: str) -> NpyHeader:
    """A ``.npy`` file's header, without reading the array."""
    fsys, path = fs.get_fs(uri)
    with fsys.open(path, "rb") as f:
        try:
            version = np.lib.format.read_magic(f)
            read_header = {
                (1, 0): np.lib.format.read_array_header_1_0,
                (2, 0): np.lib.format.read_array_header_2_0,
            }.get(version)
            if read_header is None:
                raise ValueError(f"unsupported .npy format version {version}")
            shape, fortran, dtype = read_header(f)
        except ValueError as e:
            raise UserError(f"{uri}: not a .npy array ({e})") from None
        return NpyHeader(tuple(shape), np.dtype(dtype), bool(fortran), f.tell())


def npy_rows(uri: str, head: NpyHeader, start: int, stop: int) -> np.ndarray:
    """Rows ``[start, stop)`` of a 2-D C-order ``.npy`` file, by one ranged read (local or
    S3): a shard is never held in memory whole."""
    row = head.shape[1] * head.dtype.itemsize
    fsys, path = fs.get_fs(uri)
    with fsys.open(path, "rb") as f:
        f.seek(head.offset + start * row)
        data = f.read((stop - start) * row)
    if len(data) != (stop - start) * row:
        raise UserError(f"{uri}: file ends before row {stop} (truncated?)")
    return np.frombuffer(data, dtype=head.dtype).reshape(stop - start, head.shape[1])


def check_layout(shards: list[Shard], identity: ClipIdentity, renormalize: bool) -> int:
    """Validate every shard's shapes against each other and the CLIP, and the norms of its
    first rows; returns the number of rows."""
    total = 0
    for s in shards:
        ihead, thead = npy_header(s.img), npy_header(s.text)
        ishape, tshape = ihead.shape, thead.shape
        for uri, head in ((s.img, ihead), (s.text, thead)):
            shape, dt = head.shape, head.dtype
            if len(shape) != 2 or dt.kind != "f" or head.fortran_order:
                raise UserError(
                    f"{uri}: expected a 2-D float array (rows, dim), found {dt} {shape}"
                )
            if shape[1] != identity.embed_dim:
                raise UserError(
                    f"{uri} holds embeddings of dim {shape[1]}, but CLIP "
                    f"{identity.model!r} embeds to dim {identity.embed_dim}: name the CLIP "
                    "that made these embeddings (--clip NAME --pretrained TAG)"
                )
        pafs, path = fs.pyarrow_fs(s.meta)
        meta_rows = pq.read_metadata(path, filesystem=pafs).num_rows
        if not ishape[0] == tshape[0] == meta_rows:
            raise UserError(
                f"shard {s.name}: {ishape[0]} image embeddings, {tshape[0]} text embeddings "
                f"and {meta_rows} metadata rows; the three files of a shard must have one "
                "row per sample"
            )
        names = pq.read_schema(path, filesystem=pafs).names
        if "caption" not in names:
            raise UserError(f"{s.meta}: no 'caption' column (found {sorted(names)})")
        k = min(NORM_SAMPLE, meta_rows)
        for uri, head in ((s.img, ihead), (s.text, thead)):
            msg = norm_problem(npy_rows(uri, head, 0, k), renormalize, uri)
            if msg:
                raise UserError(msg)
        total += meta_rows
    return total


# ---------------------------------------------------------------------------- rows
def norm_problem(emb: np.ndarray, renormalize: bool, where: str) -> str | None:
    """Refuse embeddings that are not unit-norm (beyond float16 rounding) unless told."""
    norms = np.linalg.norm(emb.astype(np.float32), axis=1)
    ok = np.isfinite(norms) & (norms > 0)
    if not ok.any() or renormalize:
        return None
    if np.abs(norms[ok] - 1.0).max() > NORM_TOLERANCE:
        return (
            f"{where}: embeddings are not L2-normalised (norms of the first rows "
            f"{norms[ok].min():.3g} to {norms[ok].max():.3g}); CLIP embeddings are unit "
            "vectors: check they are CLIP's, or pass --renormalize to normalise them"
        )
    return None


@dataclass(frozen=True)
class ShardMeta:
    """The per-row columns of a shard's metadata file that the table keeps."""

    ids: list[str]
    sources: list[str]
    urls: list[str | None]
    captions: list[str | None]


def read_meta(shard: Shard) -> ShardMeta:
    pafs, path = fs.pyarrow_fs(shard.meta)
    names = pq.read_schema(path, filesystem=pafs).names
    id_col = next((c for c in ID_COLUMNS if c in names), None)
    src_col = next((c for c in SOURCE_COLUMNS if c in names), None)
    url_col = "url" if "url" in names else None
    cols = list(dict.fromkeys(c for c in ("caption", id_col, src_col, url_col) if c))
    meta = pq.read_table(path, columns=cols, filesystem=pafs)
    n = meta.num_rows

    def column(name: str | None) -> list:
        return meta.column(name).to_pylist() if name else [None] * n

    positions = [f"{shard.meta}#{i}" for i in range(n)]
    ids = [
        str(k) if k not in (None, "") else hash_id(p)
        for k, p in zip(column(id_col), positions, strict=True)
    ]
    sources = [s or p for s, p in zip(column(src_col), positions, strict=True)]
    return ShardMeta(ids, sources, column(url_col), column("caption"))


def chunk_rows(
    shard: Shard,
    heads: tuple[NpyHeader, NpyHeader],
    meta: ShardMeta,
    start: int,
    stop: int,
    tokenize: Callable[[list[str]], list[list[int]]],
    renormalize: bool,
) -> tuple[pa.Table, list[Problem]]:
    """Rows ``[start, stop)`` of a shard -> (schema-v1 columns of the good rows, problems
    of the others)."""
    img = npy_rows(shard.img, heads[0], start, stop).astype(np.float32)
    text = npy_rows(shard.text, heads[1], start, stop).astype(np.float32)
    norms = {"image": np.linalg.norm(img, axis=1), "text": np.linalg.norm(text, axis=1)}
    problems: list[Problem] = []
    keep = np.ones(stop - start, dtype=bool)
    for j in range(stop - start):
        i = start + j
        cap = meta.captions[i].strip() if isinstance(meta.captions[i], str) else ""
        why = "" if cap else "missing or empty caption"
        stage = "caption"
        for what, n in norms.items():
            if why:
                break
            stage = "embed"
            if not (np.isfinite(n[j]) and n[j] > 0):
                why = f"{what} embedding is zero or not finite"
            elif not renormalize and abs(n[j] - 1) > NORM_TOLERANCE:
                why = f"{what} embedding has norm {n[j]:.3g}, not 1 (--renormalize to accept)"
        if why:
            problems.append(Problem(meta.ids[i], meta.sources[i], stage, why))
            keep[j] = False
    idx = np.flatnonzero(keep)
    rows = idx + start
    captions = [meta.captions[i].strip() for i in rows]
    cols = {
        "id": pa.array([meta.ids[i] for i in rows], pa.string()),
        "caption": pa.array(captions, pa.string()),
        "source": pa.array([meta.sources[i] for i in rows], pa.string()),
        "text_emb": table.embedding_array(text[idx] / norms["text"][idx, None]),
        "image_emb": table.embedding_array(img[idx] / norms["image"][idx, None]),
        "text_tokens": table.tokens_array(tokenize(captions) if captions else []),
        "url": pa.array([meta.urls[i] for i in rows], pa.string()),
        "width": pa.nulls(len(idx), pa.int32()),
        "height": pa.nulls(len(idx), pa.int32()),
    }
    return pa.table(cols), problems


def tokenizer_for(identity: ClipIdentity) -> Callable[[list[str]], list[list[int]]]:
    """The CLIP's own tokenizer (no weights), ids stripped of padding as ``unclip embed``
    stores them."""
    import open_clip

    from unclip.clip import Clip
    from unclip.clip_identity import looks_like_checkpoint

    if looks_like_checkpoint(identity.model):
        tok = open_clip.tokenizer.SimpleTokenizer(context_length=identity.context_length)
    else:
        tok = open_clip.get_tokenizer(identity.model)

    def tokenize(captions: list[str]) -> list[list[int]]:
        return Clip.strip_tokens(tok(captions))

    return tokenize


# ---------------------------------------------------------------------------- job
def import_clip_retrieval(
    input_uri: str,
    output: str,
    clip: str,
    pretrained: str = "",
    renormalize: bool = False,
    log: Callable[[str], None] | None = None,
) -> ImportSummary:
    """Import a clip-retrieval output folder into the table at ``output`` (module doc)."""
    from unclip.clip import identity_of

    say = log or (lambda m: None)
    t0 = time.perf_counter()
    if not clip:
        raise UserError(
            "--clip is required: the open_clip name (with --pretrained TAG) or the CLIP "
            "checkpoint that made these embeddings"
        )
    if input_uri.rstrip("/") == output.rstrip("/"):
        raise UserError("--output must differ from --input")
    identity = identity_of(clip, pretrained)
    shards = find_shards(input_uri)
    total = check_layout(shards, identity, renormalize)
    if parquet_files(output):
        try:
            info = read_table_info(output)
            check_clip(
                info,
                embed_dim=identity.embed_dim,
                fingerprint=identity.fingerprint,
                what=f"--clip {clip!r}",
            )
        except DataError as e:
            raise UserError(f"cannot add to {output}: {e}") from None
        if info.has_image:  # rows without images would make the whole table image-less
            raise UserError(
                f"the table at {output} has an image column (made by `unclip embed`); "
                "import precomputed embeddings into a table of their own"
            )
    table.check_writable(output)
    # the same lease as `unclip embed`: a second import (or an embed run) on this table
    # exits with one line instead of writing the same ids twice
    with Lease(output).held() as lease:
        if lease.took_over is not None:
            say(f"import: took over the expired lease of {lease.took_over.owner} on {output}")
        table.remove_stale_temp(output)  # a dead run's: nobody else can be writing
        table.remove_stale_temp(errors_uri(output))
        written, skipped, failed = _import_leased(shards, output, identity, renormalize, lease, say)
    elapsed = time.perf_counter() - t0
    return ImportSummary(output, len(shards), total, written, skipped, failed, renormalize, elapsed)


def _import_leased(
    shards: list[Shard],
    output: str,
    identity: ClipIdentity,
    renormalize: bool,
    lease: Lease,
    say: Callable[[str], None],
) -> tuple[int, int, int]:
    """Write every shard's new rows (and its problems) to ``output`` under ``lease``;
    (written, skipped, failed)."""
    from unclip.schema import table_schema

    schema = table_schema(identity.embed_dim, identity, with_image=False, with_source_meta=True)
    tokenize = tokenizer_for(identity)
    done = table.committed_ids(output)
    known = table.known_problems(output)
    first_source: dict[str, str] = {}  # id -> the source of the row kept for it
    written = skipped = failed = 0
    for k, shard in enumerate(shards):
        heads = (npy_header(shard.img), npy_header(shard.text))
        meta = read_meta(shard)
        for start in range(0, len(meta.ids), ROWS_PER_PART):
            stop = min(start + ROWS_PER_PART, len(meta.ids))
            rows, problems = chunk_rows(shard, heads, meta, start, stop, tokenize, renormalize)
            ids, srcs = rows.column("id").to_pylist(), rows.column("source").to_pylist()
            keep = np.ones(rows.num_rows, dtype=bool)
            for j, (rid, src) in enumerate(zip(ids, srcs, strict=True)):
                if rid in first_source:
                    why = f"duplicate id; kept the row from {first_source[rid]}"
                    problems.append(Problem(rid, src, "read", why))
                    keep[j] = False
                else:
                    first_source[rid] = src
            new = table.not_in(ids, done)
            skipped += int((keep & ~new).sum())
            rows = rows.filter(pa.array(keep & new))
            fresh = [p for p in problems if (p.id, p.stage, p.error) not in known]
            if fresh:  # the errors of a part first, then its rows (as `unclip embed`)
                t = table.problems_table([tuple(p) for p in fresh])
                lease.check()
                table.write_part(t, errors_uri(output), [repr(tuple(p)) for p in fresh])
                failed += len(fresh)
            if rows.num_rows:
                part = rows.cast(schema)
                lease.check()
                table.write_part(part, output, part.column("id").to_pylist())
                written += part.num_rows
        say(f"import: shard {shard.name} ({k + 1}/{len(shards)}), {written} rows written")
    return written, skipped, failed
