"""The embedding ETL on a real local Ray: bad input, incremental runs, S3, the CLI, SIGKILL."""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import open_clip
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.embed import EmbedOptions, TooManyErrors, run_embed
from pipelines.lease import LEASE_NAME, Lease, LeaseHeld
from tests.test_embed_inputs import (
    LONG_CAPTION,
    colour_jpeg,
    write_bad_folder,
    write_good_folder,
    write_tar,
)
from tests.tiny import TINY_CLIP_CFG, save_tiny_clip
from unclip import fs
from unclip.clip import save_clip_checkpoint
from unclip.errors import UserError
from unclip.schema import (
    META_DIM,
    META_FINGERPRINT,
    META_MODEL,
    META_VERSION,
    errors_uri,
    parquet_files,
    read_table_info,
    table_schema,
)


def aws_env() -> tuple[tuple[str, str], ...]:
    """The S3 settings of the test process, for Ray workers started before the S3 fixture."""
    return tuple((k, v) for k, v in sorted(os.environ.items()) if k.startswith("AWS_"))


def opts(inp: str, out: str, clip: str, **kw) -> EmbedOptions:
    kw.setdefault("batch_size", 16)
    kw.setdefault("image_size", 24)
    kw.setdefault("progress", False)
    return EmbedOptions(input=inp, output=out, clip=clip, **kw)


def read_rows(uri: str) -> dict[str, dict]:
    """All committed rows by id (plain pyarrow); fails on a duplicate id."""
    files = parquet_files(uri)
    rows: dict[str, dict] = {}
    for f in files:
        pafs, path = fs.pyarrow_fs(f)
        for r in pq.read_table(path, filesystem=pafs).to_pylist():
            assert r["id"] not in rows, f"duplicate id {r['id']}"
            rows[r["id"]] = r
    return rows


def read_errors(uri: str) -> list[dict]:
    out = []
    for f in parquet_files(errors_uri(uri)):
        pafs, path = fs.pyarrow_fs(f)
        out += pq.read_table(path, filesystem=pafs).to_pylist()
    return out


def check_files(uri: str, dim: int, fingerprint: str) -> None:
    """Every file carries the schema-v1 types and metadata, read with plain pyarrow."""
    files = parquet_files(uri)
    assert files
    for f in files:
        pafs, path = fs.pyarrow_fs(f)
        meta = pq.read_metadata(path, filesystem=pafs)
        kv = meta.metadata
        assert kv[META_VERSION] == b"1" and kv[META_DIM] == str(dim).encode()
        assert kv[META_FINGERPRINT] == fingerprint.encode() and kv[META_MODEL]
        schema = meta.schema.to_arrow_schema()
        assert schema.field("text_emb").type == pa.list_(pa.float32(), dim)
        assert schema.field("image_emb").type == pa.list_(pa.float32(), dim)
        assert schema.field("text_tokens").type == pa.list_(pa.int32())
        want = table_schema(dim, with_source_meta=True)  # url, width, height on new tables
        assert schema.remove_metadata().equals(want.remove_metadata())


def files_of(uri: str) -> set[str]:
    return set(parquet_files(uri)) | set(parquet_files(errors_uri(uri)))


