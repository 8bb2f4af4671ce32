"""Write the procedural shapes dataset: ``{id}.png`` + ``{id}.txt`` per item, ``attributes.parquet``.

    unclip shapes --out URI [--n N] [--size PX] [--seed S]

The output is a folder, local or ``s3://`` (fsspec), that the embedding ETL reads as a folder
of images with same-named captions. ``attributes.parquet`` has one row per item: id, caption,
colour, shape, size, position, background, and for two-object scenes colour2, shape2, size2,
position2 and relation (null otherwise); its key-value metadata records the generation
parameters. Item i is a function of (seed, i) only, so serial and Ray runs write the same bytes.

Small jobs run in this process; large ones (n > ``RAY_MIN_N``, or ``workers`` > 1) render and
write files from Ray Data tasks (``ray.data.range(n).map_batches``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from unclip.errors import UserError
from unclip.fs import get_fs
from unclip.shapes.attributes import ROW_COLUMNS
from unclip.shapes.render import make_item, png_bytes

DEFAULT_N = 20_000
DEFAULT_SIZE = 64
RAY_MIN_N = 50_000  # above this, generation goes through Ray Data unless workers == 1
BATCH_SIZE = 1_000  # items rendered and written per batch (one Ray task each)
MIN_SIZE, MAX_SIZE = 16, 1024

SCHEMA = pa.schema(
    [("id", pa.string()), ("caption", pa.string())] + [(c, pa.string()) for c in ROW_COLUMNS]
)


@dataclass(frozen=True)
class ShapesSummary:
    """What :func:`make_shapes` wrote; ``engine`` is "local" or "ray"."""

    out: str
    n: int
    size: int
    seed: int
    two_object_scenes: int
    engine: str
    seconds: float

    def line(self) -> str:
        return (
            f"wrote {self.n} shapes images ({self.size}x{self.size} px, seed {self.seed}, "
            f"{self.two_object_scenes} two-object) + captions + attributes.parquet to {self.out} "
            f"in {self.seconds:.1f} s ({self.engine})"
        )


def _join(root: str, name: str) -> str:
    return f"{root.rstrip('/')}/{name}"


def write_items(
    out: str, indices: Iterable[int], size: int, seed: int, two_object_fraction: float
) -> pa.Table:
    """Render items ``indices``, write their .png and .txt into ``out``; return their rows (SCHEMA)."""
    fs, root = get_fs(out)
    files: dict[str, bytes] = {}
    columns: dict[str, list[str | None]] = {name: [] for name in SCHEMA.names}
    for index in indices:
        item = make_item(seed, int(index), size, two_object_fraction)
        files[_join(root, f"{item.id}.png")] = png_bytes(item.image)
        files[_join(root, f"{item.id}.txt")] = item.caption.encode("utf-8")
        columns["id"].append(item.id)
        columns["caption"].append(item.caption)
        for key, value in item.attributes.to_row().items():
            columns[key].append(value)
    fs.pipe(files)  # s3fs uploads a dict of files concurrently
    return pa.table(columns, schema=SCHEMA)


def _write_batch(
    batch: dict[str, np.ndarray], out: str, size: int, seed: int, two_object_fraction: float
) -> pa.Table:
    """Ray Data UDF: batch["id"] holds item indices (from ``ray.data.range``)."""
    return write_items(out, batch["id"].tolist(), size, seed, two_object_fraction)


def _generate_with_ray(
    out: str, n: int, size: int, seed: int, two_object_fraction: float, workers: int | None
) -> pa.Table:
    import ray  # the core library never imports Ray; only this entry point does

    if not ray.is_initialized():
        from infra import local_ray

        local_ray.init()  # joins RAY_ADDRESS if set, else starts a local cluster
    ds = ray.data.range(n, override_num_blocks=max(1, math.ceil(n / BATCH_SIZE)))
    ds = ds.map_batches(
        _write_batch,
        batch_size=BATCH_SIZE,
        batch_format="numpy",
        fn_kwargs={
            "out": out,
            "size": size,
            "seed": seed,
            "two_object_fraction": two_object_fraction,
        },
        compute=ray.data.TaskPoolStrategy(size=workers) if workers else None,
    )
    return pa.concat_tables([t.cast(SCHEMA) for t in ray.get(ds.to_arrow_refs())])


def _generate_locally(
    out: str, n: int, size: int, seed: int, two_object_fraction: float
) -> pa.Table:
    show = sys.stderr.isatty()
    tables = []
    for start in range(0, n, BATCH_SIZE):
        stop = min(n, start + BATCH_SIZE)
        tables.append(write_items(out, range(start, stop), size, seed, two_object_fraction))
        if show:
            print(f"\rshapes: {stop}/{n}", end="", file=sys.stderr, flush=True)
    if show:
        print(file=sys.stderr)
    return pa.concat_tables(tables)


def _check(n: int, size: int, seed: int, two_object_fraction: float, workers: int | None) -> None:
    if n < 1:
        raise UserError(f"n must be >= 1, got {n}")
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise UserError(f"size must be in [{MIN_SIZE}, {MAX_SIZE}] px, got {size}")
    if seed < 0:
        raise UserError(f"seed must be >= 0, got {seed}")
    if not 0.0 <= two_object_fraction <= 1.0:
        raise UserError(f"two_object_fraction must be in [0, 1], got {two_object_fraction}")
    if workers is not None and workers < 1:
        raise UserError(f"workers must be >= 1, got {workers}")


def make_shapes(
    out: str,
    n: int,
    size: int = DEFAULT_SIZE,
    seed: int = 0,
    two_object_fraction: float = 0.0,
    workers: int | None = None,
) -> ShapesSummary:
    """Write ``n`` items of the shapes dataset to folder ``out`` (local path or s3://...).

    workers: None runs in this process up to ``RAY_MIN_N`` items and through Ray Data above;
    1 always runs in this process; k > 1 uses Ray Data with at most k concurrent tasks.
    Re-running with the same arguments rewrites identical files.
    """
    _check(n, size, seed, two_object_fraction, workers)
    fs, root = get_fs(out)
    if fs.isfile(root):
        raise ValueError(f"output {out} exists and is a file, not a folder")
    fs.makedirs(root, exist_ok=True)
    use_ray = workers > 1 if workers is not None else n > RAY_MIN_N
    start = time.perf_counter()
    if use_ray:
        table = _generate_with_ray(out, n, size, seed, two_object_fraction, workers)
    else:
        table = _generate_locally(out, n, size, seed, two_object_fraction)
    table = table.sort_by("id")
    params = {"n": n, "size": size, "seed": seed, "two_object_fraction": two_object_fraction}
    table = table.replace_schema_metadata({"unclip.shapes": json.dumps(params)})
    with fs.open(_join(root, "attributes.parquet"), "wb") as f:
        pq.write_table(table, f)
    two = n - table["relation"].null_count
    return ShapesSummary(
        out, n, size, seed, two, "ray" if use_ray else "local", time.perf_counter() - start
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare ``unclip shapes`` options (for the CLI)."""
    parser.add_argument("--out", required=True, help="output folder, local path or s3://...")
    parser.add_argument("--n", type=int, default=DEFAULT_N, help=f"number of images ({DEFAULT_N})")
    parser.add_argument("--size", type=int, default=DEFAULT_SIZE, help="image side in px (64)")
    parser.add_argument("--seed", type=int, default=0, help="dataset seed (0)")
    parser.add_argument(
        "--two-object-fraction",
        type=float,
        default=0.0,
        help="fraction of two-object scenes ('a red square to the left of a blue circle'), 0",
    )
    parser.add_argument(
        "--workers", type=int, default=None, help="Ray Data tasks (default: Ray above 50k)"
    )


def run(args: argparse.Namespace) -> ShapesSummary:
    """CLI entry: make the dataset from parsed args and print a one-line summary.

    Needs ``args.out``; n, size, seed, two_object_fraction and workers default when absent.
    """

    def arg(name: str, default: object) -> object:
        value = getattr(args, name, None)
        return default if value is None else value

    summary = make_shapes(
        str(args.out),
        n=int(arg("n", DEFAULT_N)),
        size=int(arg("size", DEFAULT_SIZE)),
        seed=int(arg("seed", 0)),
        two_object_fraction=float(arg("two_object_fraction", 0.0)),
        workers=getattr(args, "workers", None),
    )
    print(summary.line())
    return summary
