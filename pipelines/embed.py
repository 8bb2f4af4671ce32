"""``unclip embed``: the incremental Ray Data ETL, images + captions -> embedding table.

The Ray shell around plain functions (docs/formats.md, "Embedding table"; the inputs it
reads are in ``pipelines.sources``):

    driver   index the input (sources), drop duplicate ids and ids already committed
    tasks    read + decode + preprocess each chunk of rows (decode.decode_unit), CPU
    actors   embed text and images with the CLIP loaded once (embedder.Embedder)
    tasks    commit each part atomically: errors table first, then the rows (table.commit_batch)

Because a part is committed whole or not at all and the next run skips committed ids, a
run killed at any point and started again ends with every input row exactly once. One run
at a time per output table: a run holds the table's lease (``pipelines.lease``) from before
it reads the committed ids to its end; a second run exits with one line (or waits,
``--lease-wait``); a killed run's lease is taken over after ``--lease-ttl``.

The errors table ``<output>_errors`` (id, source, stage, error) is a log of distinct
problems:

- stage ``download`` (the input's own tool, img2dataset, could not fetch the image: its
  ``status`` and ``error_message``); these rows never reached this ETL, so they are
  counted apart ("not downloaded") and not against ``--max-error-fraction``;
- stage ``read`` (unreadable file or shard, caption without image, duplicate id: the first
  row in input order is kept), ``decode`` (zero bytes, not an image, a format outside the
  allowlist, truncated, over ``max_pixels`` by its header, any unexpected decoder error),
  ``caption`` (missing, empty, not UTF-8); an unreadable shard counts by rows
  (``sources.index_shard_safe``, ``_merge_shards``);
- a caption longer than the CLIP context is embedded truncated (as CLIP tokenizers do)
  and logged with stage ``caption`` and an error starting with ``warning:``; the summary
  counts it under "truncated".

Failed rows are not in the table, so each run tries them again (a fixed file is picked
up); a problem already logged is not written twice. ``--max-error-fraction`` applies to
the rows this run processed for the first time: failed / (embedded + failed), duplicates
and problems logged by earlier runs left out, so re-running unchanged input never fails.
Above it the job still commits the good rows and the errors, then fails with one line.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from pipelines import sources, table
from pipelines.decode import DEFAULT_MAX_PIXELS, decode_units
from pipelines.embedder import Embedder
from pipelines.lease import DEFAULT_TTL_S, Lease, LeaseHeld, read_lease
from unclip import fs
from unclip.clip_identity import ClipIdentity, looks_like_checkpoint, read_identity
from unclip.errors import UserError
from unclip.schema import (
    DataError,
    check_clip,
    errors_uri,
    parquet_files,
    read_table_info,
    table_schema,
)

MAX_INPUT_BLOCKS = 2000
DECODE_TASK_MEMORY = 2**30  # bytes reserved per decode task (worker + one read unit)
CLIP_CHOICES = (
    "pass --clip with a CLIP checkpoint directory from `unclip train clip` (local path or "
    "s3://), or an open_clip model name such as ViT-B-32, ViT-L-14 or RN50 with "
    "--pretrained TAG or a local weights file (a name without --pretrained is randomly "
    "initialised, for testing only)"
)


class TooManyErrors(UserError):
    """More rows failed than --max-error-fraction allows (the good rows were written)."""

    def __init__(self, message: str, summary: EmbedSummary) -> None:
        super().__init__(message)
        self.summary = summary


@dataclass(frozen=True)
class EmbedOptions:
    input: str
    output: str
    clip: str
    pretrained: str = ""
    batch_size: int = 256  # rows per embedding call
    workers: int = 1  # embedding actors
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0  # Ray CPUs reserved per actor
    # threads per actor (parallel slices of a batch on CPU, see pipelines.embedder);
    # 0 = the CPUs of a node / the actors on it: the actors also use the cores that the
    # decode tasks leave idle (decoding costs about half of what embedding does)
    threads_per_worker: int = 0
    image_size: int = 64  # re-encoded image column resolution; 0 = no image column
    max_error_fraction: float = 0.1
    rows_per_part: int = 0  # rows per committed Parquet part; 0 = 4 x batch_size
    # rows read + decoded per CPU task call: fewer, larger tasks cost less Ray overhead
    # (measured: 4.9 CPU ms/row at 64, 4.1 at 256, 4.0 at 1024 rows) but delay the start
    rows_per_read: int = 256
    max_pixels: int = DEFAULT_MAX_PIXELS  # refuse larger images before decoding
    lease_ttl_s: float = DEFAULT_TTL_S  # a killed run's lease is taken over after this
    lease_wait_s: float = 0.0  # wait this long for another run's lease (0 = exit at once)
    env: tuple[tuple[str, str], ...] = ()  # environment variables for the Ray tasks/actors
    progress: bool = True
    stats: bool = False  # print Ray Data's per-operator stats at the end (benchmarks)

    def check(self) -> None:
        if self.batch_size < 1:
            raise UserError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.workers < 1:
            raise UserError(f"--workers must be at least 1, got {self.workers}")
        if self.cpus_per_worker <= 0:
            raise UserError(f"--cpus-per-worker must be > 0, got {self.cpus_per_worker}")
        if self.threads_per_worker < 0:
            raise UserError(
                f"--threads-per-worker must be >= 0 (0 = automatic), got {self.threads_per_worker}"
            )
        if self.rows_per_read < 1:
            raise UserError(f"--rows-per-read must be at least 1, got {self.rows_per_read}")
        if self.gpus_per_worker < 0:
            raise UserError(f"--gpus-per-worker must be >= 0, got {self.gpus_per_worker}")
        if self.image_size < 0:
            raise UserError(
                f"--image-size must be >= 0 (0 = no image column), got {self.image_size}"
            )
        if not 0.0 <= self.max_error_fraction <= 1.0:
            raise UserError(
                f"--max-error-fraction must be between 0 and 1, got {self.max_error_fraction}"
            )
        if self.lease_ttl_s <= 0:
            raise UserError(f"--lease-ttl must be > 0 seconds, got {self.lease_ttl_s}")
        if self.lease_wait_s < 0:
            raise UserError(f"--lease-wait must be >= 0 seconds, got {self.lease_wait_s}")
        if self.input.rstrip("/") == self.output.rstrip("/"):
            raise UserError("--output must differ from --input")


@dataclass(frozen=True)
class EmbedSummary:
    output: str
    input_rows: int  # rows found in the input (after dropping duplicate ids)
    embedded: int  # rows committed by this run
    skipped: int  # rows already in the table
    failed: int  # rows that failed this run and were not recorded before
    failed_known: int  # rows that failed again as recorded in an earlier run
    duplicates: int  # rows dropped because their id was taken by another row
    truncated: int  # captions cut to the CLIP context (rows embedded, warning recorded)
    not_downloaded: int  # rows the input's tool could not fetch (img2dataset status), new
    parts: int  # Parquet parts committed (table + errors table)
    elapsed_s: float
    first_commit_s: float = 0.0  # until the first part landed (start-up: workers, model load)
    steady_rows_per_s: float = 0.0  # rows/s after the first part

    @property
    def error_fraction(self) -> float:
        """Failed fraction of the rows this run processed for the first time."""
        new = self.embedded + self.failed
        return self.failed / new if new else 0.0

    def line(self) -> str:
        rate = self.embedded / self.elapsed_s if self.elapsed_s > 0 else 0.0
        return (
            f"embedded {self.embedded} rows, skipped {self.skipped} already in the table, "
            f"failed {self.failed} (+{self.failed_known} recorded before), "
            f"{self.duplicates} duplicate id(s), {self.truncated} caption(s) truncated, "
            f"{self.not_downloaded} not downloaded by the input's tool; "
            f"{self.elapsed_s:.1f} s, {rate:.1f} rows/s -> {self.output} "
            f"(errors: {errors_uri(self.output)})"
        )


# ---------------------------------------------------------------------------- CLI
def run(args: argparse.Namespace) -> int:
    """``unclip embed``: run the ETL, print progress and a summary; non-zero on failure."""
    if not args.clip:
        raise UserError(f"--clip is required: {CLIP_CHOICES}")
    opts = EmbedOptions(
        input=args.input,
        output=args.output,
        clip=args.clip,
        pretrained=args.pretrained,
        batch_size=args.batch_size,
        workers=args.workers,
        gpus_per_worker=args.gpus_per_worker,
        cpus_per_worker=args.cpus_per_worker,
        threads_per_worker=args.threads_per_worker,
        rows_per_read=args.rows_per_read,
        image_size=args.image_size,
        max_error_fraction=args.max_error_fraction,
        lease_ttl_s=args.lease_ttl,
        lease_wait_s=args.lease_wait,
    )
    opts.check()
    _refuse_if_leased(opts)  # before starting Ray: a scheduled run that overlaps ends at once
    import ray

    if not ray.is_initialized():
        from infra import local_ray

        local_ray.init(include_dashboard=False, logging_level="warning", log_to_driver=False)
    try:
        summary = run_embed(opts)
    except TooManyErrors as e:
        print(e.summary.line())
        raise
    print(summary.line())
    return 0


def _refuse_if_leased(opts: EmbedOptions) -> None:
    """Raise LeaseHeld if another run holds an unexpired lease on the output and we would
    not wait (``run_embed`` takes the lease itself; this only answers sooner)."""
    if opts.lease_wait_s > 0:
        return
    output = _absolute(opts).output
    if not fs.is_remote(output) and not os.path.isdir(output):
        return
    held = read_lease(output)
    if held is not None and not held.expired():
        raise LeaseHeld(output, held)


# ---------------------------------------------------------------------------- job
def run_embed(opts: EmbedOptions, log: Callable[[str], None] | None = None) -> EmbedSummary:
    """Embed every input row not yet in ``opts.output``; see the module docstring."""
    say = log or _stderr
    opts.check()
    opts = _absolute(opts)
    t0 = time.perf_counter()
    identity, with_meta = _clip_identity(opts)  # refuses a wrong CLIP before any work
    table.check_writable(opts.output)
    lease = Lease(opts.output, opts.lease_ttl_s)
    lease.acquire(opts.lease_wait_s)  # LeaseHeld: one line naming the holder
    try:
        lease.start_heartbeat()
        if lease.took_over is not None:
            say(
                f"embed: took over the expired lease of {lease.took_over.owner} "
                f"(run {lease.took_over.run[:12]}) on {opts.output}"
            )
        try:
            return _run_leased(opts, lease, identity, with_meta, t0, say)
        except Exception:
            lease.check_held()  # a commit task refused (the lease was taken over): one line
            raise
    finally:
        lease.release()


def _run_leased(
    opts: EmbedOptions,
    lease: Lease,
    identity: ClipIdentity,
    with_meta: bool,
    t0: float,
    say: Callable[[str], None],
) -> EmbedSummary:
    """The run itself, under the table's lease (so no other run writes the table)."""
    index = _index_input(opts, say)
    entries, duplicates = sources.dedup(index.entries)
    done = table.committed_ids(opts.output)
    new = table.not_in([e.id for e in entries], done)
    todo = [e for e, n in zip(entries, new, strict=True) if n]
    known = frozenset(table.known_problems(opts.output))
    # temp files of a run that died: no other run can be writing (we hold the lease, which
    # was free or expired), so they are nobody's
    table.remove_stale_temp(opts.output)
    table.remove_stale_temp(errors_uri(opts.output))

    # problems found while indexing (duplicate ids, captions without an image)
    def is_new(p: sources.Problem) -> bool:
        return (p.id, p.stage, p.error) not in known

    index_new = [p for p in index.problems if is_new(p)]
    index_failed = [p for p in index_new if p.stage != "download"]
    not_downloaded = len(index_new) - len(index_failed)
    index_known = [p for p in index.problems if not is_new(p)]
    found = index_new + [p for p in duplicates if is_new(p)]
    if found:
        rows = [tuple(p) for p in found]
        lease.check()
        table.write_part(table.problems_table(rows), errors_uri(opts.output), map(repr, rows))
    say(
        f"embed: {len(entries)} input rows ({index.kind}); {len(entries) - len(todo)} already "
        f"in {opts.output}, {len(todo)} to embed with {identity.model}"
    )
    progress = _Progress(len(todo), t0, say if opts.progress else None)
    if todo:
        for part in _execute(opts, identity, with_meta, todo, known, lease.run, say):
            lease.check()
            progress.add(part)
    c = progress.counts
    elapsed = time.perf_counter() - t0
    summary = EmbedSummary(
        output=opts.output,
        input_rows=len(entries),
        embedded=c["rows"],
        skipped=len(entries) - len(todo),
        failed=c["failed"] + index.rows(index_failed),
        failed_known=c["failed_known"] + index.rows(index_known),
        duplicates=len(duplicates),
        truncated=c["warnings"],
        not_downloaded=not_downloaded,
        parts=c["parts"] + (1 if found else 0),
        elapsed_s=elapsed,
        first_commit_s=progress.first_commit_s,
        steady_rows_per_s=progress.steady_rate(elapsed),
    )
    if summary.error_fraction > opts.max_error_fraction:
        raise TooManyErrors(
            f"{summary.failed} of {summary.embedded + summary.failed} new rows failed "
            f"({summary.error_fraction:.1%}), above --max-error-fraction "
            f"{opts.max_error_fraction:g}; the {summary.embedded} good rows were written, "
            f"see the reasons in {errors_uri(opts.output)}",
            summary,
        )
    return summary


