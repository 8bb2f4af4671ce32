"""``unclip train clip``: the small open_clip CLIP of the embedded default, on Ray Train.

    unclip train clip --data IMAGE_FOLDER --out URI [--preset quick|full] [--config FILE]
        [--steps N] [--workers N] [--gpu] [--resume] [--storage URI]

The driver reads the captioned image folder (local or s3://, ``training.clip_data``) once,
puts the decoded arrays in Ray's object store and runs a ``TorchTrainer`` whose workers
train an ``open_clip.model.CLIP`` (``training.clip_steps``) with open_clip's ``ClipLoss``.
With several workers (DDP: gloo on CPU, NCCL on GPU) the loss gathers the features of all
workers (``local_loss=False, gather_with_grad=True``), so it is the loss of the global batch.

Runs live in ``<storage>/<basename of --out>.run/`` (``--storage`` defaults to the folder of
``--out``; local or s3). Every ``checkpoint_every`` steps rank 0 writes a checkpoint there:

    config.json          kind "open_clip": model_cfg (open_clip.model.CLIP kwargs), mean/std,
                         the run config under "train", the step
    model.safetensors    the CLIP's weights
    train_state.pt       weights, optimiser, step, RNG (loads with weights_only=True)

A lost worker resumes from the last checkpoint (``FailureConfig``); after a driver crash the
same command with ``--resume`` continues the run. At the end the last checkpoint is copied to
``--out``, loaded back with ``unclip.clip.Clip.load`` and evaluated (``training.clip_eval``);
the numbers are printed and written to ``<out>/metrics.json``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from training import priority
from training.clip_data import (
    HardNegatives,
    ImageTextData,
    augment,
    normalise,
    read_folder,
    to_unit,
    worker_batches,
)
from training.clip_presets import (
    ClipTrainConfig,
    config_from_dict,
    config_to_dict,
    resolve,
)
from training.clip_steps import build_clip, lr_at, make_optimizer, restore, train_state, train_step
from training.presets import load_config_file
from training.runs import (
    checkpoint_dir_name,
    latest_checkpoint,
    refuse_existing_run,
    restored_train_state,
    run_location,
)
from unclip import fs, numerics
from unclip.checkpoint import COMMIT, TRAIN_STATE, write_commit
from unclip.clip import OPENAI_MEAN, OPENAI_STD, Clip, save_clip_checkpoint
from unclip.config import ConfigError
from unclip.errors import UserError
from unclip.schema import DataError
from unclip.split import HELDOUT_FRACTION

METRICS = "metrics.json"
SHAPES_MARKER = "attributes.parquet"  # written by `unclip shapes` beside the images


def say(message: str) -> None:
    """One progress line on stdout (Ray Train V2 would log a ``print`` twice)."""
    sys.stdout.write(message + "\n")
    sys.stdout.flush()


# ---------------------------------------------------------------------- checkpoints
def write_checkpoint(
    directory: str,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    cfg: ClipTrainConfig,
    step: int,
) -> None:
    """A CLIP checkpoint ``Clip.load`` reads, plus the train state to resume from."""
    from training.clip_steps import unwrap

    save_clip_checkpoint(
        directory,
        unwrap(model),
        cfg.model.to_open_clip(),
        extra={"train": config_to_dict(cfg), "step": step},
    )
    buf = io.BytesIO()
    torch.save(train_state(model, optimizer, step), buf)
    fs.write_bytes(fs.join(directory, TRAIN_STATE), buf.getvalue())
    write_commit(directory, sorted(set(fs.listdir(directory)) - {COMMIT}))


# ---------------------------------------------------------------------- the worker loop
def train_loop(config: dict[str, Any]) -> None:
    """``train_loop_per_worker``: ``config`` holds the run config, the data (an ObjectRef to
    a dict of arrays, or the dict itself in local mode) and where local-mode checkpoints go."""
    import ray.train
    import ray.train.torch
    from open_clip.loss import ClipLoss

    cfg = config_from_dict(config["train"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    threads = cfg.threads or max(1, (os.cpu_count() or 1) // max(1, ctx.get_local_world_size()))
    torch.set_num_threads(threads)
    data = config["data"]
    if not isinstance(data, dict):
        import ray

        data = ray.get(data)
    priority.quiet_session()  # the data is in memory: nothing of Ray's needs full priority
    images, tokens = data["images"], data["tokens"]  # (N, 3, S, S) uint8, (N, L) int32
    groups = None
    if cfg.hard_negatives and "group_key" in data:
        groups = HardNegatives(data["group_key"], data["group_variant"], cfg.hard_negatives)
    device = _device(config, rank)

    torch.manual_seed(cfg.seed)  # the same initial weights on every worker
    model = build_clip(cfg.model).to(device)
    mean, std = OPENAI_MEAN, OPENAI_STD  # what save_clip_checkpoint records
    chosen = choose_clip_numerics(cfg, model, images, tokens, device, threads, ctx, mean, std)
    if rank == 0:
        say(f"[clip] numerics: {chosen.summary()}")
    settings = chosen.numerics
    settings.apply(model)
    torch.set_num_threads(settings.threads)
    optimizer = make_optimizer(model, cfg)
    start = 0
    saved = restored_train_state(persisted=bool(config.get("persisted")))
    if saved is not None:
        start = restore(model, optimizer, saved)
        if rank == 0:
            say(f"[clip] resumed from step {start}")
    if world > 1:
        model = ray.train.torch.prepare_model(model)
    loss_fn = ClipLoss(local_loss=False, gather_with_grad=True, rank=rank, world_size=world)

    t_start, last_log, losses = time.perf_counter(), time.perf_counter(), []
    step = start
    batches = worker_batches(len(images), cfg.batch_size, rank, world, cfg.seed, start, groups)
    for step, rows in batches:
        if step >= cfg.steps or _out_of_time(cfg, t_start, world, device):
            break
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * world + rank)
        x = augment(to_unit(torch.from_numpy(images[rows])), cfg.upsample_fraction, gen)
        pixels = settings.layout(normalise(x, mean, std).to(device))
        ids = torch.from_numpy(tokens[rows]).long().to(device)
        with settings.autocast(device.type):
            loss = train_step(
                model, loss_fn, optimizer, pixels, ids, lr_at(step, cfg), cfg.grad_clip
            )
        losses.append(loss)
        done = step + 1
        if rank == 0 and (done % cfg.log_every == 0 or done == cfg.steps):
            now = time.perf_counter()
            n = done % cfg.log_every or cfg.log_every
            say(
                f"[clip] step {done}/{cfg.steps} loss {np.mean(losses[-n:]):.4f} "
                f"lr {lr_at(step, cfg):.2e} {n / (now - last_log):.2f} steps/s"
            )
            last_log = now
        if done % cfg.checkpoint_every == 0 and done < cfg.steps:
            _report(config, model, optimizer, cfg, done, losses, rank, t_start)
    # worker_batches never ends: the loop broke at ``step``, the first step not run
    _report(config, model, optimizer, cfg, step, losses, rank, t_start, final=True)


def choose_clip_numerics(
    cfg: ClipTrainConfig,
    model: torch.nn.Module,
    images: np.ndarray,
    tokens: np.ndarray,
    device: torch.device,
    threads: int,
    ctx: Any,
    mean: tuple[float, ...],
    std: tuple[float, ...],
) -> numerics.Choice:
    """Autocast, memory format and threads for the CLIP's step on this machine, measured on
    throwaway copies of ``model`` (``unclip.numerics``; ``training.harness`` does the same
    for the other stages). Several workers keep every setting but threads fixed: they would
    each probe their own ClipLoss all-gather."""
    from copy import deepcopy

    from open_clip.loss import ClipLoss

    world = ctx.get_world_size()
    amp = cfg.amp if world == 1 or cfg.amp != "auto" else "none"
    fmt = cfg.memory_format if world == 1 or cfg.memory_format != "auto" else "contiguous"
    conv = cfg.model.vision == "resnet"
    options = numerics.candidates(device, threads, amp, fmt, conv)
    auto = numerics.AUTO in (amp, fmt)
    fewer = [threads // 2] if auto and not cfg.threads and device.type == "cpu" else []
    rows = np.arange(min(len(images), cfg.batch_size // world))
    pixels = normalise(to_unit(torch.from_numpy(images[rows])), mean, std).to(device)
    ids = torch.from_numpy(tokens[rows]).long().to(device)
    loss_fn = ClipLoss()
    scratch: dict[numerics.Numerics, tuple[Any, Any]] = {}

    def step(n: numerics.Numerics) -> None:
        if n not in scratch:
            copy = n.apply(deepcopy(model))
            scratch[n] = (copy, make_optimizer(copy, cfg))
        copy, opt = scratch[n]
        torch.set_num_threads(n.threads)
        with n.autocast(device.type):
            train_step(copy, loss_fn, opt, n.layout(pixels), ids, cfg.lr, cfg.grad_clip)

    key = numerics.workload_key("clip", config_to_dict(cfg.model), cfg.batch_size, world)
    return numerics.choose(step, options, key, numerics.NumericsCache(), fewer_threads=fewer)


def _out_of_time(cfg: ClipTrainConfig, t_start: float, world: int, device: torch.device) -> bool:
    """Past the time limit? Every worker stops at the same step: any worker's clock decides."""
    if cfg.time_limit_minutes <= 0:
        return False
    over = time.perf_counter() - t_start > cfg.time_limit_minutes * 60
    if world > 1:
        flag = torch.tensor([float(over)], device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        over = bool(flag.item())
    return over


def _report(
    config: dict[str, Any],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    cfg: ClipTrainConfig,
    step: int,
    losses: list[float],
    rank: int,
    t_start: float,
    final: bool = False,
) -> None:
    """Checkpoint (rank 0) and report (every rank: it is a barrier)."""
    import ray.train

    metrics = {
        "step": step,
        "loss": float(np.mean(losses[-cfg.log_every :])) if losses else float("nan"),
        "train_seconds": time.perf_counter() - t_start,
        "steps_run": len(losses),
        "final": final,
    }
    if rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    name = checkpoint_dir_name(step)
    if config.get("local_dir"):  # local mode: Ray keeps a reference to the directory
        directory = os.path.join(config["local_dir"], name)
        write_checkpoint(directory, model, optimizer, cfg, step)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))
        return
    with tempfile.TemporaryDirectory() as directory:
        write_checkpoint(directory, model, optimizer, cfg, step)
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(directory),
            checkpoint_dir_name=name,
        )


