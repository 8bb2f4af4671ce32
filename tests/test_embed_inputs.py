"""Embedding ETL inputs without Ray: real bad files, decoding, captions, sources, parts.

The helpers here (``write_bad_folder``, ``write_tar``, ...) also feed tests/test_embed.py.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pipelines import sources, table
from pipelines.decode import RowError, decode_image, decode_rows, read_caption
from pipelines.embedder import Embedder
from tests.tiny import save_tiny_clip

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)
LONG_CAPTION = " ".join(["a very long caption about many red and blue things"] * 12)


# ---------------------------------------------------------------------------- real files
def jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95, **kw)
    return buf.getvalue()


def png(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kw)
    return buf.getvalue()


def top_red_bottom_blue(w: int = 32, h: int = 32) -> Image.Image:
    a = np.zeros((h, w, 3), np.uint8)
    a[: h // 2] = RED
    a[h // 2 :] = BLUE
    return Image.fromarray(a)


def exif_rotated_jpeg() -> bytes:
    """Displays red-on-top/blue-below only if EXIF orientation 6 (rotate 90 CW) is applied."""
    shown = top_red_bottom_blue()
    stored = shown.rotate(90, expand=True)  # counter-clockwise: the camera's raw pixels
    exif = Image.Exif()
    exif[0x0112] = 6
    return jpeg(stored, exif=exif.tobytes())


def bomb_png(side: int = 20_000) -> bytes:
    """A valid 1-bit PNG of side x side pixels (400 MP) that compresses to ~50 kB."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return len(data).to_bytes(4, "big") + body + zlib.crc32(body).to_bytes(4, "big")

    row = b"\x00" * (1 + side // 8)
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    ihdr = side.to_bytes(4, "big") * 2 + bytes([1, 0, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def bad_images() -> dict[str, bytes]:
    """Every awkward image kind of the issue, as real file bytes (name -> bytes)."""
    good = Image.new("RGB", (40, 30), RED)
    alpha = np.zeros((32, 32, 4), np.uint8)  # fully transparent black
    alpha[:16] = (*BLUE, 255)  # top half opaque blue
    grey16 = np.full((32, 32), 32768, np.uint16)
    return {
        "good.jpg": jpeg(good),
        "truncated.jpg": jpeg(
            Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8))
        )[:700],
        "zero.jpg": b"",
        "text.jpg": b"this is not an image, just text\n",
        "alpha.png": png(Image.fromarray(alpha, "RGBA")),
        "palette.png": png(Image.new("RGB", (32, 32), BLUE).convert("P")),
        "sixteen.png": png(Image.fromarray(grey16)),
        "grey.png": png(Image.new("L", (32, 32), 200)),
        "cmyk.jpg": jpeg(Image.new("CMYK", (32, 32), (0, 255, 255, 0))),
        "exif.jpg": exif_rotated_jpeg(),
        "bomb.png": bomb_png(),
    }


def write_bad_folder(root: str) -> dict[str, str]:
    """A folder with every bad case + good rows; returns {id: expected outcome}.

    Outcome: "ok", "warn" (embedded with a truncated-caption warning), "dup" (second row of
    an id), or the stage of the error ("decode", "caption", "read").
    """
    os.makedirs(root, exist_ok=True)
    expected = {}
    for name, data in bad_images().items():
        stem = name.rsplit(".", 1)[0]
        with open(os.path.join(root, name), "wb") as f:
            f.write(data)
        with open(os.path.join(root, stem + ".txt"), "w") as f:
            f.write(f"a {stem} picture\n")
        expected[stem] = "decode" if stem in ("truncated", "zero", "text", "bomb") else "ok"
    red = png(Image.new("RGB", (32, 32), RED))
    cases = {
        "nocaption": None,
        "emptycap": b"  \n\t",
        "latin1": "un caf\xe9 rouge".encode("latin-1"),
        "long": LONG_CAPTION.encode(),
        "sub/nested": b"a nested red square",
    }
    for stem, cap in cases.items():
        os.makedirs(os.path.dirname(os.path.join(root, stem)), exist_ok=True)
        with open(os.path.join(root, stem + ".png"), "wb") as f:
            f.write(red)
        if cap is not None:
            with open(os.path.join(root, stem + ".txt"), "wb") as f:
                f.write(cap)
    expected.update(
        nocaption="caption",
        emptycap="caption",
        latin1="caption",
        long="warn",
        **{"sub/nested": "ok"},
    )
    # the same id twice: dup.jpg is kept (sorted first), dup.png is the duplicate
    with open(os.path.join(root, "dup.jpg"), "wb") as f:
        f.write(jpeg(Image.new("RGB", (32, 32), BLUE)))
    with open(os.path.join(root, "dup.png"), "wb") as f:
        f.write(red)
    with open(os.path.join(root, "dup.txt"), "w") as f:
        f.write("one id, two images")
    expected["dup"] = "ok"
    with open(os.path.join(root, "orphan.txt"), "w") as f:
        f.write("a caption whose image is missing")
    expected["orphan"] = "read"
    return expected


def write_good_folder(root: str, n: int, start: int = 0, size: int = 40) -> list[str]:
    """``n`` random RGB PNGs with captions; returns their ids."""
    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(start)
    ids = []
    for i in range(start, start + n):
        rid = f"img{i:05d}"
        arr = rng.integers(0, 255, (size, size + 8, 3), dtype=np.uint8)
        Image.fromarray(arr).save(os.path.join(root, rid + ".png"))
        with open(os.path.join(root, rid + ".txt"), "w") as f:
            f.write(f"random picture number {i}")
        ids.append(rid)
    return ids


def write_tar(path: str, samples: list[tuple[str, bytes | None, str | None, str | None]]) -> None:
    """An img2dataset-style webdataset shard: (tar key, jpg, caption, json key) per sample."""
    with tarfile.open(path, "w") as tf:
        for key, img, cap, json_key in samples:
            members = []
            if img is not None:
                members.append((f"{key}.jpg", img))
            if cap is not None:
                members.append((f"{key}.txt", cap.encode()))
            if json_key is not None:
                members.append((f"{key}.json", json.dumps({"key": json_key, "url": "x"}).encode()))
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


def colour_jpeg(i: int) -> bytes:
    return jpeg(Image.new("RGB", (36, 36), (i * 40 % 256, 100, 200)))


# ---------------------------------------------------------------------------- decoding
def centre(img: bytes | Image.Image) -> np.ndarray:
    im = Image.open(io.BytesIO(img)) if isinstance(img, bytes) else img
    a = np.asarray(im.convert("RGB"), np.int32)
    return a


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("truncated.jpg", "corrupt image"),
        ("zero.jpg", "empty file"),
        ("text.jpg", "not an image"),
        ("bomb.png", "refused before decoding"),
    ],
)
def test_bad_images_raise_a_decode_error_with_the_reason(name: str, reason: str) -> None:
    with pytest.raises(RowError) as e:
        decode_image(bad_images()[name], 16, 32)
    assert e.value.stage == "decode" and reason in e.value.message