class _Progress:
    """Counts of the committed parts; a progress line at most every ``every_s`` seconds."""

    def __init__(
        self, total: int, t0: float, say: Callable[[str], None] | None, every_s: float = 2.0
    ) -> None:
        self.total, self.t0, self.say, self.every_s = total, t0, say, every_s
        self.counts = {"rows": 0, "failed": 0, "failed_known": 0, "warnings": 0, "parts": 0}
        self.first_commit_s = 0.0
        self.first_rows = 0
        self.last_line = 0.0

    def add(self, part: dict[str, int]) -> None:
        now = time.perf_counter()
        if not self.first_commit_s:
            self.first_commit_s, self.first_rows = now - self.t0, part["rows"]
        for k in self.counts:
            self.counts[k] += part[k]
        c = self.counts
        done = c["rows"] + c["failed"] + c["failed_known"]
        if self.say and (now - self.last_line >= self.every_s or done >= self.total):
            self.last_line = now
            rate = c["rows"] / max(now - self.t0, 1e-9)
            self.say(
                f"embed: {done}/{self.total} rows done, {c['rows']} embedded "
                f"({rate:.1f} rows/s), {c['failed'] + c['failed_known']} failed"
            )

    def steady_rate(self, elapsed: float) -> float:
        """Rows/s after the first committed part (the start-up excluded)."""
        rows = self.counts["rows"] - self.first_rows
        return rows / (elapsed - self.first_commit_s) if elapsed > self.first_commit_s else 0.0


