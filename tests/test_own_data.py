"""Bringing your own data (docs/own-data.md): img2dataset's webdataset and parquet layouts
into `unclip embed`, clip-retrieval embeddings into `unclip import-embeddings`, each on a
layout written here the way those tools write it, with the faults users meet."""

from __future__ import annotations

import io
import json
import tarfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pipelines import sources
from pipelines.embed import run_embed
from pipelines.import_embeddings import import_clip_retrieval
from pipelines.lease import Lease, LeaseHeld, read_lease
from tests.tables import COLOURS
from tests.test_embed import opts, read_errors, read_rows
from tests.test_training import tiny
from tests.tiny import save_tiny_clip
from unclip.cli import main
from unclip.errors import UserError
from unclip.schema import (
    META_DIM,
    META_FINGERPRINT,
    errors_uri,
    parquet_files,
    read_table_info,
    table_schema,
)


# ---------------------------------------------------------------------------- img2dataset
def photo(i: int, w: int, h: int) -> bytes:
    """A JPEG of w x h: a coloured disc on a gradient (what a resized download looks like)."""
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx * 255 // max(w, 1), yy * 255 // max(h, 1), np.full_like(xx, 90)], -1)
    colour = list(COLOURS.values())[i % len(COLOURS)]
    img[(xx - w / 2) ** 2 + (yy - h / 2) ** 2 < (min(w, h) / 3) ** 2] = colour
    buf = io.BytesIO()
    Image.fromarray(img.astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def sample(i: int, status: str = "success", w: int = 40, h: int = 30) -> dict:
    """One img2dataset row: its metadata (the .json / parquet columns) and image bytes."""
    ok = status == "success"
    return {
        "url": f"https://example.com/img/{i}.jpg",
        "caption": f"a photo number {i}",
        "key": f"{i:09d}",
        "status": status,
        "error_message": None if ok else "HTTP Error 404: Not Found",
        "width": w if ok else None,
        "height": h if ok else None,
        "original_width": 2 * w if ok else None,
        "original_height": 2 * h if ok else None,
        "jpg": photo(i, w, h) if ok else None,
    }


META_FIELDS = [
    ("url", pa.string()),
    ("caption", pa.string()),
    ("key", pa.string()),
    ("status", pa.string()),
    ("error_message", pa.string()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("original_width", pa.int32()),
    ("original_height", pa.int32()),
]


def write_stats(path, rows: list[dict]) -> None:
    ok = sum(r["status"] == "success" for r in rows)
    path.write_text(
        json.dumps(
            {
                "count": len(rows),
                "successes": ok,
                "failed_to_download": len(rows) - ok,
                "failed_to_resize": 0,
                "status_dict": {"success": ok, "HTTP Error 404: Not Found": len(rows) - ok},
            }
        )
    )


def write_webdataset_shard(folder, shard: int, rows: list[dict], drop: tuple = ()) -> None:
    """``NNNNN.tar`` (KEY.jpg, KEY.txt, KEY.json for each success) + ``NNNNN.parquet`` (every
    row's metadata) + ``NNNNN_stats.json``, as img2dataset's webdataset writer does.
    ``drop`` = (key, ext) members left out of the tar (a damaged shard)."""
    name = f"{shard:05d}"
    with tarfile.open(folder / f"{name}.tar", "w") as tf:
        for r in rows:
            if r["status"] != "success":
                continue
            meta = {k: r[k] for k, _ in META_FIELDS}
            members = {
                "jpg": r["jpg"],
                "txt": r["caption"].encode(),
                "json": json.dumps(meta, indent=4).encode(),
            }
            for ext, data in members.items():
                if (r["key"], ext) in drop:
                    continue
                info = tarfile.TarInfo(f"{r['key']}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    schema = pa.schema(META_FIELDS)
    pq.write_table(
        pa.table({k: [r[k] for r in rows] for k, _ in META_FIELDS}, schema=schema),
        folder / f"{name}.parquet",
    )
    write_stats(folder / f"{name}_stats.json", rows)


def write_parquet_shard(folder, shard: int, rows: list[dict]) -> None:
    """img2dataset's parquet output: the metadata columns + ``jpg`` bytes (null if failed)."""
    name = f"{shard:05d}"
    schema = pa.schema([*META_FIELDS, ("jpg", pa.binary())])
    pq.write_table(
        pa.table({k: [r[k] for r in rows] for k in schema.names}, schema=schema),
        folder / f"{name}.parquet",
    )
    write_stats(folder / f"{name}_stats.json", rows)


def test_img2dataset_webdataset_index_reads_status_and_damaged_shards(tmp_path) -> None:
    rows = [sample(0), sample(1, "failed_to_download"), sample(2), sample(3), sample(4)]
    # key 2 lost its caption, key 3 its image, key 4 is missing from the tar altogether
    drop = (("000000002", "txt"), ("000000003", "jpg"))
    drop += tuple(("000000004", e) for e in ("jpg", "txt", "json"))
    write_webdataset_shard(tmp_path, 0, rows, drop)
    kind, files = sources.detect(str(tmp_path))
    assert kind == "tar" and files == [str(tmp_path / "00000.tar")]
    entries, problems = sources.index_tar(files[0])
    assert [e.id for e in entries] == ["000000000", "000000002"]
    assert entries[0].url == "https://example.com/img/0.jpg"
    got = {p.id: (p.stage, p.error) for p in problems}
    assert got["000000001"] == (
        "download",
        "img2dataset status failed_to_download: HTTP Error 404: Not Found",
    )
    assert got["000000003"][0] == "read" and "without an image" in got["000000003"][1]
    assert got["000000004"][0] == "read" and "has no member" in got["000000004"][1]
    assert set(got) == {"000000001", "000000003", "000000004"}
    read = sources.read_unit(sources.make_units(entries, 10)[0])
    assert read[0].url == "https://example.com/img/0.jpg" and read[0].caption == b"a photo number 0"
    assert read[1].problem is not None and read[1].problem.stage == "caption"


def test_img2dataset_parquet_index_sends_failed_rows_to_download_problems(tmp_path) -> None:
    rows = [sample(0), sample(1, "failed_to_resize"), sample(2)]
    write_parquet_shard(tmp_path, 0, rows)
    kind, files = sources.detect(str(tmp_path))
    assert kind == "parquet"
    entries, problems = sources.index_parquet(files[0])
    assert [e.id for e in entries] == ["000000000", "000000002"]
    assert [e.url for e in entries] == [rows[0]["url"], rows[2]["url"]]
    assert [(p.id, p.stage) for p in problems] == [("000000001", "download")]
    assert "failed_to_resize" in problems[0].error and "404" in problems[0].error


def test_img2dataset_layouts_embed_with_metadata_and_nothing_lost(tmp_path, ray_session) -> None:
    save_tiny_clip(str(tmp_path / "clip"))
    shapes = [(40, 30), (30, 44), (64, 64), (80, 20), (25, 50), (50, 50)]
    wds = tmp_path / "wds"
    wds.mkdir()
    shard0 = [sample(i, w=w, h=h) for i, (w, h) in enumerate(shapes)]
    shard0[1] = sample(1, "failed_to_download")
    write_webdataset_shard(wds, 0, shard0, drop=(("000000003", "txt"),))
    write_webdataset_shard(
        wds, 1, [sample(10 + i) for i in range(3)] + [sample(13, "failed_to_download")]
    )
    out = str(tmp_path / "out_wds")
    # 1 row of 8 fails here (12.5%): the 2 failed downloads do not count against the limit
    s = run_embed(opts(str(wds), out, str(tmp_path / "clip"), max_error_fraction=0.2))
    table = read_rows(out)
    errors = {(r["id"], r["stage"]): r["error"] for r in read_errors(out)}
    all_keys = {r["key"] for r in shard0} | {f"{10 + i:09d}" for i in range(4)}
    assert set(table) | {i for i, _ in errors} == all_keys  # every row somewhere, once
    assert not set(table) & {i for i, _ in errors}
    assert errors[("000000001", "download")].endswith("HTTP Error 404: Not Found")
    assert ("000000013", "download") in errors and ("000000003", "caption") in errors
    assert (s.embedded, s.failed, s.not_downloaded) == (7, 1, 2)
    r = table["000000005"]
    assert (r["url"], r["width"], r["height"]) == ("https://example.com/img/5.jpg", 50, 50)
    assert (table["000000003"] if "000000003" in table else table["000000004"])["width"] == 25
    info = read_table_info(out)
    assert info.has_source_meta and info.num_rows == 7
    again = run_embed(opts(str(wds), out, str(tmp_path / "clip"), max_error_fraction=0.2))
    assert (again.embedded, again.skipped, again.not_downloaded) == (0, 7, 0)

    pqdir = tmp_path / "pq"
    pqdir.mkdir()
    write_parquet_shard(pqdir, 0, [sample(0, w=32, h=48), sample(1, "failed_to_download")])
    out = str(tmp_path / "out_pq")
    s = run_embed(opts(str(pqdir), out, str(tmp_path / "clip")))
    table = read_rows(out)
    assert set(table) == {"000000000"} and (s.embedded, s.not_downloaded) == (1, 1)
    assert (table["000000000"]["width"], table["000000000"]["height"]) == (32, 48)
    assert [(r["id"], r["stage"]) for r in read_errors(out)] == [("000000001", "download")]


# ---------------------------------------------------------------------------- clip-retrieval
def write_clip_retrieval(root, shards: list[tuple[np.ndarray, np.ndarray, list]], digits=2):
    """clip-retrieval's inference output: img_emb/img_emb_N.npy, text_emb/text_emb_N.npy,
    metadata/metadata_N.parquet (image_path, caption, url, key) per shard."""
    for sub in ("img_emb", "text_emb", "metadata"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for n, (img, text, captions) in enumerate(shards):
        name = str(n).zfill(digits)
        np.save(root / "img_emb" / f"img_emb_{name}.npy", img)
        np.save(root / "text_emb" / f"text_emb_{name}.npy", text)
        keys = [f"{n}-{i:05d}" for i in range(len(captions))]
        pq.write_table(
            pa.table(
                {
                    "image_path": [f"/data/{k}.jpg" for k in keys],
                    "caption": captions,
                    "url": [f"https://example.com/{k}.jpg" for k in keys],
                    "key": keys,
                }
            ),
            root / "metadata" / f"metadata_{name}.parquet",
        )


def clip_embeddings(clip, captions: list[str], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Image embeddings of rendered discs and text embeddings of the captions, float16 as
    LAION publishes them."""
    rng = np.random.default_rng(seed)
    images = torch.from_numpy(rng.uniform(-1, 1, (len(captions), 3, 32, 32))).float()
    tokens, _ = clip.tokenize(captions)
    with torch.no_grad():
        img = clip.encode_images(images).numpy()
        text = clip.encode_text(tokens).numpy()
    return img.astype(np.float16), text.astype(np.float16)


@pytest.fixture(scope="module")
def retrieval(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("clip-retrieval")
    clip = save_tiny_clip(str(root / "clip"))
    captions = [f"a red disc number {i}" for i in range(40)]
    a = clip_embeddings(clip, captions[:24], 0)
    b = clip_embeddings(clip, captions[24:], 1)
    caps_b = captions[24:]
    caps_b[3] = ""  # an empty caption
    b[0][5] = 0.0  # an image embedding of zeros
    write_clip_retrieval(root / "emb", [(*a, captions[:24]), (*b, caps_b)])
    return {"root": root, "clip": clip, "input": str(root / "emb")}


def test_clip_retrieval_import_writes_schema_v1_and_the_prior_trains(
    retrieval, tmp_path, ray_session, capsys
) -> None:
    out = str(tmp_path / "table")
    clip = str(retrieval["root"] / "clip")
    s = import_clip_retrieval(retrieval["input"], out, clip)
    assert (s.rows, s.written, s.failed, s.shards) == (40, 38, 2, 2)
    info = read_table_info(out)
    assert not info.has_image and info.embed_dim == 32 and info.num_rows == 38
    ident = retrieval["clip"].identity
    assert info.fingerprint == ident.fingerprint
    f = parquet_files(out)[0]
    meta = pq.read_metadata(f)
    assert meta.metadata[META_DIM] == b"32" and meta.metadata[META_FINGERPRINT]
    schema = meta.schema.to_arrow_schema().remove_metadata()
    assert schema.equals(
        table_schema(32, with_image=False, with_source_meta=True).remove_metadata()
    )
    rows = {r["id"]: r for r in pq.read_table(f).to_pylist()} | {
        r["id"]: r for p in parquet_files(out)[1:] for r in pq.read_table(p).to_pylist()
    }
    row = rows["0-00002"]
    assert row["url"] == "https://example.com/0-00002.jpg" and row["source"] == "/data/0-00002.jpg"
    assert abs(np.linalg.norm(row["image_emb"]) - 1) < 1e-5  # float16 re-normalised exactly
    tokens, _ = retrieval["clip"].tokenize([row["caption"]])
    assert row["text_tokens"] == retrieval["clip"].strip_tokens(tokens)[0]
    errors = {
        r["id"]: (r["stage"], r["error"])
        for p in parquet_files(errors_uri(out))
        for r in pq.read_table(p).to_pylist()
    }
    assert errors == {
        "1-00003": ("caption", "missing or empty caption"),
        "1-00005": ("embed", "image embedding is zero or not finite"),
    }
    again = import_clip_retrieval(retrieval["input"], out, clip)
    assert (again.written, again.skipped, again.failed) == (0, 38, 0)

    # the prior trains on it; the decoder refuses it with a message that says why
    cfg = tmp_path / "prior.json"
    cfg.write_text(
        json.dumps(tiny("prior", steps=4, checkpoint_every=4, eval_every=4, batch_size=8))
    )
    args = ["train", "prior", "--data", out, "--out", str(tmp_path / "prior"), "--config", str(cfg)]
    assert main([*args, "--workers", "0"]) == 0
    assert (tmp_path / "prior" / "model.safetensors").exists()
    capsys.readouterr()
    dec = tmp_path / "dec.json"
    dec.write_text(json.dumps(tiny("decoder")))
    args = ["train", "decoder", "--data", out, "--out", str(tmp_path / "d"), "--config", str(dec)]
    assert main([*args, "--workers", "0"]) == 1
    err = capsys.readouterr().err
    assert "no image column" in err and "trains on images" in err and "prior only" in err


def test_clip_retrieval_import_takes_the_tables_lease(retrieval, tmp_path) -> None:
    """A second import (or an embed run) on the same table exits with one line and writes
    nothing; a killed import's lease expires and the next run takes it over."""
    out = tmp_path / "table"
    out.mkdir()
    clip = str(retrieval["root"] / "clip")
    other = Lease(str(out), ttl_s=3600)  # a run that is alive and writing
    other.acquire()
    with pytest.raises(LeaseHeld, match=f"holds the lease on {out}: {other.owner}"):
        import_clip_retrieval(retrieval["input"], str(out), clip)
    assert not parquet_files(str(out)) and not parquet_files(errors_uri(str(out)))
    other.release()
    dead = Lease(str(out), ttl_s=0.01)  # a run that was killed: no heartbeat
    dead.acquire()
    time.sleep(0.05)
    said: list[str] = []
    s = import_clip_retrieval(retrieval["input"], str(out), clip, log=said.append)
    assert s.written == 38 and any(
        f"took over the expired lease of {dead.owner}" in m for m in said
    )
    assert read_lease(str(out)) is None  # released at the end


def test_clip_retrieval_faults_are_refused_before_anything_is_written(
    retrieval, tmp_path, capsys
) -> None:
    clip = str(retrieval["root"] / "clip")
    ok = clip_embeddings(retrieval["clip"], ["a", "b", "c"], 2)

    def layout(name: str, shards) -> str:
        write_clip_retrieval(tmp_path / name, shards)
        return str(tmp_path / name)

    def refused(inp: str, match: str, **kw) -> None:
        out = tmp_path / f"out-{len(list(tmp_path.iterdir()))}"
        with pytest.raises(UserError, match=match):
            import_clip_retrieval(inp, str(out), kw.pop("clip", clip), **kw)
        assert not parquet_files(str(out)) and not parquet_files(errors_uri(str(out)))

    # a dimension mismatch between image and text embeddings, and against the CLIP
    wide = np.ones((3, 64), np.float16) / 8
    refused(layout("dims", [(ok[0], wide, ["a", "b", "c"])]), "dim 64.*embeds to dim 32")
    # a wrong CLIP named: ViT-B-32 embeds to 512 (read from open_clip's config, no weights)
    refused(
        retrieval["input"],
        r"dim 32, but CLIP 'ViT-B-32' embeds to dim 512",
        clip="ViT-B-32",
        pretrained="openai",
    )
    # row counts that disagree within a shard
    refused(layout("rows", [(ok[0][:2], ok[1], ["a", "b", "c"])]), "2 image embeddings, 3 text")
    # a shard without its text embeddings
    inp = layout("missing", [(*ok, ["a", "b", "c"]), (*ok, ["d", "e", "f"])])
    (tmp_path / "missing" / "text_emb" / "text_emb_01.npy").unlink()
    refused(inp, "shard 01 .*lacks text_emb")
    # embeddings that are not unit vectors: refused, or normalised when asked
    big = (ok[0].astype(np.float32) * 3, ok[1], ["a", "b", "c"])
    inp = layout("norms", [big])
    refused(inp, "not L2-normalised.*--renormalize")
    s = import_clip_retrieval(inp, str(tmp_path / "renorm"), clip, renormalize=True)
    assert s.written == 3
    emb = np.array(
        pq.read_table(parquet_files(str(tmp_path / "renorm"))[0]).column("image_emb").to_pylist()
    )
    assert np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        import_clip_retrieval(str(tmp_path / "nowhere"), str(tmp_path / "o"), clip)
    # a table made by `unclip embed` (with images) is not mixed with image-less rows
    from tests.tables import write_table

    write_table(str(tmp_path / "with_images"), retrieval["clip"], n=8, files=1)
    with pytest.raises(UserError, match="has an image column"):
        import_clip_retrieval(retrieval["input"], str(tmp_path / "with_images"), clip)
    # the command line: one line on stderr, exit 1
    capsys.readouterr()
    argv = ["import-embeddings", "--format", "clip-retrieval", "--input", retrieval["input"]]
    argv += ["--output", str(tmp_path / "cli"), "--clip", "ViT-B-32", "--pretrained", "openai"]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "embeds to dim 512" in err[0]


def test_clip_retrieval_import_reads_and_writes_s3(retrieval, s3_bucket) -> None:
    """Shards on S3 are read by ranged reads, the table is written to S3."""
    from unclip import fs

    fs.copy_tree(retrieval["input"], f"{s3_bucket}/laion")
    out = f"{s3_bucket}/table"
    s = import_clip_retrieval(f"{s3_bucket}/laion", out, str(retrieval["root"] / "clip"))
    assert (s.written, s.failed) == (38, 2)
    info = read_table_info(out)
    assert info.num_rows == 38 and not info.has_image
    assert len(parquet_files(errors_uri(out))) == 1
