"""Duplicate ids in an embedding table: readers warn once and use each id once. No Ray.

A table should hold each id once (``unclip embed`` takes a lease on its output so that two
runs never both add the same rows), but a table written before that, merged by hand, or
by another tool may not. Readers then keep the first row of each id in table order (files
sorted by name, rows in file order) and skip the others:

- whole-table readers (evaluation, ``training.data.train_embeddings``) with
  :func:`first_occurrences`, exactly;
- Ray Data readers (training) with :attr:`Duplicates.drop`: the ids whose rows in a file
  are copies of rows of an earlier file. Copies inside one file (``unclip embed`` never
  writes them) are skipped within each batch read.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from unclip import fs


class DuplicateIdsWarning(UserWarning):
    """The table holds some ids more than once; each is used once."""


@dataclass(frozen=True)
class Duplicates:
    ids: int = 0  # ids held by more than one row
    extra_rows: int = 0  # rows beyond the first of each id
    drop: dict[str, frozenset[str]] = field(default_factory=dict)  # file URI -> ids to skip

    def __bool__(self) -> bool:
        return self.extra_rows > 0

    def message(self, uri: str) -> str:
        return (
            f"the table at {uri} holds {self.ids} id(s) more than once ({self.extra_rows} "
            "extra row(s); two `unclip embed` runs on one table?); each id is used once, "
            "its first row in table order"
        )


def find_duplicates(files: Sequence[str]) -> Duplicates:
    """Read the ``id`` column of every file and find the ids held more than once."""
    per_file: list[pa.Array] = []
    for f in files:
        pafs, path = fs.pyarrow_fs(f)
        per_file.append(pq.read_table(path, columns=["id"], filesystem=pafs).column("id"))
    if not per_file:
        return Duplicates()
    all_ids = pa.chunked_array([c for col in per_file for c in col.chunks], pa.string())
    counts = pc.value_counts(all_ids)
    many = pc.filter(counts, pc.greater(counts.field("counts"), 1))
    if len(many) == 0:
        return Duplicates()
    repeated = many.field("values")
    extra = int(pc.sum(many.field("counts")).as_py()) - len(many)
    drop: dict[str, frozenset[str]] = {}
    seen: set[str] = set()
    for f, col in zip(files, per_file, strict=True):
        here = set(pc.filter(col, pc.is_in(col, value_set=repeated)).to_pylist())
        if here & seen:
            drop[f] = frozenset(here & seen)
        seen |= here
    return Duplicates(len(many), extra, drop)


def warn_duplicates(uri: str, dups: Duplicates) -> None:
    """One warning for the table (nothing if it has no duplicates)."""
    if dups:
        warnings.warn(dups.message(uri), DuplicateIdsWarning, stacklevel=2)


def first_occurrences(ids: Iterable[str], seen: set[str]) -> np.ndarray:
    """(N,) bool: True for ids not in ``seen`` and not earlier in ``ids``; adds them to
    ``seen`` (call it on each file in table order to keep each id's first row)."""
    keep = []
    for i in ids:
        keep.append(i not in seen)
        seen.add(i)
    return np.array(keep, dtype=bool)