def _absolute(opts: EmbedOptions) -> EmbedOptions:
    """Local paths made absolute: Ray workers need not share the driver's directory."""

    def local(p: str) -> str:
        return p if fs.is_remote(p) else os.path.abspath(p)

    clip = local(opts.clip) if os.path.isdir(opts.clip) else opts.clip
    return dataclasses.replace(opts, input=local(opts.input), output=local(opts.output), clip=clip)


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def load_identity(clip: str, pretrained: str = "") -> ClipIdentity:
    """The identity of ``--clip``: a checkpoint's read without torch (the driver's start),
    an open_clip name's by loading the model (``unclip.clip``, imported only then)."""
    if looks_like_checkpoint(clip):
        return read_identity(clip)
    from unclip.clip import Clip

    return Clip.load(clip, pretrained).identity


def _clip_identity(opts: EmbedOptions) -> tuple[ClipIdentity, bool]:
    """The CLIP's identity, refused before any work if the existing table used another,
    and whether the table has the source metadata columns (new tables do)."""
    identity = load_identity(opts.clip, opts.pretrained)
    if not parquet_files(opts.output):
        return identity, True
    try:
        info = read_table_info(opts.output)
        check_clip(
            info,
            embed_dim=identity.embed_dim,
            fingerprint=identity.fingerprint,
            what=f"--clip {opts.clip!r}",
        )
    except DataError as e:
        raise UserError(f"cannot add to {opts.output}: {e}") from None
    if info.has_image != (opts.image_size > 0):
        have = "has" if info.has_image else "has no"
        raise UserError(
            f"the table at {opts.output} {have} an image column; run with the same "
            "--image-size as before (0 = no image column)"
        )
    # same weights: keep the table's own name for them so every file agrees
    same = dataclasses.replace(identity, model=info.clip_model, pretrained=info.clip_pretrained)
    return same, info.has_source_meta


