"""Writing the embedding table (schema v1) and its errors table: plain pyarrow, no Ray.

Both tables are folders of Parquet *parts*. A part is committed atomically, so a run killed
at any moment never leaves a file a reader would take as complete:

- local disk: written to ``_tmp-<name>-<uuid>`` (readers and ``unclip.schema`` skip names
  starting with ``_`` or not ending in ``.parquet``), fsynced, then renamed;
- S3: one object PUT (or a multipart upload completed on close): it appears whole or not.

A part's name is a hash of the ids (error keys) it holds, so a task that Ray retries after
it committed rewrites the same name with the same rows instead of adding a duplicate.
Incremental runs skip the ids already committed (``committed_ids``); one run at a time per
output table, under the table's lease (``pipelines.lease``): a run checks that it still holds
it before each commit, and removes temp files only after taking a free or expired lease.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from pipelines.lease import check_holder
from unclip import fs
from unclip.schema import errors_schema, errors_uri, parquet_files

TMP_PREFIX = "_tmp-"
WARNING_PREFIX = "warning: "


# ---------------------------------------------------------------------------- arrays
def embedding_array(emb: np.ndarray) -> pa.FixedSizeListArray:
    """(N, D) float -> fixed_size_list<float32>[D] (the schema's embedding type)."""
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    n, d = emb.shape
    return pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), d)


def tokens_array(ids: Sequence[Sequence[int]]) -> pa.ListArray:
    """Variable-length token ids -> list<int32>."""
    flat = np.fromiter((t for row in ids for t in row), dtype=np.int32)
    offsets = np.zeros(len(ids) + 1, dtype=np.int32)
    np.cumsum([len(r) for r in ids], out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, pa.int32()))


# ---------------------------------------------------------------------------- parts
def part_name(keys: Iterable[str]) -> str:
    """Deterministic part file name: a hash of the (sorted) row keys it holds."""
    h = hashlib.sha256("\n".join(sorted(keys)).encode("utf-8")).hexdigest()
    return f"part-{h[:32]}.parquet"


def write_part(table: pa.Table, dir_uri: str, keys: Iterable[str]) -> str:
    """Commit ``table`` as one Parquet part in ``dir_uri``, atomically; returns its URI."""
    uri = fs.join(dir_uri, part_name(keys))
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf, compression="zstd")
    data = buf.getvalue()
    if fs.is_remote(uri):
        pafs, path = fs.pyarrow_fs(uri)
        with pafs.open_output_stream(path) as out:  # completes (becomes visible) on close
            out.write(data)
        return uri
    os.makedirs(dir_uri, exist_ok=True)
    tmp = os.path.join(dir_uri, f"{TMP_PREFIX}{os.path.basename(uri)}-{uuid.uuid4().hex[:8]}")
    with open(tmp, "wb") as f:
        f.write(data.to_pybytes())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, uri)
    return uri


def check_writable(dir_uri: str) -> None:
    """Fail early, with one line, if parts cannot be written to ``dir_uri``."""
    probe = fs.join(dir_uri, f"{TMP_PREFIX}write-check-{uuid.uuid4().hex[:8]}")
    try:
        fs.makedirs(dir_uri)
        fs.write_bytes(probe, b"")
        fsys, path = fs.get_fs(probe)
        fsys.rm(path)
    except OSError as e:
        raise PermissionError(f"cannot write the table at {dir_uri!r}: {e}") from e


def remove_stale_temp(dir_uri: str) -> int:
    """Delete uncommitted temp parts a killed run left on local disk; returns the count."""
    if fs.is_remote(dir_uri) or not os.path.isdir(dir_uri):
        return 0
    stale = [n for n in os.listdir(dir_uri) if n.startswith(TMP_PREFIX)]
    for n in stale:
        os.remove(os.path.join(dir_uri, n))
    return len(stale)


