"""``unclip train {clip,prior,decoder,upsampler}``: the Ray Train driver.

    unclip train decoder --data work/table --out work/decoder [--preset quick|full]
        [--config FILE] [--steps N] [--workers N] [--gpu] [--resume] [--storage URI]

The driver resolves the stage config (preset <- ``--config`` <- ``--steps``), checks the
table against it (CLIP identity, embedding size, image column) *before* any worker starts,
runs a ``TorchTrainer`` over the table (``training.harness.train_loop``), and copies the
final stage checkpoint to ``--out``.

Runs live in ``<storage>/<basename of --out>.run/`` (``--storage`` defaults to the folder of
``--out``): Ray Train's checkpoints (``checkpoint_<step>/``), ``metrics.jsonl`` and sample
grids. A lost worker resumes from the last checkpoint (``FailureConfig``); after a driver
crash, the same command with ``--resume`` continues the run from its last checkpoint with
its saved configs (Ray Train V2 restores a run from the same storage path and name).
``clip`` is dispatched to ``training.clip:run``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import time
from dataclasses import dataclass, field, replace
from typing import Any

from training import priority
from training.data import StageColumns, read_split, table_clip
from training.harness import TRAIN_CONFIG, LoopConfig, load_clip, train_loop
from training.presets import (
    TrainConfig,
    explicit_keys,
    load_config_file,
    resolve,
    split_overrides,
    train_config_from_dict,
    with_steps,
)
from training.runs import latest_checkpoint, refuse_existing_run, run_location
from training.scale import check_parallel
from training.stages import stage_for
from unclip import fs
from unclip.config import (
    ARPriorConfig,
    ARPriorNetConfig,
    ClipRef,
    PriorConfig,
    StageConfig,
    UpsamplerConfig,
    to_dict,
)
from unclip.errors import UserError
from unclip.schema import DataError, TableInfo, check_clip, read_table_info
from unclip.table_ids import Duplicates, find_duplicates, warn_duplicates

SUMMARY = "training.json"  # beside the final checkpoint: steps done / planned, stopped early


@dataclass(frozen=True)
class TrainJob:
    """A fully resolved training run, ready to execute."""

    stage: StageConfig
    run: TrainConfig
    table: TableInfo
    out: str
    storage: str  # RunConfig.storage_path, as a URI
    name: str  # RunConfig.name
    workers: int = 1  # 0 = in-process local mode (no fault tolerance, nothing persisted)
    gpu: bool = False
    resume_step: int = 0  # the checkpoint step a --resume continues from
    duplicates: Duplicates = field(default_factory=Duplicates)  # ids the table holds more than once

    @property
    def run_dir(self) -> str:
        return fs.join(self.storage, self.name)


@dataclass(frozen=True)
class TrainOutcome:
    step: int
    out: str
    metrics: dict[str, Any]


# ---------------------------------------------------------------------- entry point
def run(args: argparse.Namespace) -> int:
    if args.stage == "clip":
        return int(importlib.import_module("training.clip").run(args) or 0)
    try:
        job = plan(
            args.stage,
            data=args.data,
            out=args.out,
            preset_name=args.preset,
            config=args.config,
            steps=args.steps,
            workers=args.workers,
            gpu=args.gpu,
            resume=args.resume,
            storage=args.storage,
        )
        job = fit_cache(job)
        describe(job)
        outcome = execute(job)
    except DataError as e:
        raise UserError(str(e)) from None
    print(f"[{job.stage.stage}] final checkpoint (step {outcome.step}) written to {outcome.out}")
    return 0


# ---------------------------------------------------------------------- planning
def plan(
    stage: str,
    data: str,
    out: str,
    preset_name: str = "quick",
    config: str | None = None,
    steps: int | None = None,
    workers: int = 1,
    gpu: bool = False,
    resume: bool = False,
    storage: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> TrainJob:
    """Resolve configs and paths and check the data; starts nothing.

    ``overrides`` (a config file's contents as a dict) may be given instead of ``config``.
    """
    if workers < 0:
        raise UserError(f"--workers must be >= 0, got {workers}")
    if workers == 0 and resume:
        raise UserError("--resume needs --workers >= 1 (--workers 0 keeps no run checkpoints)")
    out = out.rstrip("/")
    storage_uri, name = run_location(out, storage)
    run_dir = fs.join(storage_uri, name)
    latest = latest_checkpoint(run_dir)
    info = read_table_info(data)
    dups = find_duplicates(info.files)
    warn_duplicates(data, dups)

    if resume:
        if latest is None:
            raise UserError(f"nothing to resume: no checkpoint in {run_dir}; run without --resume")
        step, ckpt = latest
        from unclip.checkpoint import load_stage_config

        cfg = load_stage_config(ckpt)
        run_cfg = train_config_from_dict(json.loads(fs.read_text(fs.join(ckpt, TRAIN_CONFIG))))
        if steps is not None:
            run_cfg = with_steps(run_cfg, steps)
        if cfg.stage != stage:
            raise UserError(f"the run in {run_dir} trains a {cfg.stage}, not a {stage}")
        cfg = bind_to_table(cfg, info, explicit=None)
        check_parallel(run_cfg, torch_device(gpu))
        return TrainJob(cfg, run_cfg, info, out, storage_uri, name, workers, gpu, step, dups)

    refuse_existing_run(run_dir, out, latest)
    where = config or "config"
    if overrides is None:
        overrides = load_config_file(config) if config else {}
    cfg, run_cfg = resolve(stage, preset_name, gpu, overrides, steps, where)
    stage_over, _ = split_overrides(stage, overrides, where)
    cfg = bind_to_table(cfg, info, explicit=explicit_keys(stage_over))
    check_parallel(run_cfg, torch_device(gpu))
    return TrainJob(cfg, run_cfg, info, out, storage_uri, name, workers, gpu, 0, dups)


def torch_device(gpu: bool) -> Any:
    """The device type the workers will train on (for checks before they start)."""
    import torch

    return torch.device("cuda" if gpu else "cpu")


def bind_to_table(cfg: StageConfig, info: TableInfo, explicit: set[str] | None) -> StageConfig:
    cfg = _bind_clip(cfg, info, explicit)
    if "image" in stage_for(cfg).columns().columns and not info.has_image:
        raise DataError(
            f"the table has no image column; the {cfg.stage} trains on images, so embed the "
            "images themselves with an image column (`unclip embed --image-size N`); a table "
            "of precomputed embeddings (`unclip import-embeddings`) can train the prior only"
        )
    return cfg


def _bind_clip(cfg: StageConfig, info: TableInfo, explicit: set[str] | None) -> StageConfig:
    """Fit the stage config to the table's CLIP, or refuse a table that does not fit.

    Embedding size and text width set explicitly (``explicit``: dotted keys a config file
    set; None = everything, e.g. a resumed run's saved config) must match the table; preset
    values adapt to it. ``clip.*`` values given must match the table's CLIP; the ClipRef
    saved with the model always records the table's CLIP.
    """
    if isinstance(cfg, UpsamplerConfig):
        return cfg  # images only: no CLIP involved
    ref = table_clip(info)

    def given(key: str) -> bool:
        return explicit is None or key in explicit

    dim_attr = "embed_dim" if isinstance(cfg, PriorConfig | ARPriorConfig) else "clip_dim"
    net = cfg.net
    if given(f"net.{dim_attr}"):
        check_clip(info, embed_dim=getattr(net, dim_attr), what=f"the {cfg.stage} config")
    else:
        fit: dict[str, int] = {dim_attr: ref.embed_dim}
        if isinstance(net, ARPriorNetConfig) and not given("net.pca_dims"):
            fit["pca_dims"] = min(net.pca_dims, ref.embed_dim)  # a smaller CLIP keeps fewer
        net = replace(net, **fit)
    if net.text_width:
        if given("net.text_width"):
            if net.text_width != ref.text_width:
                raise DataError(
                    f"the {cfg.stage} config reads CLIP text states of width "
                    f"{net.text_width}, but the table's CLIP {ref.model!r} has text width "
                    f"{ref.text_width}; embed with the same CLIP or set net.text_width"
                )
        else:
            net = replace(net, text_width=ref.text_width)
        if ref.context_length and not given("net.max_text_len"):
            net = replace(net, max_text_len=min(net.max_text_len, ref.context_length))
    for key in ("model", "pretrained", "fingerprint", "embed_dim"):
        mine, theirs = getattr(cfg.clip, key), getattr(ref, key)
        if given(f"clip.{key}") and mine and theirs and mine != theirs:
            raise DataError(
                f"the table was embedded with CLIP {ref.model!r} ({key} {theirs!r}) but the "
                f"{cfg.stage} config expects {key} {mine!r}; embed the data with the same CLIP"
            )
    check_clip(info, embed_dim=ref.embed_dim, fingerprint=cfg.clip.fingerprint or "")
    cfg = replace(cfg, net=net, clip=ClipRef(**to_dict(ref)))
    return cfg


def memory_budget() -> int:
    """Bytes a node may spend on cached training data: a quarter of its memory."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    except (ValueError, OSError, AttributeError):  # not POSIX: a quarter of an assumed 8 GiB
        return 2 * 1024**3


def split_bytes(job: TrainJob) -> int:
    """Decoded size of the training split (all workers): what ``cache_data`` holds."""
    columns = stage_for(job.stage).columns()
    per_row = 0
    for name in columns.columns:
        if name == "image":
            per_row += 3 * columns.image_size**2
        elif name in ("text_emb", "image_emb"):
            per_row += 4 * job.table.embed_dim
        elif name == "text_tokens":
            per_row += 4 * columns.context_length
    return int(job.table.num_rows * (1 - job.run.heldout_fraction) * per_row)


def fit_cache(job: TrainJob, budget: int | None = None) -> TrainJob:
    """The job with ``cache_data`` off if the decoded split would not fit in memory."""
    if not job.run.cache_data:
        return job
    need, budget = split_bytes(job), memory_budget() if budget is None else budget
    if need <= budget:
        return job
    print(
        f"[{job.stage.stage}] the decoded training split (~{need / 1e9:.1f} GB) exceeds the "
        f"in-memory budget ({budget / 1e9:.1f} GB, a quarter of this node's memory): "
        "streaming it through Ray Data instead of caching it (train.cache_data)",
        flush=True,
    )
    return replace(job, run=replace(job.run, cache_data=False))


def describe(job: TrainJob) -> None:
    cfg, run = job.stage, job.run
    from unclip.models import build_model, count_parameters

    params = count_parameters(build_model(cfg))
    what = f"resuming from step {job.resume_step}" if job.resume_step else "new run"
    limit = f", time limit {run.time_limit_minutes:g} min" if run.time_limit_minutes else ""
    print(
        f"[{cfg.stage}] {what}: {params / 1e6:.2f}M parameters, {run.steps} steps of "
        f"batch {run.batch_size} x {max(1, job.workers)} worker(s){limit}; table "
        f"{job.table.num_rows} rows (CLIP {job.table.clip_model!r}); run dir {job.run_dir}",
        flush=True,
    )


# ---------------------------------------------------------------------- execution
def execute(job: TrainJob) -> TrainOutcome:
    """Run the TorchTrainer for a planned job and copy the final checkpoint to ``job.out``."""
    import ray
    import ray.train
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    stage = stage_for(job.stage)
    if stage.needs_clip():
        load_clip(stage, "cpu")  # refuse a missing or changed CLIP before workers start
    if not ray.is_initialized():
        from infra import local_ray

        local_ray.init(configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    columns: StageColumns = stage.columns()
    frac = job.run.heldout_fraction
    train = read_split(job.table, columns, "train", frac, job.duplicates)
    datasets = {
        "train": train,
        "heldout": _in_file_order(read_split(job.table, columns, "heldout", frac, job.duplicates)),
    }
    resources = _worker_resources(job)
    if job.gpu and job.workers > 0:  # a node granting a GPU it cannot use ends the run here
        from infra.gpus import check_gpus

        check_gpus(1, (resources or {}).get("CPU", 1.0), "a Ray Train worker")
    storage_fs, storage_path = fs.pyarrow_fs(job.storage)
    fs.makedirs(job.run_dir)
    loop = LoopConfig(
        job.stage, job.run, job.run_dir, local_mode=job.workers == 0, data_files=job.table.files
    )
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop.to_dict(),
        torch_config=TorchConfig(backend="nccl" if job.gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=job.workers,
            use_gpu=job.gpu,
            resources_per_worker=resources,
        ),
        run_config=RunConfig(
            name=job.name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            failure_config=FailureConfig(max_failures=job.run.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=job.run.keep_checkpoints),
        ),
        datasets=datasets,
        # one worker reads the whole table itself: no split coordinator between it and the data
        dataset_config=DataConfig(datasets_to_split=["train"] if job.workers > 1 else []),
    )
    t0 = time.perf_counter()
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as e:
        raise UserError(
            f"training failed: {_last_line(e)}; run directory {job.run_dir} "
            "(rerun with --resume to continue from its last checkpoint)"
        ) from None
    finally:
        priority.restore_session()  # the workers quieted the session (training.priority)
    metrics = dict(result.metrics or {})  # those of the latest checkpoint
    summary = dict(result.return_value or {})  # rank 0's return value of train_loop
    if "diverged" in summary:
        raise UserError(summary["diverged"])
    if result.checkpoint is None:
        raise UserError(f"the run in {job.run_dir} ended without a checkpoint")
    copy_checkpoint(result.checkpoint, job.out)
    if job.workers == 0:  # local mode keeps its last checkpoint in a temp dir
        import shutil

        shutil.rmtree(result.checkpoint.path, ignore_errors=True)
    step = int(summary.get("step", metrics.get("step", 0)))
    minutes = (time.perf_counter() - t0) / 60
    report = training_summary(job, step, minutes, summary)
    fs.write_text(fs.join(job.out, SUMMARY), json.dumps(report, indent=2))
    early = ""
    if report["stopped_early"]:
        early = f" -- STOPPED EARLY at step {step} of {job.run.steps}: {report['stopped_early']}"
    print(f"[{job.stage.stage}] trained to step {step} in {minutes:.1f} min{early}", flush=True)
    return TrainOutcome(step, job.out, metrics)


def training_summary(
    job: TrainJob, step: int, minutes: float, loop_result: dict[str, Any]
) -> dict[str, Any]:
    """What ``<out>/training.json`` says of a finished run: steps done against planned,
    why it stopped early (or None), wall minutes and the numerics it ran with."""
    return {
        "stage": job.stage.stage,
        "steps_done": step,
        "steps_planned": job.run.steps,
        "stopped_early": loop_result.get("stopped_early"),
        "minutes": round(minutes, 2),
        "numerics": loop_result.get("numerics"),
        "workers": job.workers,
    }


def copy_checkpoint(checkpoint: Any, out: str) -> None:
    """Copy a Ray Train checkpoint directory (any filesystem) to a local or s3:// URI."""
    import pyarrow.fs as pafs

    dst_fs, dst_path = fs.pyarrow_fs(out)
    fs.makedirs(out)
    pafs.copy_files(
        checkpoint.path,
        dst_path,
        source_filesystem=checkpoint.filesystem,
        destination_filesystem=dst_fs,
    )


def _in_file_order(ds: Any) -> Any:
    """The (small) dataset materialised in the table's row order: every run and every resume
    evaluates on the same held-out rows and shows the same ones in its sample grids."""
    ds.context.execution_options.preserve_order = True
    return ds.materialize()


def _worker_resources(job: TrainJob) -> dict[str, float] | None:
    """CPUs per worker: on CPU, leave about one CPU of the cluster to Ray Data."""
    if job.workers == 0:
        return None
    if job.run.cpus_per_worker > 0:
        return {"CPU": job.run.cpus_per_worker}
    if job.gpu:
        return {"CPU": 1.0}  # plus the GPU that use_gpu=True gives each worker
    import ray

    total = float(ray.cluster_resources().get("CPU", 1.0))
    per = min(1.0, max(0.1, (total - 1.0) / job.workers))
    return {"CPU": round(per, 2)}


def _last_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    lines = [ln.strip() for ln in text if ln.strip()]
    return lines[-1] if lines else type(error).__name__