# ---------------------------------------------------------------------------- local
def test_bad_input_errors_table_threshold_and_incremental_reruns(tmp_path, ray_session) -> None:
    clip = save_tiny_clip(str(tmp_path / "clip"))
    inp, out = str(tmp_path / "in"), str(tmp_path / "out")
    expected = write_bad_folder(inp)
    good = {k for k, v in expected.items() if v in ("ok", "warn")}
    bad = {k: v for k, v in expected.items() if v not in ("ok", "warn")}

    # 1. most rows are bad: the job fails loudly, after writing good rows and errors
    with pytest.raises(TooManyErrors, match="above --max-error-fraction 0.1") as e:
        run_embed(opts(inp, out, str(tmp_path / "clip")))
    s = e.value.summary
    assert (s.embedded, s.failed, s.duplicates, s.truncated) == (len(good), len(bad), 1, 1)
    rows = read_rows(out)
    assert set(rows) == good
    check_files(out, 32, clip.identity.fingerprint)
    errors = read_errors(out)
    by_id = {(r["id"], r["stage"]): r["error"] for r in errors}
    for rid, stage in bad.items():
        assert by_id.get((rid, stage)), (rid, stage, by_id)
    assert "decompression bomb" in by_id[("bomb", "decode")]
    assert "not valid UTF-8" in by_id[("latin1", "caption")]
    assert "duplicate id" in by_id[("dup", "read")]
    assert "truncated" in by_id[("long", "caption")]  # a warning: the row is embedded
    assert len(errors) == len(bad) + 2  # + the duplicate + the truncation warning

    # the rows themselves: caption, source, PNG at --image-size, stripped tokens
    long = rows["long"]
    assert long["caption"] == LONG_CAPTION
    assert len(long["text_tokens"]) == clip.identity.context_length  # truncated, full
    tokens, _ = clip.tokenize([rows["good"]["caption"]])
    assert rows["good"]["text_tokens"] == clip.strip_tokens(tokens)[0]
    np.testing.assert_allclose(
        rows["good"]["text_emb"], clip.encode_text(tokens)[0].numpy(), atol=1e-5
    )
    assert rows["dup"]["source"].endswith("dup.jpg")
    assert Image.open(io.BytesIO(rows["alpha"]["image"])).size == (24, 24)
    assert abs(np.linalg.norm(rows["cmyk"]["image_emb"]) - 1) < 1e-5

    # 2. unchanged input: nothing new written; known failures do not fail the job again
    before = files_of(out)
    s = run_embed(opts(inp, out, str(tmp_path / "clip")))
    assert (s.embedded, s.failed, s.skipped) == (0, 0, len(good))
    assert s.failed_known == len(bad)
    assert files_of(out) == before

    # 3. new images arrive and one caption is fixed: only those are embedded
    write_good_folder(inp, 5)
    (tmp_path / "in" / "emptycap.txt").write_text("a red square, now captioned")
    s = run_embed(opts(inp, out, str(tmp_path / "clip")))
    assert (s.embedded, s.failed, s.skipped) == (6, 0, len(good))
    assert set(read_rows(out)) == good | {f"img{i:05d}" for i in range(5)} | {"emptycap"}
    assert len(read_errors(out)) == len(errors)  # nothing recorded twice

    # 4. another CLIP for the same table is refused before any work
    other = tmp_path / "other_clip"
    save_tiny_clip(str(other), seed=1)
    before = files_of(out)
    with pytest.raises(UserError, match="embedded with CLIP .* uses sha256"):
        run_embed(opts(inp, out, str(other)))
    cfg = {**TINY_CLIP_CFG, "embed_dim": 16}
    save_clip_checkpoint(str(tmp_path / "clip16"), open_clip.model.CLIP(**cfg), cfg)
    with pytest.raises(UserError, match="dim 32.*size 16"):
        run_embed(opts(inp, out, str(tmp_path / "clip16")))
    with pytest.raises(UserError, match="has an image column"):
        run_embed(opts(inp, out, str(tmp_path / "clip"), image_size=0))
    assert files_of(out) == before
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    pq.write_table(pa.table({"x": [1]}), foreign / "data.parquet")
    with pytest.raises(UserError, match="cannot add to .*not an unclip embedding table"):
        run_embed(opts(inp, str(foreign), str(tmp_path / "clip")))
    info = read_table_info(out)
    assert info.num_rows == len(good) + 6 and info.has_image