# ---------------------------------------------------------------------- the driver
@dataclass(frozen=True)
class ClipJob:
    """A resolved ``unclip train clip`` run."""

    train: ClipTrainConfig
    data: str
    out: str
    storage: str  # RunConfig.storage_path, as a URI
    name: str  # RunConfig.name
    workers: int = 1
    gpu: bool = False
    resume_step: int = 0
    preset: str = "quick"

    @property
    def run_dir(self) -> str:
        return fs.join(self.storage, self.name)


def plan(
    data: str,
    out: str,
    preset_name: str = "quick",
    config: str | dict[str, Any] | None = None,
    steps: int | None = None,
    workers: int = 1,
    gpu: bool = False,
    resume: bool = False,
    storage: str | None = None,
) -> ClipJob:
    """Resolve configs and paths; starts nothing. ``config``: a file URI or its contents."""
    if workers < 0:
        raise UserError(f"--workers must be >= 0, got {workers}")
    if workers == 0 and resume:
        raise UserError("--resume needs --workers >= 1 (--workers 0 keeps no run checkpoints)")
    if steps is not None and steps < 1:
        raise UserError(f"--steps must be >= 1, got {steps}")
    out = out.rstrip("/")
    storage_uri, name = run_location(out, storage)
    run_dir = fs.join(storage_uri, name)
    latest = latest_checkpoint(run_dir)
    if resume:
        if latest is None:
            raise UserError(f"nothing to resume: no checkpoint in {run_dir}; run without --resume")
        step, ckpt = latest
        saved = json.loads(fs.read_text(fs.join(ckpt, "config.json")))
        cfg = config_from_dict(saved["train"])
        if steps is not None:
            cfg = replace(cfg, steps=steps)
        return ClipJob(cfg, data, out, storage_uri, name, workers, gpu, step, preset_name)
    refuse_existing_run(run_dir, out, latest)
    overrides = load_config_file(config) if isinstance(config, str) else (config or {})
    cfg = resolve(preset_name, overrides, steps)
    if workers > 1 and cfg.batch_size % workers:
        raise UserError(f"batch_size {cfg.batch_size} is not divisible by {workers} workers")
    return ClipJob(cfg, data, out, storage_uri, name, workers, gpu, 0, preset_name)