def test_bomb_is_refused_by_its_header_under_a_lower_limit_too() -> None:
    data = png(Image.new("RGB", (300, 200)))
    with pytest.raises(RowError, match="60000 pixels|0 MP, above"):
        decode_image(data, 16, max_pixels=50_000)
    assert decode_image(data, 16, max_pixels=60_000).pixels.shape == (16, 16, 3)


def test_awkward_images_become_8bit_rgb_with_the_right_colours() -> None:
    imgs = bad_images()
    d = {
        k: decode_image(imgs[k], 16, 32)
        for k in imgs
        if k.split(".")[0] not in ("truncated", "zero", "text", "bomb")
    }
    for k, v in d.items():
        assert v.pixels.shape == (16, 16, 3) and v.pixels.dtype == np.uint8, k
        out = centre(v.png)
        assert out.shape == (32, 32, 3), k
    alpha = centre(d["alpha.png"].png)
    assert (alpha[2, 16] == BLUE).all() and (alpha[-2, 16] == WHITE).all()  # white, not black
    assert (centre(d["palette.png"].png)[16, 16] == BLUE).all()
    assert abs(int(centre(d["sixteen.png"].png)[16, 16, 0]) - 128) <= 1  # scaled, not clipped
    g = centre(d["grey.png"].png)[16, 16]
    assert (g == 200).all()
    cmyk = centre(d["cmyk.jpg"].png)[16, 16]
    assert cmyk[0] > 200 and cmyk[1] < 60 and cmyk[2] < 60  # red
    ex = centre(d["exif.jpg"].png)
    assert ex[3, 16, 0] > 200 and ex[3, 16, 2] < 60  # red on top after applying EXIF
    assert ex[-3, 16, 2] > 200 and ex[-3, 16, 0] < 60  # blue below
    good = d["good.jpg"]
    assert (good.width, good.height) == (40, 30)