def test_webdataset_shards_and_parquet_inputs(tmp_path, ray_session) -> None:
    save_tiny_clip(str(tmp_path / "clip"))
    shards = tmp_path / "shards"
    shards.mkdir()
    write_tar(
        str(shards / "00000.tar"),
        [(f"{i:09d}", colour_jpeg(i), f"caption {i}", f"k{i}") for i in range(6)],
    )
    write_tar(
        str(shards / "00001.tar"),
        [
            ("000000100", colour_jpeg(7), "seven", "k7"),
            ("000000101", colour_jpeg(8), "eight", "k0"),  # id k0 again: a duplicate
            ("000000102", colour_jpeg(9), None, "k9"),  # no caption
            ("000000103", b"\xff\xd8 not a jpeg", "broken", None),
        ],
    )
    # img2dataset's status table beside the shard: every key it lists is in the shard
    status = pa.table({"key": [f"k{i}" for i in range(6)], "status": ["success"] * 6})
    pq.write_table(status, shards / "00000.parquet")
    out = str(tmp_path / "out_tar")
    s = run_embed(opts(str(shards), out, str(tmp_path / "clip"), max_error_fraction=0.5))
    assert set(read_rows(out)) == {f"k{i}" for i in range(6)} | {"k7"}
    assert (s.failed, s.duplicates) == (2, 1)
    errs = {(r["id"], r["stage"]) for r in read_errors(out)}
    assert errs == {("k0", "read"), ("k9", "caption"), ("000000103", "decode")}
    assert read_rows(out)["k7"]["source"] == f"{shards}/00001.tar#000000100.jpg"

    pqdir = tmp_path / "pq"
    (pqdir / "imgs").mkdir(parents=True)
    for i in range(3):
        (pqdir / "imgs" / f"{i}.jpg").write_bytes(colour_jpeg(i))
    pq.write_table(
        pa.table(
            {"caption": ["zero", "one", "two"], "image_path": [f"imgs/{i}.jpg" for i in range(3)]}
        ),
        pqdir / "paths.parquet",
    )
    pq.write_table(
        pa.table(
            {
                "id": ["b0", "b1"],
                "caption": ["red", "blue"],
                "image": [colour_jpeg(4), colour_jpeg(5)],
            }
        ),
        pqdir / "bytes.parquet",
        row_group_size=1,
    )
    out = str(tmp_path / "out_pq")
    lines: list[str] = []  # two actors on 2 CPUs: their reservation shrinks to fit
    s = run_embed(
        opts(str(pqdir), out, str(tmp_path / "clip"), image_size=0, workers=2), lines.append
    )
    assert any("reserving 0.50 CPU per actor" in line for line in lines)
    rows = read_rows(out)
    assert s.embedded == 5 and {"b0", "b1"} <= set(rows) and "image" not in rows["b0"]
    assert rows["b1"]["caption"] == "blue"
    assert {r["source"] for r in rows.values()} >= {str(pqdir / "imgs" / "0.jpg")}


def test_a_run_refuses_a_table_another_run_holds_and_takes_over_a_dead_runs_lease(
    tmp_path, ray_session
) -> None:
    save_tiny_clip(str(tmp_path / "clip"))
    inp, out = str(tmp_path / "in"), tmp_path / "out"
    ids = set(write_good_folder(inp, 6))
    out.mkdir()
    other = Lease(str(out), ttl_s=3600)  # another run, alive (it would renew its lease)
    other.acquire()
    their_temp = out / "_tmp-part-0123.parquet-abcd"  # the part it is writing right now
    their_temp.write_bytes(b"PAR1 half")
    with pytest.raises(LeaseHeld, match=f"holds the lease on {out}: {other.owner}"):
        run_embed(opts(inp, str(out), str(tmp_path / "clip")))
    assert not parquet_files(str(out)) and their_temp.exists()  # nothing written or removed
    other.release()

    # a run that was killed: its lease expires (no heartbeat), the next run takes it over
    dead = Lease(str(out), ttl_s=0.01)
    dead.acquire()
    time.sleep(0.05)
    said: list[str] = []
    s = run_embed(opts(inp, str(out), str(tmp_path / "clip")), log=said.append)
    assert s.embedded == len(ids) and set(read_rows(str(out))) == ids
    assert any(f"took over the expired lease of {dead.owner}" in m for m in said)
    assert not their_temp.exists()  # the dead run's temp file is nobody's now
    assert not (out / LEASE_NAME).exists()  # released at the end


def test_an_unreadable_shard_counts_by_rows_against_the_error_fraction(
    tmp_path, ray_session
) -> None:
    save_tiny_clip(str(tmp_path / "clip"))
    shards = tmp_path / "shards"
    shards.mkdir()
    for k in range(2):
        samples = [(f"{k}{i:04d}", colour_jpeg(i), f"c{i}", None) for i in range(10)]
        write_tar(str(shards / f"0000{k}.tar"), samples)
    (shards / "00002.tar").write_bytes(b"\x00garbage" * 64)  # a failed upload
    out = str(tmp_path / "out")
    with pytest.raises(TooManyErrors, match="10 of 30 new rows failed") as e:
        run_embed(opts(str(shards), out, str(tmp_path / "clip")))
    assert e.value.summary.embedded == 20 and len(read_rows(out)) == 20
    (err,) = read_errors(out)
    assert err["source"] == str(shards / "00002.tar") and err["stage"] == "read"
    assert err["error"].startswith("cannot read shard: ReadError")
    # recorded once: a re-run of the unchanged input neither fails nor records it again
    s = run_embed(opts(str(shards), out, str(tmp_path / "clip")))
    assert (s.failed, s.failed_known, s.skipped) == (0, 10, 20)