def _index_input(opts: EmbedOptions, say: Callable[[str], None]) -> sources.InputIndex:
    try:
        kind, files = sources.detect(opts.input)
    except sources.InputError as e:
        raise UserError(str(e)) from None
    if kind == "folder":
        return sources.index_folder(opts.input, files)
    import ray

    remote = ray.remote(sources.index_shard_safe).options(num_cpus=0.5, **_runtime_env(opts))
    shards = ray.get([remote.remote(kind, f) for f in files])
    return _merge_shards(kind, files, shards, say)


def _merge_shards(
    kind: sources.InputKind,
    files: list[str],
    shards: list[sources.ShardIndex],
    say: Callable[[str], None],
) -> sources.InputIndex:
    """One index of the shards. A shard that broke counts for as many rows as it holds
    where that is known, else for the mean row count of the shards read whole (so that
    ``--max-error-fraction`` weighs a lost shard by rows, not as one)."""
    whole = [len(s.entries) + len(s.problems) for s in shards if s.lost_rows == 0]
    estimate = max(1, round(sum(whole) / len(whole))) if whole else 1
    rows_of: dict[tuple[str, str, str], int] = {}
    for uri, s in zip(files, shards, strict=True):
        if s.lost_rows:
            p = s.problems[-1]
            n = s.lost_rows if s.lost_rows > 0 else estimate
            rows_of[(p.id, p.stage, p.error)] = n
            how = "its footer" if s.lost_rows > 0 else "estimated from the shards read whole"
            say(
                f"embed: shard {uri} cannot be read ({p.error}); counted as {n} failed rows ({how})"
            )
    entries = [e for s in shards for e in s.entries]
    problems = [p for s in shards for p in s.problems]
    return sources.InputIndex(kind, tuple(files), entries, problems, rows_of)