def _device(config: dict[str, Any], rank: int) -> torch.device:
    """A worker's device: the GPU Ray assigned it (a clear error where CUDA cannot use it),
    else the CPU; in local mode (``data`` in the config: no worker group) Ray Train's."""
    if "local_dir" in config:
        import ray.train.torch

        return ray.train.torch.get_device() if config.get("gpu") else torch.device("cpu")
    from infra.gpus import ray_device

    return ray_device(f"Ray Train worker {rank}")


def fit(job: ClipJob, train: ImageTextData) -> tuple[int, dict[str, Any]]:
    """Run the TorchTrainer and copy its last checkpoint to ``job.out``: (step, metrics)."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if not ray.is_initialized():  # ray.put below would start one with Ray's worker nice 15
        from infra import local_ray

        local_ray.init(configure_logging=False)
    arrays = {"images": train.images, "tokens": train.tokens}
    if job.train.hard_negatives:
        arrays.update(shape_groups(job.data, train.ids))
    loop_config: dict[str, Any] = {"train": config_to_dict(job.train), "gpu": job.gpu}
    local_dir = None
    if job.workers == 0:
        local_dir = tempfile.mkdtemp(prefix="unclip-clip-")
        loop_config.update(data=arrays, local_dir=local_dir)
    else:
        loop_config.update(data=ray.put(arrays), persisted=True)
    storage_fs, storage_path = storage_filesystem(job.storage)
    resources = {"CPU": job.train.cpus_per_worker, **({"GPU": 1} if job.gpu else {})}
    if job.gpu and job.workers > 0:  # a node granting a GPU it cannot use ends the run here
        from infra.gpus import check_gpus

        check_gpus(1, job.train.cpus_per_worker, "a Ray Train worker")
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=job.workers, use_gpu=job.gpu, resources_per_worker=resources
        ),
        torch_config=TorchConfig(backend="nccl" if job.gpu else "gloo"),
        run_config=RunConfig(
            name=job.name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            failure_config=FailureConfig(max_failures=job.train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=job.train.keep_checkpoints),
        ),
    )
    try:
        result = trainer.fit()
        if result.checkpoint is None:
            raise RuntimeError("training ended without a checkpoint")
        with result.checkpoint.as_directory() as d:
            fs.copy_tree(d, job.out)
        return int((result.metrics or {}).get("step", 0)), dict(result.metrics or {})
    finally:
        priority.restore_session()  # the worker quieted the session (training.priority)
        if local_dir:
            shutil.rmtree(local_dir, ignore_errors=True)


def shape_groups(folder: str, ids: list[str]) -> dict[str, np.ndarray]:
    """``group_key`` / ``group_variant`` arrays for hard-negative batches: from the shapes
    dataset's ``attributes.parquet`` (every attribute but the shape / the shape), or none
    (random batches) for a folder without one."""
    uri = fs.join(folder, "attributes.parquet")
    if not fs.exists(uri):
        say("[clip] hard_negatives: no attributes.parquet in the folder; random batches")
        return {}
    import pyarrow.parquet as pq

    pafs, path = fs.pyarrow_fs(uri)
    rows = {r.pop("id"): r for r in pq.read_table(path, filesystem=pafs).to_pylist()}
    keys: dict[tuple, int] = {}
    shapes: dict[str, int] = {}
    key, variant = np.zeros(len(ids), np.int64), np.zeros(len(ids), np.int64)
    for i, row_id in enumerate(ids):
        row = rows.get(row_id)
        if row is None:  # an image the attributes do not describe: a group of its own
            key[i], variant[i] = -1 - i, 0
            continue
        shape = row.pop("shape")
        row.pop("caption", None)
        key[i] = keys.setdefault(tuple(sorted(row.items())), len(keys))
        variant[i] = shapes.setdefault(shape, len(shapes))
    return {"group_key": key, "group_variant": variant}


def storage_filesystem(uri: str) -> tuple[Any, str]:
    """``fs.pyarrow_fs`` for RunConfig. For s3, long-lived credentials set in the driver's
    environment are given explicitly, so workers whose environment lacks them (a Ray started
    before they were set) still reach the same endpoint with the same identity.

    Temporary credentials (with ``AWS_SESSION_TOKEN``) are not: Ray keeps this filesystem
    with the run, and a frozen token would expire under a long run or a later ``--resume``.
    Each process then takes credentials from its own chain (environment, profile, instance
    or pod role), which refreshes them."""
    filesystem, path = fs.pyarrow_fs(uri)
    key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if not uri.startswith("s3://") or not (key and secret) or os.environ.get("AWS_SESSION_TOKEN"):
        return filesystem, path
    import pyarrow.fs as pafs

    kwargs: dict[str, Any] = {"access_key": key, "secret_key": secret}
    if fs.s3_endpoint():
        kwargs["endpoint_override"] = fs.s3_endpoint()
        if fs.s3_endpoint().startswith("http://"):
            kwargs["scheme"] = "http"
    region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
    if region:
        kwargs["region"] = region
    return pafs.S3FileSystem(**kwargs), path


def evaluate(job: ClipJob, heldout: ImageTextData) -> dict[str, Any]:
    """Load ``job.out`` like any CLIP and measure it (shapes numbers when the data is shapes)."""
    from training.clip_eval import evaluate_shapes, heldout_recall, render_heldout

    clip = Clip.load(job.out)
    mean, std = tuple(clip.mean.flatten().tolist()), tuple(clip.std.flatten().tolist())
    ctx, size = clip.identity.context_length, clip.identity.image_size
    out: dict[str, Any] = {}
    if len(heldout) >= 2:
        out["heldout"] = heldout_recall(clip.model, heldout.images, heldout.tokens, mean, std)
    shapes = job.train.eval_shapes
    if shapes == "auto":
        shapes = "on" if fs.exists(fs.join(job.data, SHAPES_MARKER)) else "off"
    if shapes == "on" and job.train.eval_images > 0:
        renders = render_heldout(job.train.eval_images, job.train.eval_seed, size)
        per_combo = job.train.eval_captions_per_combo
        out.update(evaluate_shapes(clip.model, renders, ctx, mean, std, per_combo))
    return out


def format_metrics(metrics: dict[str, Any]) -> str:
    lines = []
    for key, values in metrics.items():
        if isinstance(values, dict):
            lines.append(f"  {key:22s} " + "  ".join(f"{k} {v:.3f}" for k, v in values.items()))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    try:
        job = plan(
            args.data,
            args.out,
            args.preset,
            args.config,
            args.steps,
            args.workers,
            args.gpu,
            args.resume,
            getattr(args, "storage", None),
        )
    except ConfigError as e:
        raise UserError(str(e)) from None
    cfg = job.train
    t0 = time.perf_counter()
    data = read_folder(job.data, cfg.model.image_size, cfg.model.context_length)
    train, heldout = data.split(HELDOUT_FRACTION)
    say(
        f"[clip] {job.data}: {len(data)} captioned images ({len(train)} train, {len(heldout)} "
        f"held out) in {time.perf_counter() - t0:.1f}s"
        + (f"; {len(data.skipped)} skipped, e.g. {data.skipped[0]}" if data.skipped else "")
    )
    if len(train) < cfg.batch_size:
        raise DataError(
            f"{job.data} has {len(train)} training images, fewer than one batch of "
            f"{cfg.batch_size}; add images or lower batch_size in --config"
        )
    say(
        f"[clip] preset {job.preset}: {cfg.steps} steps, batch {cfg.batch_size}, "
        f"{cfg.model.vision} image tower, {job.workers} worker(s); run in {job.run_dir}"
        + (f", resuming at step {job.resume_step}" if job.resume_step else "")
    )
    t1 = time.perf_counter()
    step, train_metrics = fit(job, train)
    train_s = time.perf_counter() - t1
    say(f"[clip] trained to step {step} in {train_s:.0f}s; checkpoint at {job.out}; evaluating")
    if step < cfg.steps:
        say(
            f"[clip] stopped at step {step} of {cfg.steps}: time_limit_minutes "
            f"{cfg.time_limit_minutes} reached (a busy or slow machine)"
        )
    metrics = evaluate(job, heldout)
    report = {
        "preset": job.preset,
        "steps": step,
        "steps_planned": cfg.steps,
        "stopped_early": step < cfg.steps,
        "workers": job.workers,
        "loss": train_metrics.get("loss"),
        "train_seconds": train_s,
        "wall_seconds": time.perf_counter() - t0,
        "load_average": list(os.getloadavg()),
        "images": len(data),
        "skipped": [list(s) for s in data.skipped],
        **metrics,
        "config": config_to_dict(cfg),
    }
    fs.write_text(fs.join(job.out, METRICS), json.dumps(report, indent=2))
    say("[clip] evaluation (see " + fs.join(job.out, METRICS) + "):\n" + format_metrics(metrics))
    return 0