# ---------------------------------------------------------------------------- S3
def test_s3_folder_in_s3_table_out_and_incremental(tmp_path, s3_bucket, ray_session) -> None:
    clip = save_tiny_clip(f"{s3_bucket}/clip")
    local = tmp_path / "in"
    write_good_folder(str(local), 12)
    expected = write_bad_folder(str(tmp_path / "bad"))
    for p in ("bad/truncated.jpg", "bad/truncated.txt", "bad/exif.jpg", "bad/exif.txt"):
        shutil.copy(tmp_path / p, local / os.path.basename(p))
    fs.copy_tree(str(local), f"{s3_bucket}/in")
    out = f"{s3_bucket}/table"
    o = opts(f"{s3_bucket}/in", out, f"{s3_bucket}/clip", env=aws_env(), max_error_fraction=0.2)
    s = run_embed(o)
    assert (s.embedded, s.failed) == (13, 1)
    rows = read_rows(out)
    assert set(rows) == {f"img{i:05d}" for i in range(12)} | {"exif"}
    assert rows["exif"]["source"] == f"{s3_bucket}/in/exif.jpg"
    check_files(out, 32, clip.identity.fingerprint)
    assert [r["stage"] for r in read_errors(out)] == ["decode"]
    assert expected["truncated"] == "decode"

    # an incremental re-run on S3 writes nothing new
    before = files_of(out)
    assert run_embed(o).embedded == 0 and files_of(out) == before


@pytest.mark.slow
def test_s3_webdataset_shards_read_with_ranged_gets(tmp_path, s3_bucket, ray_session) -> None:
    save_tiny_clip(f"{s3_bucket}/clip")
    samples = [(f"{i:03d}", colour_jpeg(i), f"c{i}", None) for i in range(5)]
    write_tar(str(tmp_path / "a.tar"), samples)
    fs.write_bytes(f"{s3_bucket}/shards/a.tar", (tmp_path / "a.tar").read_bytes())
    o = opts(f"{s3_bucket}/shards", f"{s3_bucket}/t2", f"{s3_bucket}/clip", env=aws_env())
    assert run_embed(o).embedded == 5
    assert set(read_rows(f"{s3_bucket}/t2")) == {f"{i:03d}" for i in range(5)}


def test_s3_table_lease_refuses_a_second_run(tmp_path, s3_bucket, ray_session) -> None:
    save_tiny_clip(f"{s3_bucket}/clip")
    write_good_folder(str(tmp_path / "in"), 4)
    out = f"{s3_bucket}/leased"
    o = opts(str(tmp_path / "in"), out, f"{s3_bucket}/clip", env=aws_env())
    other = Lease(out, ttl_s=3600)
    other.acquire()
    with pytest.raises(LeaseHeld, match=f"holds the lease on {out}"):
        run_embed(o)
    assert not parquet_files(out)
    other.release()
    assert run_embed(o).embedded == 4
    assert not fs.exists(fs.join(out, LEASE_NAME))


# ---------------------------------------------------------------------------- CLI
def unclip_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "unclip.cli", "embed", *args]  # exactly what users run


def cli_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["PYTHONPATH"] = os.getcwd()
    return env


def test_cli_without_clip_names_the_choices(tmp_path) -> None:
    out = subprocess.run(
        unclip_cmd("--input", str(tmp_path), "--output", str(tmp_path / "o")),
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=120,
    )
    assert out.returncode == 1 and "Traceback" not in out.stderr
    line = out.stderr.strip()
    assert len(line.splitlines()) == 1 and "--clip is required" in line
    assert "unclip train clip" in line and "ViT-B-32" in line and "--pretrained" in line


@pytest.mark.slow
@pytest.mark.extended
def test_cli_fails_loudly_above_the_error_fraction(tmp_path) -> None:
    save_tiny_clip(str(tmp_path / "clip"))
    write_bad_folder(str(tmp_path / "in"))
    out = subprocess.run(
        unclip_cmd(
            "--input",
            str(tmp_path / "in"),
            "--output",
            str(tmp_path / "out"),
            "--clip",
            str(tmp_path / "clip"),
            "--batch-size",
            "8",
        ),
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=600,
    )
    assert out.returncode == 1, out.stderr
    assert "above --max-error-fraction 0.1" in out.stderr and "Traceback" not in out.stderr
    assert "embedded 10 rows" in out.stdout
    assert len(read_rows(str(tmp_path / "out"))) == 10 and read_errors(str(tmp_path / "out"))