def test_centre_crop_keeps_the_middle() -> None:
    a = np.zeros((20, 60, 3), np.uint8)
    a[:, 20:40] = RED  # only the centre square is red
    out = decode_image(png(Image.fromarray(a)), 10, 20)
    assert (centre(out.png)[:, 2:-2] == RED).all()
    assert out.pixels.mean(axis=(0, 1))[0] > 240


def test_captions_strict_utf8_strip_and_reasons() -> None:
    assert read_caption("\ufeffa red circle \n".encode()) == "a red circle"
    assert read_caption("  ok ") == "ok"
    for data, reason in [
        (None, "missing caption"),
        (b" \n ", "empty caption"),
        ("caf\xe9".encode("latin-1"), "not valid UTF-8 (byte 0xe9 at offset 3)"),
        (b"a\x00b", "NUL"),
    ]:
        with pytest.raises(RowError) as e:
            read_caption(data)
        assert e.value.stage == "caption" and reason in e.value.message


# ---------------------------------------------------------------------------- sources
def test_folder_index_ids_captions_duplicates_and_orphans(tmp_path) -> None:
    expected = write_bad_folder(str(tmp_path / "in"))
    kind, files = sources.detect(str(tmp_path / "in"))
    assert kind == "folder"
    index = sources.index_folder(str(tmp_path / "in"), files)
    kept, dups = sources.dedup(index.entries)
    assert sorted(e.id for e in kept) == sorted(k for k in expected if k != "orphan")
    assert [(d.id, d.stage) for d in dups] == [("dup", "read")]
    assert dups[0].source.endswith("dup.png") and "dup.jpg" in dups[0].error
    assert [(p.id, p.stage) for p in index.problems] == [("orphan", "read")]
    nested = next(e for e in kept if e.id == "sub/nested")
    assert nested.loc[2].endswith(os.path.join("sub", "nested.txt"))


def test_decode_rows_of_a_folder_records_each_problem(tmp_path) -> None:
    expected = write_bad_folder(str(tmp_path / "in"))
    _, files = sources.detect(str(tmp_path / "in"))
    kept, _ = sources.dedup(sources.index_folder(str(tmp_path / "in"), files).entries)
    rows = []
    for unit in sources.make_units(kept, 5):
        rows += decode_rows(sources.read_unit(unit), 16, 24).to_pylist()
    got = {r["id"]: r["stage"] or "ok" for r in rows}
    want = {k: ("ok" if v in ("warn", "ok") else v) for k, v in expected.items() if k != "orphan"}
    assert got == want
    reasons = {r["id"]: r["error"] for r in rows if r["error"]}
    assert "nocaption.txt" in reasons["nocaption"]
    assert "UTF-8" in reasons["latin1"] and "empty" in reasons["emptycap"]
    ok = [r for r in rows if r["stage"] is None]
    assert all(len(r["pixels"]) == 16 * 16 * 3 and r["image"][:4] == b"\x89PNG" for r in ok)


