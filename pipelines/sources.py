"""Input sources of the embedding ETL: find, index and read (image, caption) rows. No Ray.

Three input kinds (docs/formats.md, "Inputs of `unclip embed`"), local or ``s3://``:

- ``folder``: images with same-named ``.txt`` captions, searched recursively
  (``a/b.jpg`` + ``a/b.txt``; id ``a/b``, the path without extension);
- ``tar``: webdataset shards as img2dataset writes them (``KEY.jpg``/``KEY.png`` +
  ``KEY.txt`` [+ ``KEY.json`` whose ``key`` is the id and whose ``url`` is kept]; else the
  tar key is the id). img2dataset's ``NNNNN.parquet`` beside ``NNNNN.tar`` lists every row
  it tried: rows whose ``status`` is not ``success`` become problems of stage ``download``
  with img2dataset's ``error_message``; a row listed as a success but absent from the
  shard becomes a ``read`` problem (nothing img2dataset fetched is dropped unseen);
- ``parquet``: a ``caption`` column and either image bytes (``image`` binary, a
  ``{bytes, path}`` struct, or ``jpg``/``png``/``webp``) or an image path/URI column
  (``image_path``, ``image_uri``, ``path``, or a string ``image``), relative paths being
  resolved against the Parquet file's folder; an ``id`` (or ``key``) column is the id, a
  ``url`` column is kept. img2dataset's ``parquet`` output is this layout (``key``,
  ``caption``, ``jpg``, ``url``, ``status``, ``error_message``, ...): rows whose ``status``
  is not ``success`` become ``download`` problems.

A folder holding ``.tar`` files is read as shards (img2dataset's ``.parquet`` files beside
them are read for their status only); else a folder with captioned images as an image
folder; else its Parquet.
Where a source has no key of its own the id is a hash of the source URI. Indexing lists
every row with a small locator and no pixel data, so the driver can drop duplicate ids and
rows already embedded before any image is read. ``read_unit`` then fetches a chunk of rows.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import tarfile
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq

from unclip import fs

InputKind = Literal["folder", "tar", "parquet"]
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
CAPTION_COLUMNS = ("caption", "txt", "text")
BYTES_COLUMNS = ("image", "jpg", "jpeg", "png", "webp", "image_bytes")
PATH_COLUMNS = ("image_path", "image_uri", "path", "image")
ID_COLUMNS = ("id", "key")
URL_COLUMN = "url"
STATUS_COLUMN = "status"  # img2dataset: "success", "failed_to_download", "failed_to_resize"
STATUS_OK = "success"
REMOTE_READ_THREADS = 16


class InputError(ValueError):
    """The input as a whole cannot be used (not found, unknown layout): one clear line."""


class Entry(NamedTuple):
    """One input row before reading: stable id, source URI, kind-specific locator."""

    id: str
    source: str
    loc: tuple  # ("file", image_uri, caption_uri|None) | ("tar", ...) | ("pq", ...)
    url: str | None = None  # where the source tool fetched the image from (img2dataset)


class Problem(NamedTuple):
    """A row of the errors table (unclip.schema.errors_schema)."""

    id: str
    source: str
    stage: str
    error: str


class RawRow(NamedTuple):
    """A row as read: bytes not yet decoded, or the read error."""

    id: str
    source: str
    image: bytes | None
    caption: bytes | str | None
    problem: Problem | None = None
    url: str | None = None


@dataclass(frozen=True)
class InputIndex:
    kind: InputKind
    shards: tuple[str, ...]  # files holding rows (folder: the image files)
    entries: list[Entry]
    problems: list[Problem]  # rows found unusable while indexing (e.g. caption, no image)
    # rows a problem stands for when not 1: an unreadable shard's, by (id, stage, error)
    rows_of: dict[tuple[str, str, str], int] = field(default_factory=dict)

    def rows(self, problems: Iterable[Problem]) -> int:
        """How many input rows ``problems`` stand for."""
        return sum(self.rows_of.get((p.id, p.stage, p.error), 1) for p in problems)


def hash_id(source: str) -> str:
    """The id of a row whose source has no key: a hash of its URI."""
    return hashlib.sha256(source.encode("utf-8")).hexdigest()[:24]


def _uri(uri: str, path: str) -> str:
    return "s3://" + path if uri.startswith("s3://") else path


def _hidden(rel: str) -> bool:
    return any(p.startswith((".", "_")) for p in rel.split("/"))


def _relpath(path: str, root: str) -> str:
    return posixpath.relpath(path, root) if "/" in root else os.path.relpath(path, root)


def detect(uri: str) -> tuple[InputKind, list[str]]:
    """What kind of input ``uri`` is, and its data files (URIs, sorted)."""
    fsys, path = fs.get_fs(uri)
    if not fsys.exists(path):
        raise FileNotFoundError(f"input {uri!r} does not exist")
    if fsys.isfile(path):
        if path.endswith(".tar"):
            return "tar", [uri]
        if path.endswith(".parquet"):
            return "parquet", [uri]
        raise InputError(
            f"input {uri!r} is a file but neither a .tar shard nor a .parquet file; "
            "pass a folder of images + .txt captions, Parquet, or webdataset .tar shards"
        )
    root = path.rstrip("/")
    files = []
    for p in fsys.find(root):
        rel = _relpath(p, root).replace(os.sep, "/")
        if not _hidden(rel):
            files.append(_uri(uri, p))
    files.sort()
    tars = [f for f in files if f.endswith(".tar")]
    images = [f for f in files if f.lower().endswith(IMAGE_EXTS)]
    parquets = [f for f in files if f.endswith(".parquet")]
    texts = {posixpath.splitext(f)[0] for f in files if f.endswith(".txt")}
    captioned = any(posixpath.splitext(f)[0] in texts for f in images)
    # img2dataset writes .parquet metadata beside its .tar shards and "files" folders;
    # images referenced from Parquet by path have no .txt beside them
    if tars:
        return "tar", tars
    if captioned or (images and not parquets):
        return "folder", files
    if parquets:
        return "parquet", parquets
    raise InputError(
        f"no images, .tar shards or .parquet files under {uri!r} (found {len(files)} other file(s))"
    )


# ---------------------------------------------------------------------------- folder
def index_folder(uri: str, files: Sequence[str]) -> InputIndex:
    """Images + same-named .txt captions; id = path relative to ``uri`` minus extension."""
    root = _uri(uri, fs.get_fs(uri)[1].rstrip("/"))
    captions: dict[str, str] = {}
    images: list[tuple[str, str]] = []
    for f in files:
        rel = f[len(root) :].lstrip("/\\").replace(os.sep, "/")
        stem, ext = posixpath.splitext(rel)
        if ext == ".txt":
            captions[stem] = f
        elif ext.lower() in IMAGE_EXTS:
            images.append((stem, f))
    entries = [Entry(stem, f, ("file", f, captions.get(stem))) for stem, f in images]
    with_image = {stem for stem, _ in images}
    problems = [
        Problem(stem, f, "read", "caption file without an image")
        for stem, f in sorted(captions.items())
        if stem not in with_image
    ]
    return InputIndex("folder", tuple(f for _, f in images), entries, problems)


# ---------------------------------------------------------------------------- tar
def _download_problem(rid: str, src: str, status: object, message: object) -> Problem:
    """A row the source tool (img2dataset) could not fetch, with its own message."""
    msg = f"img2dataset status {status}"
    return Problem(rid, src, "download", f"{msg}: {message}" if message else msg)


def _shard_status(uri: str) -> pa.Table | None:
    """img2dataset's per-shard table beside ``NNNNN.tar`` (``NNNNN.parquet``), if any,
    with its key / status / error_message columns."""
    side = uri[: -len(".tar")] + ".parquet"
    if not fs.exists(side):
        return None
    pafs, path = fs.pyarrow_fs(side)
    names = pq.read_schema(path, filesystem=pafs).names
    if "key" not in names or STATUS_COLUMN not in names:
        return None
    cols = ["key", STATUS_COLUMN] + (["error_message"] if "error_message" in names else [])
    return pq.read_table(path, columns=cols, filesystem=pafs)


def index_tar(uri: str) -> tuple[list[Entry], list[Problem]]:
    """Members of one webdataset shard, grouped by key (streamed once, no pixel decode),
    checked against img2dataset's status table beside the shard when there is one."""
    fsys, path = fs.get_fs(uri)
    groups: dict[str, dict[str, tuple[int, int, str]]] = {}
    json_keys: dict[str, str] = {}
    urls: dict[str, str] = {}
    broken = ""
    try:
        end = _scan_tar(fsys, path, groups, json_keys, urls)
        # tarfile ends a stream quietly at a cut inside a member or a header
        size = fsys.size(path)
        tail = size - (-(-end // 512) * 512)
        if end > size:
            broken = f"the file ends ({size} bytes) inside a member (to byte {end})"
        elif 0 < tail < 1024 and fsys.cat_file(path, start=size - tail, end=size).strip(b"\0"):
            broken = f"the file ends ({size} bytes) inside a member header"
    except Exception as e:  # noqa: BLE001 - keep the members read before the break
        if not groups:
            raise
        broken = f"{type(e).__name__}: {e}"
    entries, problems = [], []
    for key, members in groups.items():
        image_ext = next((e for e in IMAGE_EXTS if e in members), None)
        rid = json_keys.get(key, key)
        if image_ext is None:
            if ".txt" in members or ".json" in members:
                name = members.get(".txt", members.get(".json"))[2]
                what = "caption" if ".txt" in members else "metadata"
                problems.append(
                    Problem(rid, f"{uri}#{name}", "read", f"{what} without an image in shard")
                )
            continue
        off, size, name = members[image_ext]
        cap = members.get(".txt")
        loc = ("tar", uri, off, size, cap[0] if cap else -1, cap[1] if cap else -1)
        entries.append(Entry(rid, f"{uri}#{name}", loc, urls.get(key)))
    status = _shard_status(uri)
    if status is not None:
        in_shard = {json_keys.get(k, k) for k in groups}
        problems += _status_problems(uri, status, in_shard, broken)
    elif broken:
        raise PartialShard(entries, problems, f"shard breaks after {len(groups)} keys: {broken}")
    return entries, problems


def _scan_tar(
    fsys: Any,
    path: str,
    groups: dict[str, dict[str, tuple[int, int, str]]],
    json_keys: dict[str, str],
    urls: dict[str, str],
) -> int:
    """Stream a shard's headers into ``groups`` (key -> ext -> (offset, size, name));
    returns where the last member's data ends."""
    end = 0
    with fsys.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tf:
        for m in tf:
            end = max(end, m.offset_data + m.size)
            if not m.isfile():
                continue
            base = posixpath.basename(m.name)
            if base.startswith(".") or "." not in base:
                continue
            head, ext = base.split(".", 1)
            key = posixpath.join(posixpath.dirname(m.name), head)
            ext = "." + ext.lower()
            groups.setdefault(key, {})[ext] = (m.offset_data, m.size, m.name)
            if ext == ".json":
                member = tf.extractfile(m)
                try:
                    meta = json.loads(member.read()) if member else {}
                except ValueError:
                    meta = {}
                if not isinstance(meta, dict):
                    continue
                if isinstance(meta.get("key"), str) and meta["key"]:
                    json_keys[key] = meta["key"]
                if isinstance(meta.get(URL_COLUMN), str):
                    urls[key] = meta[URL_COLUMN]
    return end


def _status_problems(
    uri: str, status: pa.Table, in_shard: set[str], broken: str = ""
) -> list[Problem]:
    """Rows of img2dataset's status table that are not in the shard: failed downloads
    (stage ``download``) and successes missing from the tar (stage ``read``; ``broken``:
    the shard could not be read past some point, or at all, for this reason)."""
    side = uri[: -len(".tar")] + ".parquet"
    messages = (
        status.column("error_message").to_pylist()
        if "error_message" in status.column_names
        else [None] * status.num_rows
    )
    problems = []
    for i, (key, st, msg) in enumerate(
        zip(
            status.column("key").to_pylist(),
            status.column(STATUS_COLUMN).to_pylist(),
            messages,
            strict=True,
        )
    ):
        rid = str(key) if key not in (None, "") else hash_id(f"{side}#{i}")
        if st != STATUS_OK:
            problems.append(_download_problem(rid, f"{side}#{i}", st, msg))
        elif rid not in in_shard:
            why = (
                f"cannot be read there: {broken}"
                if broken
                else "has no member for it (truncated or edited shard?)"
            )
            problems.append(
                Problem(
                    rid,
                    f"{side}#{i}",
                    "read",
                    f"img2dataset lists key {rid} as downloaded but {posixpath.basename(uri)} "
                    + why,
                )
            )
    return problems


# ---------------------------------------------------------------------------- parquet
@dataclass(frozen=True)
class ParquetLayout:
    caption: str
    image: str
    image_kind: Literal["bytes", "struct", "path"]
    id: str | None


def parquet_layout(schema: pa.Schema, uri: str = "") -> ParquetLayout:
    """Which columns hold the caption, the image (bytes, {bytes,path} struct or path), id."""
    names = set(schema.names)
    caption = next((c for c in CAPTION_COLUMNS if c in names), None)
    image, kind = None, None
    for c in BYTES_COLUMNS:
        if c in names:
            t = schema.field(c).type
            if pa.types.is_binary(t) or pa.types.is_large_binary(t):
                image, kind = c, "bytes"
                break
            if pa.types.is_struct(t) and t.get_field_index("bytes") >= 0:
                image, kind = c, "struct"
                break
    if image is None:
        for c in PATH_COLUMNS:
            if c in names and pa.types.is_string(schema.field(c).type):
                image, kind = c, "path"
                break
    if caption is None or image is None or kind is None:
        raise InputError(
            f"Parquet input {uri!r} needs a 'caption' column and an image column "
            f"('image' bytes or an 'image_path'/'image_uri'/'path' string column); "
            f"found columns {sorted(names)}"
        )
    ident = next((c for c in ID_COLUMNS if c in names), None)
    return ParquetLayout(caption, image, kind, ident)


def _resolve(base_uri: str, p: str) -> str:
    if "://" in p or p.startswith("/"):
        return p
    return fs.join(base_uri.rsplit("/", 1)[0] if "/" in base_uri else ".", p)


def index_parquet(uri: str) -> tuple[list[Entry], list[Problem]]:
    """Rows of one Parquet file: reads the id, path, url and status columns only."""
    pafs, path = fs.pyarrow_fs(uri)
    pf = pq.ParquetFile(path, filesystem=pafs)
    layout = parquet_layout(pf.schema_arrow, uri)
    names = pf.schema_arrow.names
    status_cols = [STATUS_COLUMN] if STATUS_COLUMN in names else []
    status_cols += ["error_message"] if status_cols and "error_message" in names else []
    url = URL_COLUMN if URL_COLUMN in names and layout.image != URL_COLUMN else None
    path_col = layout.image if layout.image_kind == "path" else None
    cols = list(dict.fromkeys(c for c in (layout.id, path_col, url, *status_cols) if c))
    entries: list[Entry] = []
    problems: list[Problem] = []
    row0 = 0
    for rg in range(pf.num_row_groups):
        n = pf.metadata.row_group(rg).num_rows
        t = pf.read_row_group(rg, columns=cols) if cols else None

        def column(name: str | None, t: pa.Table | None = t, n: int = n) -> list:
            return t.column(name).to_pylist() if t is not None and name else [None] * n

        ids, paths, urls = column(layout.id), column(path_col), column(url)
        status = column(status_cols[0] if status_cols else None)
        messages = column(status_cols[1] if len(status_cols) > 1 else None)
        for i in range(n):
            src = f"{uri}#{row0 + i}"
            rid = str(ids[i]) if ids[i] not in (None, "") else hash_id(src)
            if status_cols and status[i] != STATUS_OK:
                problems.append(_download_problem(rid, src, status[i], messages[i]))
                continue
            if path_col is not None:
                if not paths[i]:
                    problems.append(Problem(rid, src, "read", "empty image path"))
                    continue
                src = _resolve(uri, paths[i])
                rid = str(ids[i]) if ids[i] not in (None, "") else hash_id(src)
            entries.append(Entry(rid, src, ("pq", uri, rg, i), urls[i]))
        row0 += n
    return entries, problems


# ---------------------------------------------------------------------------- all kinds
def index_shard(kind: InputKind, uri: str) -> tuple[list[Entry], list[Problem]]:
    """Index one shard of a tar or parquet input (the unit of parallel indexing)."""
    if kind == "tar":
        return index_tar(uri)
    if kind == "parquet":
        return index_parquet(uri)
    raise ValueError(f"no per-shard index for input kind {kind!r}")


class PartialShard(Exception):
    """A shard read up to a break: the rows before it, and the reason."""

    def __init__(self, entries: list[Entry], problems: list[Problem], reason: str) -> None:
        super().__init__(reason)
        self.entries, self.problems, self.reason = entries, problems, reason


class ShardIndex(NamedTuple):
    """One shard's rows and problems. ``lost_rows``: how many rows the shard's own problem
    (the last one) stands for: 0 = there is none, -1 = a shard that broke and whose row
    count is unknown (the driver estimates it from the other shards)."""

    entries: list[Entry]
    problems: list[Problem]
    lost_rows: int = 0


def index_shard_safe(kind: InputKind, uri: str) -> ShardIndex:
    """``index_shard`` that never raises: a shard that cannot be read (in part or at all)
    is recorded by rows where it says how many it holds (img2dataset's status table, a
    Parquet footer), else as one problem of the shard that counts for its unknown rows."""
    try:
        return ShardIndex(*index_shard(kind, uri))
    except PartialShard as e:
        what = f"cannot read the rest of the shard: {e.reason}"
        return ShardIndex(e.entries, [*e.problems, Problem(hash_id(uri), uri, "read", what)], -1)
    except Exception as e:  # noqa: BLE001 - a shard is recorded, never fatal
        reason = f"{type(e).__name__}: {e}"
    problem = Problem(hash_id(uri), uri, "read", f"cannot read shard: {reason}")
    try:
        if kind == "tar" and (status := _shard_status(uri)) is not None:
            return ShardIndex([], _status_problems(uri, status, set(), reason))
        if kind == "parquet":
            pafs, path = fs.pyarrow_fs(uri)
            rows = pq.read_metadata(path, filesystem=pafs).num_rows
            return ShardIndex([], [problem], max(rows, 1))
    except Exception:  # noqa: BLE001, S110 - no row count to be had: estimated instead
        pass
    return ShardIndex([], [problem], -1)


def dedup(entries: Iterable[Entry]) -> tuple[list[Entry], list[Problem]]:
    """Keep the first row of each id (input order); record the others as problems."""
    first: dict[str, str] = {}
    kept: list[Entry] = []
    dups: list[Problem] = []
    for e in entries:
        if e.id in first:
            dups.append(
                Problem(e.id, e.source, "read", f"duplicate id; kept the row from {first[e.id]}")
            )
        else:
            first[e.id] = e.source
            kept.append(e)
    return kept, dups


def make_units(entries: Sequence[Entry], rows_per_unit: int) -> list[str]:
    """Chunks of entries to read together (JSON strings).

    A chunk never spans two tar shards (it is read with one ranged GET) and is a whole
    Parquet row group (read once).
    """
    groups: dict[Any, list[Entry]] = {}
    for e in entries:
        kind = e.loc[0]
        key = (
            (kind, e.loc[1], e.loc[2])
            if kind == "pq"
            else (kind, e.loc[1] if kind == "tar" else "")
        )
        groups.setdefault(key, []).append(e)
    units = []
    for key, rows in groups.items():
        step = len(rows) if key[0] == "pq" else rows_per_unit
        for i in range(0, len(rows), step):
            units.append(json.dumps([list(r) for r in rows[i : i + step]]))
    return units


def unit_entries(unit: str) -> list[Entry]:
    """The entries of one unit of ``make_units``."""
    return [Entry(r[0], r[1], tuple(r[2]), r[3]) for r in json.loads(unit)]


def read_unit(unit: str) -> list[RawRow]:
    """Fetch the bytes of one unit's rows; per-row read failures become problems."""
    rows = unit_entries(unit)
    if not rows:
        return []
    kind = rows[0].loc[0]
    if kind == "file":
        return _read_files(rows)
    if kind == "tar":
        return _read_tar(rows)
    if kind == "pq":
        return _read_parquet(rows)
    raise ValueError(f"unknown locator kind {kind!r}")


def _fetch(uris: Sequence[str]) -> list[bytes | Exception]:
    """Whole objects, concurrently for remote storage."""

    def one(u: str) -> bytes | Exception:
        try:
            return fs.read_bytes(u)
        except Exception as e:  # noqa: BLE001 - recorded per row, the job goes on
            return e

    if not uris:
        return []
    if not any(fs.is_remote(u) for u in uris):
        return [one(u) for u in uris]
    with ThreadPoolExecutor(min(REMOTE_READ_THREADS, len(uris))) as pool:
        return list(pool.map(one, uris))


def _read_problem(e: Entry, err: Exception, what: str) -> RawRow:
    msg = f"cannot read {what}: {type(err).__name__}: {err}"
    return RawRow(e.id, e.source, None, None, Problem(e.id, e.source, "read", msg))


def _read_files(rows: list[Entry]) -> list[RawRow]:
    caps = [e.loc[2] for e in rows if e.loc[2]]
    data = _fetch([e.loc[1] for e in rows] + caps)
    images, cap_data = data[: len(rows)], iter(data[len(rows) :])
    out = []
    for e, img in zip(rows, images, strict=True):
        cap = next(cap_data) if e.loc[2] else None
        if isinstance(img, Exception):
            out.append(_read_problem(e, img, "image"))
        elif isinstance(cap, Exception):
            out.append(_read_problem(e, cap, "caption file"))
        elif e.loc[2] is None:
            name = posixpath.splitext(posixpath.basename(e.source))[0] + ".txt"
            out.append(_missing_caption(e, f"missing caption file {name} beside the image"))
        else:
            out.append(RawRow(e.id, e.source, img, cap, url=e.url))
    return out


def _missing_caption(e: Entry, msg: str) -> RawRow:
    return RawRow(e.id, e.source, None, None, Problem(e.id, e.source, "caption", msg))


def _read_tar(rows: list[Entry]) -> list[RawRow]:
    """One ranged read covering the unit's members (they are contiguous in the shard)."""
    uri = rows[0].loc[1]
    spans = [(e.loc[2], e.loc[3]) for e in rows] + [(e.loc[4], e.loc[5]) for e in rows]
    start = min(o for o, s in spans if o >= 0)
    end = max(o + s for o, s in spans if o >= 0)
    fsys, path = fs.get_fs(uri)
    try:
        blob = fsys.cat_file(path, start=start, end=end)
    except Exception as e:  # noqa: BLE001 - the whole unit is unreadable: record each row
        return [_read_problem(r, e, "shard") for r in rows]
    out = []
    for e in rows:
        _, _, off, size, coff, csize = e.loc
        if coff < 0:
            out.append(_missing_caption(e, "missing caption: no .txt member for this key"))
            continue
        img = blob[off - start : off - start + size]
        cap = blob[coff - start : coff - start + csize]
        out.append(RawRow(e.id, e.source, img, cap, url=e.url))
    return out


def _read_parquet(rows: list[Entry]) -> list[RawRow]:
    uri, rg = rows[0].loc[1], rows[0].loc[2]
    pafs, path = fs.pyarrow_fs(uri)
    pf = pq.ParquetFile(path, filesystem=pafs)
    layout = parquet_layout(pf.schema_arrow, uri)
    t = pf.read_row_group(rg, columns=[layout.caption, layout.image])
    idx = pa.array([e.loc[3] for e in rows], pa.int64())
    t = t.take(idx)
    captions = t.column(layout.caption).to_pylist()
    col = t.column(layout.image)
    if layout.image_kind == "path":
        images: list[Any] = _fetch([e.source for e in rows])
    elif layout.image_kind == "struct":
        images = [v["bytes"] if v else None for v in col.to_pylist()]
    else:
        images = col.to_pylist()
    out = []
    for e, img, cap in zip(rows, images, captions, strict=True):
        if isinstance(img, Exception):
            out.append(_read_problem(e, img, "image"))
        else:
            out.append(RawRow(e.id, e.source, img if img is not None else b"", cap, url=e.url))
    return out