def _runtime_env(opts: EmbedOptions) -> dict:
    return {"runtime_env": {"env_vars": dict(opts.env)}} if opts.env else {}


def _actor_cpus(opts: EmbedOptions, cluster_cpus: float, say: Callable[[str], None]) -> float:
    """CPUs reserved per actor, shrunk so that one CPU stays free for the decode tasks
    (else they could never run: on a 2-CPU machine, ``--workers 2`` would hang)."""
    want = opts.cpus_per_worker
    if cluster_cpus and opts.workers * want > cluster_cpus - 1:
        fit = max(cluster_cpus - 1, 0.5) / opts.workers
        if fit < want:
            say(
                f"embed: {opts.workers} actor(s) x {want:g} CPU leave no CPU for decoding on "
                f"this {cluster_cpus:g}-CPU cluster; reserving {fit:.2f} CPU per actor"
            )
            return fit
    return want


def _node_cpus() -> list[float]:
    import ray

    return [n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")]


def _default_threads(workers: int, node_cpus: list[float], actor_cpus: float) -> int:
    """Threads per actor: the CPUs of the largest node / the actors Ray spreads onto it,
    at least the actor's own reserved CPUs (and 1)."""
    nodes = [c for c in node_cpus if c > 0]
    if not nodes:
        return max(1, math.floor(actor_cpus))
    per_node = math.ceil(workers / len(nodes))
    return max(1, math.floor(actor_cpus), math.floor(max(nodes) / per_node))


def _execute(
    opts: EmbedOptions,
    identity: ClipIdentity,
    with_meta: bool,
    todo: list[sources.Entry],
    known: frozenset[tuple[str, str, str]],
    lease_run: str,
    say: Callable[[str], None],
) -> Iterator[dict[str, int]]:
    """The Ray Data pipeline; yields the counts of each committed part as it lands."""
    import ray

    if opts.progress:  # ours, one line every few seconds, instead of Ray Data's bars and logs
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)
    units = sources.make_units(todo, opts.rows_per_read)
    env = _runtime_env(opts)
    blocks = min(len(units), MAX_INPUT_BLOCKS)  # a decode task reads a block's units in turn
    ds = ray.data.from_items([{"unit": u} for u in units], override_num_blocks=blocks)
    ds = ds.map_batches(
        decode_units,
        batch_size=None,
        batch_format="pyarrow",
        fn_kwargs={
            "clip_size": identity.image_size,
            "out_size": opts.image_size,
            "max_pixels": opts.max_pixels,
        },
        num_cpus=1,
        # A memory reservation of its own also keeps Ray Data from fusing decoding into the
        # embedding actors: decoding runs in CPU tasks beside them (and apart from GPUs).
        memory=DECODE_TASK_MEMORY,
        **env,
    )
    cpus = _actor_cpus(opts, ray.cluster_resources().get("CPU", 0.0), say)
    threads = opts.threads_per_worker or _default_threads(opts.workers, _node_cpus(), cpus)
    if opts.gpus_per_worker > 0:  # a node granting a GPU it cannot use ends the run here
        from infra.gpus import check_gpus

        check_gpus(opts.gpus_per_worker, cpus, "an unclip embed worker")
    ds = ds.map_batches(
        Embedder,
        compute=ray.data.ActorPoolStrategy(size=opts.workers),
        batch_size=opts.batch_size,
        batch_format="pyarrow",
        fn_constructor_kwargs={
            "clip": opts.clip,
            "pretrained": opts.pretrained,
            "threads": threads,
            "device": "cuda" if opts.gpus_per_worker > 0 else "cpu",
        },
        num_cpus=cpus,
        num_gpus=opts.gpus_per_worker or None,
        **env,
    )
    ds = ds.map_batches(
        table.commit_parts,
        batch_size=opts.rows_per_part or 4 * opts.batch_size,
        batch_format="pyarrow",
        fn_kwargs={
            "output": opts.output,
            "schema": table_schema(
                identity.embed_dim,
                identity,
                with_image=opts.image_size > 0,
                with_source_meta=with_meta,
            ),
            "known": known,
            "lease_run": lease_run,
        },
        num_cpus=0,  # light; must not wait for a CPU behind the decode tasks
        **env,
    )
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        yield from batch.to_pylist()
    if opts.stats:
        print(ds.stats(), file=sys.stderr)