def test_tar_index_uses_json_keys_and_reads_members(tmp_path) -> None:
    shard = str(tmp_path / "00000.tar")
    write_tar(
        shard,
        [
            ("000000000", colour_jpeg(0), "first", "k0"),
            ("000000001", colour_jpeg(1), "second", None),
            ("000000002", colour_jpeg(2), None, "k2"),  # no caption
            ("000000003", None, "caption only", "k3"),  # no image
        ],
    )
    entries, problems = sources.index_tar(shard)
    assert [e.id for e in entries] == ["k0", "000000001", "k2"]
    assert entries[0].source == f"{shard}#000000000.jpg"
    assert [(p.id, p.stage) for p in problems] == [("k3", "read")]
    rows = sources.read_unit(sources.make_units(entries, 10)[0])
    assert rows[0].image == colour_jpeg(0) and rows[0].caption == b"first"
    assert rows[2].problem is not None and rows[2].problem.stage == "caption"


def test_parquet_layouts_bytes_struct_and_relative_paths(tmp_path) -> None:
    imgs = [colour_jpeg(i) for i in range(3)]
    pq.write_table(
        pa.table({"caption": ["a", "b", None], "image": imgs}), tmp_path / "bytes.parquet"
    )
    struct = pa.array([{"bytes": b, "path": f"{i}.jpg"} for i, b in enumerate(imgs)])
    pq.write_table(
        pa.table({"id": ["s0", "s1", "s2"], "caption": ["x", "y", "z"], "image": struct}),
        tmp_path / "struct.parquet",
    )
    (tmp_path / "imgs").mkdir()
    for i, b in enumerate(imgs):
        (tmp_path / "imgs" / f"{i}.jpg").write_bytes(b)
    pq.write_table(
        pa.table({"caption": ["p", "q"], "image_path": ["imgs/0.jpg", "imgs/missing.jpg"]}),
        tmp_path / "paths.parquet",
    )
    kind, files = sources.detect(str(tmp_path))
    assert kind == "parquet" and len(files) == 3
    by_file = {os.path.basename(f): sources.index_parquet(f)[0] for f in files}
    b = by_file["bytes.parquet"]
    assert b[0].id == sources.hash_id(b[0].source) and b[0].source.endswith("bytes.parquet#0")
    assert [e.id for e in by_file["struct.parquet"]] == ["s0", "s1", "s2"]
    p = by_file["paths.parquet"]
    assert p[0].source == str(tmp_path / "imgs" / "0.jpg")
    rows = {}
    for es in by_file.values():
        for unit in sources.make_units(es, 2):
            rows.update({r.id: r for r in sources.read_unit(unit)})
    assert rows[b[1].id].image == imgs[1] and rows[b[2].id].caption is None
    assert rows["s2"].image == imgs[2]
    assert rows[p[0].id].image == imgs[0]
    assert rows[p[1].id].problem.stage == "read" and "missing.jpg" in rows[p[1].id].problem.error