def _read_columns(files: Sequence[str], columns: list[str]) -> pa.Table:
    pafs, _ = fs.pyarrow_fs(files[0])
    paths = [fs.pyarrow_fs(f)[1] for f in files]
    return pads.dataset(paths, filesystem=pafs, format="parquet").to_table(columns=columns)


def committed_ids(table_uri: str) -> pa.ChunkedArray:
    """The ids in the committed parts of a table (empty if there is no table yet)."""
    files = parquet_files(table_uri)
    if not files:
        return pa.chunked_array([], pa.string())
    return _read_columns(files, ["id"]).column("id")


def known_problems(table_uri: str) -> set[tuple[str, str, str]]:
    """(id, stage, error) of every row already in the errors table of ``table_uri``."""
    files = parquet_files(errors_uri(table_uri))
    if not files:
        return set()
    t = _read_columns(files, ["id", "stage", "error"])
    return set(zip(*(t.column(c).to_pylist() for c in ("id", "stage", "error")), strict=True))


def not_in(ids: Sequence[str], done: pa.ChunkedArray) -> np.ndarray:
    """Boolean mask: which of ``ids`` are not among ``done`` (vectorised, no Python set)."""
    if len(done) == 0:
        return np.ones(len(ids), dtype=bool)
    found = pc.is_in(pa.array(ids, pa.string()), value_set=done.combine_chunks())
    return ~found.to_numpy(zero_copy_only=False)


# ---------------------------------------------------------------------------- commit
def problems_table(rows: Sequence[tuple[str, str, str, str]]) -> pa.Table:
    """(id, source, stage, error) tuples -> an errors-table batch."""
    cols = list(zip(*rows, strict=True)) if rows else [[], [], [], []]
    return pa.Table.from_arrays([pa.array(c, pa.string()) for c in cols], schema=errors_schema())


def commit_batch(
    batch: pa.Table,
    output: str,
    schema: pa.Schema,
    known: frozenset[tuple[str, str, str]] = frozenset(),
    lease_run: str = "",
) -> dict[str, int]:
    """Commit one embedded batch: its problems to the errors table, then its good rows.

    ``batch`` holds the embedder's output columns (the schema-v1 columns plus ``stage``,
    ``error`` and ``warning``); ``schema`` is the table's (``unclip.schema.table_schema``
    with the CLIP metadata). Problems already recorded (``known``) are not written again.
    With ``lease_run``, nothing is written unless that run still holds the table's lease
    (``pipelines.lease.check_holder``; raises LeaseLost).
    Returns counts: rows, failed, failed_known, warnings, parts.
    """
    stage = batch.column("stage")
    problems = []
    failed = failed_known = warnings = 0
    for i, s, e, w, src in zip(
        batch.column("id").to_pylist(),
        stage.to_pylist(),
        batch.column("error").to_pylist(),
        batch.column("warning").to_pylist(),
        batch.column("source").to_pylist(),
        strict=True,
    ):
        if s is not None:
            if (i, s, e) in known:
                failed_known += 1
                continue
            failed += 1
            problems.append((i, src, s, e))
        elif w is not None:
            warnings += 1
            if (i, "caption", w) not in known:
                problems.append((i, src, "caption", w))
    parts = 0
    if lease_run:
        check_holder(output, lease_run)
    if problems:
        write_part(problems_table(problems), errors_uri(output), [repr(p) for p in problems])
        parts += 1
    good = batch.filter(pc.is_null(stage))
    if good.num_rows:
        write_part(good.select(schema.names).cast(schema), output, good.column("id").to_pylist())
        parts += 1
    return {
        "rows": good.num_rows,
        "failed": failed,
        "failed_known": failed_known,
        "warnings": warnings,
        "parts": parts,
    }


def commit_parts(batch: pa.Table, **kwargs) -> pa.Table:
    """The commit stage of the ETL: ``commit_batch`` with its counts as a one-row table."""
    return pa.Table.from_pylist([commit_batch(batch, **kwargs)])