def ray_pids() -> set[int]:
    """Ray processes (GCS, raylet, workers) started from this worktree's code."""
    mark = f"PYTHONPATH={os.getcwd()}".encode()
    pids = set()
    for name in os.listdir("/proc"):
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmd = f.read()
            with open(f"/proc/{name}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            continue
        if (b"ray" in cmd) and mark in env:
            pids.add(int(name))
    return pids


@pytest.mark.slow
def test_sigkill_half_way_then_rerun_gives_every_row_exactly_once(tmp_path) -> None:
    save_tiny_clip(str(tmp_path / "clip"))
    ids = set(write_good_folder(str(tmp_path / "in"), 1500, size=24))
    out = tmp_path / "out"
    args = unclip_cmd(
        "--input",
        str(tmp_path / "in"),
        "--output",
        str(out),
        "--clip",
        str(tmp_path / "clip"),
        "--batch-size",
        "16",
        "--lease-ttl",
        "5",
    )
    before = ray_pids()
    proc = subprocess.Popen(
        args,
        env=cli_env(),
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            if len(parquet_files(str(out))) >= 3:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray it started
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    # Ray's workers have process groups of their own: they exit when their raylet is gone,
    # and one may still commit the part it was writing (whole) before it notices
    deadline = time.monotonic() + 60
    while ray_pids() - before and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not ray_pids() - before, "processes of the killed run are left"
    done = read_rows(str(out))  # committed parts only, none partial, no duplicate
    assert 0 < len(done) < len(ids)
    # the killed run's lease is left behind: the rerun waits for it to expire, then takes it
    rerun = subprocess.run(
        [*args, "--lease-wait", "300"], capture_output=True, text=True, env=cli_env(), timeout=600
    )
    assert rerun.returncode == 0, rerun.stderr
    assert f"embedded {len(ids) - len(done)} rows, skipped {len(done)} already" in rerun.stdout
    final = read_rows(str(out))  # raises on any duplicate id
    assert set(final) == ids
    assert not [n for n in os.listdir(out) if n.startswith("_tmp-")]


@pytest.mark.slow
def test_two_cli_runs_on_one_table_never_double_rows(tmp_path) -> None:
    """A scheduled run and a manual one with other batching (the issue's case: before the
    lease both embedded everything, 2x the rows)."""
    save_tiny_clip(str(tmp_path / "clip"))
    ids = set(write_good_folder(str(tmp_path / "in"), 1500, size=24))
    out = tmp_path / "out"
    base = unclip_cmd(
        "--input", str(tmp_path / "in"), "--output", str(out), "--clip", str(tmp_path / "clip")
    )
    first = subprocess.Popen(
        [*base, "--batch-size", "16"],
        env=cli_env(),
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 300
        while not (out / LEASE_NAME).exists() and first.poll() is None:
            assert time.monotonic() < deadline, "the first run never took the lease"
            time.sleep(0.05)
        second = subprocess.run(
            [*base, "--rows-per-read", "200", "--batch-size", "50"],
            capture_output=True,
            text=True,
            env=cli_env(),
            timeout=600,
        )
        first_alive = first.poll() is None
        stdout, stderr = first.communicate(timeout=900)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert first.returncode == 0, stderr
    assert first_alive, "the first run ended before the second started: nothing was tested"
    assert second.returncode == 1 and "Traceback" not in second.stderr
    line = second.stderr.strip()
    assert len(line.splitlines()) == 1 and "another `unclip embed` run holds the lease" in line
    assert f"embedded {len(ids)} rows" in stdout
    assert set(read_rows(str(out))) == ids  # raises on any duplicate id
    assert not (out / LEASE_NAME).exists()


@pytest.mark.slow
def test_an_open_clip_model_name_works(tmp_path, ray_session) -> None:
    write_good_folder(str(tmp_path / "in"), 2)
    with pytest.warns(UserWarning, match="randomly initialised"):
        s = run_embed(opts(str(tmp_path / "in"), str(tmp_path / "out"), "RN50", batch_size=2))
    assert s.embedded == 2
    info = read_table_info(str(tmp_path / "out"))
    assert (info.clip_model, info.embed_dim, info.fingerprint) == ("RN50", 1024, "RN50/random")