def test_unusable_inputs_are_refused_clearly(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sources.detect(str(tmp_path / "nope"))
    (tmp_path / "notes.md").write_text("x")
    with pytest.raises(sources.InputError, match="no images"):
        sources.detect(str(tmp_path))
    pq.write_table(pa.table({"x": [1]}), tmp_path / "t.parquet")
    with pytest.raises(sources.InputError, match="needs a 'caption' column"):
        sources.index_parquet(str(tmp_path / "t.parquet"))


# ---------------------------------------------------------------------------- parts, embedder
def test_parts_are_committed_atomically_with_deterministic_names(tmp_path) -> None:
    out = str(tmp_path / "t")
    t = table.problems_table([("a", "s", "decode", "bad"), ("b", "s", "read", "gone")])
    u1 = table.write_part(t, out, ["a", "b"])
    u2 = table.write_part(t, out, ["b", "a"])  # a retried task: same rows, same part
    assert u1 == u2 and sorted(os.listdir(out)) == [os.path.basename(u1)]
    (tmp_path / "t" / f"{table.TMP_PREFIX}x.parquet-1234").write_bytes(b"PAR1 partial")
    assert table.remove_stale_temp(out) == 1
    assert pq.read_table(u1).num_rows == 2
    table.check_writable(str(tmp_path / "new" / "table"))
    assert os.listdir(tmp_path / "new" / "table") == []  # the probe is gone
    (tmp_path / "file").write_text("x")
    with pytest.raises(PermissionError, match="cannot write the table"):
        table.check_writable(str(tmp_path / "file" / "table"))


def test_embedder_matches_clip_and_schema_types(tmp_path) -> None:
    clip = save_tiny_clip(str(tmp_path / "clip"))
    expected = write_bad_folder(str(tmp_path / "in"))
    _, files = sources.detect(str(tmp_path / "in"))
    kept, _ = sources.dedup(sources.index_folder(str(tmp_path / "in"), files).entries)
    decoded = decode_rows(sources.read_unit(sources.make_units(kept, 1000)[0]), 32, 0)
    out = Embedder(str(tmp_path / "clip"))(decoded)
    assert out.schema.field("text_emb").type == pa.list_(pa.float32(), 32)
    rows = {r["id"]: r for r in out.to_pylist()}
    assert rows["long"]["warning"] and "truncated" in rows["long"]["warning"]
    assert sum(1 for r in rows.values() if r["warning"]) == 1
    assert {k for k, r in rows.items() if r["stage"] is None} == {
        k for k, v in expected.items() if v in ("ok", "warn")
    }
    good = rows["good"]
    tokens, _ = clip.tokenize([good["caption"]])
    assert good["text_tokens"] == clip.strip_tokens(tokens)[0]
    want_t = clip.encode_text(tokens)[0].numpy()
    np.testing.assert_allclose(good["text_emb"], want_t, atol=1e-5)
    pixels = np.frombuffer(
        decoded.filter(pa.compute.equal(decoded["id"], "good"))["pixels"][0].as_py(), np.uint8
    )
    img = Image.fromarray(pixels.reshape(32, 32, 3))
    want_i = clip.encode_image(clip.preprocess(img)[None])[0].numpy()
    np.testing.assert_allclose(good["image_emb"], want_i, atol=1e-4)
    assert abs(np.linalg.norm(good["image_emb"]) - 1) < 1e-5


def test_a_row_the_clip_raises_on_or_makes_nan_fails_alone(tmp_path) -> None:
    """One row whose text makes the CLIP raise, one whose image embedding is NaN: both become
    ``embed`` error rows with the reason; every other row is embedded as in a clean batch."""
    save_tiny_clip(str(tmp_path / "clip"))
    write_bad_folder(str(tmp_path / "in"))
    _, files = sources.detect(str(tmp_path / "in"))
    kept, _ = sources.dedup(sources.index_folder(str(tmp_path / "in"), files).entries)
    decoded = decode_rows(sources.read_unit(sources.make_units(kept, 1000)[0]), 32, 0)
    clean = Embedder(str(tmp_path / "clip"))(decoded)
    ok = [r["id"] for r in clean.to_pylist() if r["stage"] is None]
    assert len(ok) >= 3
    pixels = dict(zip(decoded["id"].to_pylist(), decoded["pixels"].to_pylist(), strict=True))
    unique = [i for i in ok if [pixels[j] for j in ok].count(pixels[i]) == 1]  # NaN marks by pixels
    nan = unique[0]
    boom = next(i for i in ok if i != nan)
    captions = dict(zip(decoded["id"].to_pylist(), decoded["caption"].to_pylist(), strict=True))
    faulty = Embedder(str(tmp_path / "clip"))
    encode_text, encode_images = faulty.clip.encode_text, faulty.clip.encode_images
    poison = faulty.clip.tokenize([captions[boom]])[0][0]

    def text(ids: torch.Tensor) -> torch.Tensor:
        if any(torch.equal(row, poison) for row in ids):
            raise RuntimeError("kernel failed on this row")
        return encode_text(ids)

    marker = torch.from_numpy(np.frombuffer(pixels[nan], np.uint8).copy())

    def images(x: torch.Tensor) -> torch.Tensor:
        out = encode_images(x)
        flat = ((x + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).reshape(len(x), -1)
        for i, row in enumerate(flat):
            if torch.equal(row, marker):
                out[i] = float("nan")
        return out

    faulty.clip.encode_text, faulty.clip.encode_images = text, images
    out = faulty(decoded)
    assert out.schema == clean.schema and out.num_rows == decoded.num_rows
    rows, before = {r["id"]: r for r in out.to_pylist()}, {r["id"]: r for r in clean.to_pylist()}
    assert (rows[boom]["stage"], rows[boom]["error"]) == (
        "embed",
        "RuntimeError: kernel failed on this row",
    )
    assert (rows[nan]["stage"], rows[nan]["error"]) == ("embed", "embedding is not finite")
    for rid, row in rows.items():
        if rid in (boom, nan):
            assert not any(row["image_emb"]) and row["text_tokens"] == []
            continue
        assert (row["stage"], row["error"]) == (before[rid]["stage"], before[rid]["error"])
        np.testing.assert_allclose(row["image_emb"], before[rid]["image_emb"], atol=1e-5)
        np.testing.assert_allclose(row["text_emb"], before[rid]["text_emb"], atol=1e-5)


def test_embedder_slices_in_threads_give_the_same_table(tmp_path) -> None:
    save_tiny_clip(str(tmp_path / "clip"))
    write_bad_folder(str(tmp_path / "in"))
    _, files = sources.detect(str(tmp_path / "in"))
    kept, _ = sources.dedup(sources.index_folder(str(tmp_path / "in"), files).entries)
    decoded = decode_rows(sources.read_unit(sources.make_units(kept, 1000)[0]), 32, 0)
    batch = pa.concat_tables([decoded] * (64 // decoded.num_rows + 1))  # good + bad rows
    threads = torch.get_num_threads()
    try:
        one = Embedder(str(tmp_path / "clip"), threads=1)(batch)
        sliced = Embedder(str(tmp_path / "clip"), threads=3)
        assert sliced.slices == 3
        out = sliced(batch)
    finally:
        torch.set_num_threads(threads)
    assert out.schema == one.schema and out.num_rows == batch.num_rows
    for name in ("id", "caption", "stage", "error", "warning", "text_tokens"):
        assert out[name].to_pylist() == one[name].to_pylist(), name
    for name in ("text_emb", "image_emb"):
        got = np.asarray(out[name].to_pylist(), np.float32)
        want = np.asarray(one[name].to_pylist(), np.float32)
        np.testing.assert_allclose(got, want, atol=1e-5)
        assert np.abs(got).sum() > 0


def test_default_threads_per_actor_share_the_node() -> None:
    from pipelines.embed import _default_threads

    assert _default_threads(1, [2.0], 1.0) == 2  # one actor uses the core decoding leaves
    assert _default_threads(2, [2.0], 0.5) == 1
    assert _default_threads(4, [32.0, 32.0], 4.0) == 16  # 2 actors per node
    assert _default_threads(1, [], 2.0) == 2  # no node information: its reservation
    assert _default_threads(8, [4.0], 1.0) == 1


def test_units_never_span_two_shards(tmp_path) -> None:
    for s in range(2):
        write_tar(
            str(tmp_path / f"{s}.tar"), [(f"{s}{i}", colour_jpeg(i), "c", None) for i in range(3)]
        )
    entries = [e for s in range(2) for e in sources.index_tar(str(tmp_path / f"{s}.tar"))[0]]
    units = sources.make_units(entries, 4)
    assert len(units) == 2
    rows = [r for u in units for r in sources.read_unit(u)]
    assert [r.id for r in rows] == ["00", "01", "02", "10", "11", "12"]
    assert all(r.image == colour_jpeg(int(r.id[1])) for r in rows)
