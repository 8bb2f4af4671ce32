"""One row never fails the ETL: formats outside the allowlist, unexpected decoder errors,
units and shards that cannot be read (no Ray; tests/test_embed.py runs the job)."""

from __future__ import annotations

import io
import struct

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines import decode, sources
from pipelines.decode import RowError, decode_image, decode_rows, decode_unit
from pipelines.embed import _merge_shards
from pipelines.sources import RawRow
from tests.test_embed_inputs import colour_jpeg, write_tar

ACCEPTED = "accepted: JPEG, PNG, WebP, GIF, BMP, TIFF"


def saved(fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (255, 0, 0)).save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"])
def test_accepted_formats_decode(fmt) -> None:
    img = decode_image(saved(fmt), clip_size=8)
    assert img.pixels.shape == (8, 8, 3) and img.pixels[4, 4, 0] > 200


@pytest.mark.parametrize(
    "fmt, name", [("ICO", "ICO"), ("PDF", "PDF"), ("EPS", None), ("JPEG2000", "JPEG 2000")]
)
def test_formats_outside_the_allowlist_are_refused_by_name(fmt, name) -> None:
    if fmt == "EPS":
        data = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n"  # no Ghostscript here
        name = "PostScript/EPS"
    else:
        data = saved(fmt)
    with pytest.raises(RowError) as e:
        decode_image(data, clip_size=8)
    assert e.value.stage == "decode"
    assert f"image format {name} is not accepted ({ACCEPTED})" in e.value.message


@pytest.mark.parametrize("fmt", ["PPM", "TGA", "PCX", "SGI"])
def test_other_pillow_formats_are_not_parsed(fmt) -> None:
    with pytest.raises(RowError, match=r"not an image in an accepted format \(JPEG, PNG"):
        decode_image(saved(fmt), clip_size=8)


def test_any_exception_while_decoding_a_row_becomes_that_rows_error(monkeypatch) -> None:
    real = decode.decode_image

    def flaky(data: bytes, *a, **kw):
        if data == b"plugin bug":
            raise struct.error("unpack requires a buffer of 4 bytes")
        if data == b"out of memory":
            raise MemoryError("cannot allocate")
        return real(data, *a, **kw)

    monkeypatch.setattr(decode, "decode_image", flaky)
    rows = [
        RawRow("a", "s/a", colour_jpeg(1), b"red"),
        RawRow("b", "s/b", b"plugin bug", b"blue"),
        RawRow("c", "s/c", b"out of memory", b"green"),
        RawRow("d", "s/d", colour_jpeg(2), 12345),  # a caption that is not text
    ]
    t = decode_rows(rows, clip_size=8).to_pylist()
    by_id = {r["id"]: r for r in t}
    assert by_id["a"]["stage"] is None and by_id["a"]["pixels"]
    assert by_id["b"]["stage"] == "decode"
    assert by_id["b"]["error"] == "unexpected error: unpack requires a buffer of 4 bytes"
    assert by_id["c"]["error"] == "unexpected MemoryError: cannot allocate"
    assert by_id["d"]["stage"] == "caption" and "unexpected" in by_id["d"]["error"]
    assert all(by_id[i]["pixels"] is None for i in "bcd")


def test_a_unit_that_cannot_be_read_records_each_of_its_rows(tmp_path) -> None:
    path = tmp_path / "rows.parquet"
    pq.write_table(
        pa.table({"id": ["p0", "p1", "p2"], "caption": ["a", "b", "c"], "image": [b"x"] * 3}),
        path,
    )
    entries, _ = sources.index_parquet(str(path))
    (unit,) = sources.make_units(entries, 10)
    path.write_bytes(b"PAR1 overwritten by a broken copy PAR1")  # gone bad after indexing
    t = decode_unit(unit, clip_size=8).to_pylist()
    assert [r["id"] for r in t] == ["p0", "p1", "p2"]
    assert {r["stage"] for r in t} == {"read"}
    assert all(r["error"].startswith("cannot read the rows' shard: ") for r in t)


def good_shard(path, start: int, n: int) -> None:
    write_tar(
        str(path), [(f"{i:05d}", colour_jpeg(i), f"c{i}", None) for i in range(start, start + n)]
    )


def test_unreadable_shards_count_by_rows(tmp_path) -> None:
    good_shard(tmp_path / "00000.tar", 0, 10)
    good_shard(tmp_path / "00001.tar", 10, 10)
    # a shard that is not a tar at all, with no status table: rows unknown, estimated
    (tmp_path / "00002.tar").write_bytes(b"\x00garbage" * 100)
    # a shard cut in the middle (a failed upload): the rows before the cut are kept
    good_shard(tmp_path / "00003.tar", 20, 10)
    data = (tmp_path / "00003.tar").read_bytes()
    (tmp_path / "00003.tar").write_bytes(data[: len(data) // 2 + 100])
    # an unreadable shard whose img2dataset status table lists its rows: recorded by row
    (tmp_path / "00004.tar").write_bytes(b"not a tar")
    status = pa.table({"key": [f"k{i}" for i in range(7)], "status": ["success"] * 7})
    pq.write_table(status, tmp_path / "00004.parquet")

    kind, files = sources.detect(str(tmp_path))
    shards = [sources.index_shard_safe(kind, f) for f in files]
    said: list[str] = []
    index = _merge_shards(kind, files, shards, said.append)
    lost = {p.source: p for p in index.problems if p.id == sources.hash_id(p.source)}
    assert set(lost) == {str(tmp_path / "00002.tar"), str(tmp_path / "00003.tar")}
    assert lost[str(tmp_path / "00002.tar")].error.startswith("cannot read shard: ")
    cut = lost[str(tmp_path / "00003.tar")].error
    assert cut.startswith("cannot read the rest of the shard: shard breaks after ")
    kept = [e for e in index.entries if e.source.startswith(str(tmp_path / "00003.tar"))]
    assert 0 < len(kept) < 10
    listed = [p for p in index.problems if p.source.startswith(str(tmp_path / "00004.parquet"))]
    assert len(listed) == 7 and all("cannot be read there" in p.error for p in listed)
    # each broken shard weighs as the mean of the shards whose rows are known (10, 10 and
    # the 7 listed), not as one
    assert index.rows([lost[str(tmp_path / "00002.tar")]]) == 9
    assert index.rows(index.problems) == 9 + 9 + 7
    assert sum("counted as 9 failed rows" in m for m in said) == 2


def test_a_parquet_shard_with_a_readable_footer_counts_its_rows(tmp_path) -> None:
    path = tmp_path / "a.parquet"
    pq.write_table(
        pa.table({"id": [f"r{i}" for i in range(12)], "caption": ["x"] * 12, "image": [b"y"] * 12}),
        path,
    )
    data = bytearray(path.read_bytes())
    data[4:40] = b"\xff" * 36  # the id column's pages are garbage; the footer is intact
    path.write_bytes(bytes(data))
    shard = sources.index_shard_safe("parquet", str(path))
    assert shard.entries == [] and shard.lost_rows == 12
    assert shard.problems[-1].error.startswith("cannot read shard: ")
