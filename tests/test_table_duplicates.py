"""Readers of a table holding some ids twice (two ETL runs before the lease): warn once,
use each id once, in training (Ray Data and the in-worker reader) and evaluation."""

from __future__ import annotations

import shutil
import warnings
from collections import Counter

import pytest

from pipelines.evaluate import load_heldout
from tests.tables import write_table
from tests.test_training import tiny
from tests.tiny import save_tiny_clip
from training.cli import plan
from training.data import StageColumns, train_embeddings
from unclip.schema import parquet_files, read_table_info
from unclip.table_ids import DuplicateIdsWarning, find_duplicates


@pytest.fixture(scope="module")
def doubled(tmp_path_factory) -> dict:
    """A 60-row table in 3 files, plus a copy of its second file under another name (as a
    second ETL run with other batching would have written it): 20 ids twice."""
    root = tmp_path_factory.mktemp("dup-table")
    clip = save_tiny_clip(str(root / "clip"))
    table = root / "table"
    ids = write_table(str(table), clip, n=60, image_size=32, files=3)
    files = parquet_files(str(table))
    shutil.copy(files[1], table / "zz-second-run.parquet")
    return {"root": root, "table": str(table), "ids": ids}


def test_duplicates_are_found_per_file(doubled) -> None:
    info = read_table_info(doubled["table"])
    assert info.num_rows == 80
    d = find_duplicates(info.files)
    assert (d.ids, d.extra_rows) == (20, 20)
    assert list(d.drop) == [info.files[-1]] and len(d.drop[info.files[-1]]) == 20
    assert not find_duplicates(info.files[:3])


def test_worker_reader_uses_each_id_once(doubled) -> None:
    files = read_table_info(doubled["table"]).files
    image_emb, _ = train_embeddings(files, 10_000, fraction=0.0)
    assert image_emb.shape[0] == 60
    assert len({row.tobytes() for row in image_emb}) == 60


def test_evaluation_warns_once_and_uses_each_id_once(doubled) -> None:
    with pytest.warns(DuplicateIdsWarning, match="holds 20 id.*20 extra row") as w:
        table = load_heldout(doubled["table"], 1000)
    assert len([x for x in w if issubclass(x.category, DuplicateIdsWarning)]) == 1
    ids = table.column("id").to_pylist()
    assert ids and len(ids) == len(set(ids))


def test_training_warns_once_and_reads_each_id_once(doubled, ray_session) -> None:
    from training.data import read_split

    with pytest.warns(DuplicateIdsWarning) as w:
        job = plan("prior", doubled["table"], str(doubled["root"] / "p"), overrides=tiny("prior"))
    assert len([x for x in w if issubclass(x.category, DuplicateIdsWarning)]) == 1
    cols = StageColumns(("image_emb",))
    got = Counter()
    for split in ("train", "heldout"):
        ds = read_split(job.table, cols, split, 0.2, job.duplicates)
        for b in ds.iter_batches(batch_format="numpy"):
            got.update(row.tobytes() for row in b["image_emb"])
    assert sum(got.values()) == 60 and set(got.values()) == {1}
    # a table without duplicates: no warning, the plain read
    clean = doubled["root"] / "clean"
    shutil.copytree(doubled["table"], clean)
    (clean / "zz-second-run.parquet").unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("error", DuplicateIdsWarning)
        job = plan("prior", str(clean), str(doubled["root"] / "q"), overrides=tiny("prior"))
    assert not job.duplicates
    n = sum(len(b["image_emb"]) for b in read_split(job.table, cols, "train", 0.0).iter_batches())
    assert n == 60


def test_a_batch_holding_the_later_copy_first_keeps_the_earlier_one() -> None:
    """Ray Data may put a later file's rows before the earlier file's in one batch: the copy
    that ``drop`` lists goes, the earlier file's row stays (the id is never lost)."""
    import pyarrow as pa

    from training.data import drop_duplicates

    batch = pa.table(
        {
            "id": ["a", "b", "a", "c", "c"],
            "path": [
                "/t/zz.parquet",
                "/t/zz.parquet",
                "/t/1.parquet",
                "/t/1.parquet",
                "/t/1.parquet",
            ],
            "x": [10, 11, 12, 13, 14],
        }
    )
    got = drop_duplicates(batch, {"/t/zz.parquet": frozenset({"a"})})
    assert got.column_names == ["id", "x"]
    assert got.to_pylist() == [{"id": "b", "x": 11}, {"id": "a", "x": 12}, {"id": "c", "x": 13}]
