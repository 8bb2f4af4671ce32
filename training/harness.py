"""The one training loop of every diffusion stage (prior, decoder, upsampler), run by Ray Train.

``train_loop(loop_config)`` is the ``train_loop_per_worker`` of a ``TorchTrainer``. Each
worker builds the stage model from its config, restores the latest checkpoint if Ray
hands one over (``ray.train.get_checkpoint()``: after a worker failure or ``--resume``),
wraps the model in DDP (``prepare_model``) and steps through its shard of the table:

    AdamW, linear warm-up then constant or cosine decay, gradient clipping, EMA of the
    weights, autocast (bf16/fp16) on GPU only, a NaN/inf guard before every update.

Every ``checkpoint_every`` steps (and at the end) rank 0 writes a stage checkpoint in the
format of docs/formats.md, which Ray Train persists to the run's storage:

    config.json          the stage config (rebuilds the model)
    train_config.json    the run options (TrainConfig)
    model.safetensors    EMA weights: what sampling uses
    train_state.pt       raw weights, optimizer, EMA, step, RNG (tensors and plain containers
                         only: loads with ``weights_only=True``)

Every ``eval_every`` steps rank 0 evaluates the EMA weights on held-out rows
(``training.stages``), prints the metrics and writes them to ``<run dir>/metrics.jsonl``
and sample grids to ``<run dir>/samples/``.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from copy import deepcopy
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from training import priority, scale
from training.presets import TrainConfig, train_config_from_dict, train_config_to_dict
from training.runs import checkpoint_dir_name, restored_train_state
from training.stages import Batch, Stage, stage_for
from unclip import fs, numerics
from unclip.checkpoint import save_stage
from unclip.clip import Clip
from unclip.config import (
    DecoderConfig,
    OptimConfig,
    StageConfig,
    UpsamplerConfig,
    stage_config_from_dict,
    to_dict,
)
from unclip.ema import EMA
from unclip.models import build_model
from unclip.pipeline import png_bytes
from unclip.schema import DataError

TRAIN_CONFIG = "train_config.json"
MIN_LOSS_SCALE = 2.0**-14  # fp16: a GradScaler halved this far means a diverged loss
METRICS = "metrics.jsonl"
SAMPLES = "samples"


def say(message: str) -> None:
    """One progress line on stdout (not ``print``: Ray Train V2 would log it twice)."""
    sys.stdout.write(message + "\n")
    sys.stdout.flush()


@dataclass(frozen=True)
class LoopConfig:
    """What the driver hands every worker (as a plain dict: ``to_dict`` / ``from_dict``)."""

    stage: StageConfig
    run: TrainConfig
    run_dir: str  # URI of the run directory (metrics, sample grids; Ray's checkpoints)
    local_mode: bool = False  # ScalingConfig(num_workers=0): in-process, nothing persisted
    data_files: tuple[str, ...] = ()  # the table's Parquet files (for Stage.prepare)

    def to_dict(self) -> dict[str, Any]:
        return {
            "stage": to_dict(self.stage),
            "run": train_config_to_dict(self.run),
            "run_dir": self.run_dir,
            "local_mode": self.local_mode,
            "data_files": list(self.data_files),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LoopConfig:
        return cls(
            stage_config_from_dict(d["stage"]),
            train_config_from_dict(d["run"]),
            d["run_dir"],
            bool(d.get("local_mode", False)),
            tuple(d.get("data_files", ())),
        )


class Diverged(RuntimeError):
    """The loss or the gradients became NaN/inf."""


# ---------------------------------------------------------------------- schedule
def lr_at(step: int, optim: OptimConfig, total_steps: int) -> float:
    """Learning rate of (1-based) ``step``: linear warm-up, then constant or cosine to 0."""
    if optim.warmup_steps and step <= optim.warmup_steps:
        return optim.lr * step / optim.warmup_steps
    if optim.lr_schedule == "constant":
        return optim.lr
    span = max(1, total_steps - optim.warmup_steps)
    progress = min(1.0, (step - optim.warmup_steps) / span)
    return optim.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def choose_numerics(
    stage: Stage,
    run: TrainConfig,
    device: torch.device,
    threads: int,
    batch: Batch,
    clip: Clip | None,
    local_workers: int = 1,
    cache: numerics.NumericsCache | None = None,
    template: nn.Module | None = None,
) -> numerics.Choice:
    """Autocast dtype, memory format and threads for this stage on this machine, measured.

    Fields the run fixes (``amp``, ``memory_format``, ``threads`` != auto) are kept; the
    others are chosen by timing a few real steps of the stage's own model on ``batch``
    (throwaway copies of ``template``, the run's model after fitting what the stage fits,
    or fresh models: the run's weights, optimiser and random streams are untouched), and
    cached per machine and workload (``unclip.numerics``).
    """
    cfg = stage.config
    conv = isinstance(cfg, DecoderConfig | UpsamplerConfig)
    options = numerics.candidates(device, threads, run.amp, run.memory_format, conv)
    auto = numerics.AUTO in (run.amp, run.memory_format)
    fewer = [threads // 2] if auto and not run.threads and device.type == "cpu" else []
    scratch: dict[numerics.Numerics, Stepper] = {}

    def step(n: numerics.Numerics) -> None:
        if n not in scratch:
            copy = None if template is None else deepcopy(template)
            st = new_state(cfg, device, n.amp, copy)
            n.apply(st.model)
            scratch[n] = Stepper(stage, st.model, st, clip, n)
        torch.set_num_threads(n.threads)
        scratch[n](batch, cfg.optim.lr)

    key = numerics.workload_key(
        cfg.stage, to_dict(cfg.net), run.batch_size, device.type, local_workers
    )
    if cache is None:
        cache = numerics.NumericsCache()
    return numerics.choose(step, options, key, cache, fewer_threads=fewer)


def _agree(choice: numerics.Numerics, world: int, device: torch.device) -> numerics.Numerics:
    """Every rank uses rank 0's choice (DDP needs one layout; probes on ranks may differ)."""
    if world <= 1 or not torch.distributed.is_initialized():
        return choice
    code = torch.tensor(
        [
            numerics.AMPS.index(choice.amp),
            numerics.MEMORY_FORMATS.index(choice.memory_format),
            choice.threads,
        ],
        device=device,
    )
    torch.distributed.broadcast(code, src=0)
    amp, fmt, _ = (int(v) for v in code.tolist())
    # threads stay each rank's own (nodes may differ in cores)
    return replace(choice, amp=numerics.AMPS[amp], memory_format=numerics.MEMORY_FORMATS[fmt])  # type: ignore[arg-type]


# ---------------------------------------------------------------------- state
@dataclass
class TrainState:
    """Everything that changes while training (on one worker)."""

    model: nn.Module  # the bare model (not the DDP wrapper)
    optimizer: torch.optim.Optimizer
    ema: EMA
    scaler: torch.amp.GradScaler | None = None
    step: int = 0

    def to_dict(self, seed: int) -> dict[str, Any]:
        """Tensors and plain containers only (``torch.load(weights_only=True)``)."""
        state: dict[str, Any] = {
            "step": self.step,
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "ema": self.ema.state_dict(),
            "ema_updates": self.ema.updates,
            "seed": seed,
            "rng": {"torch": torch.get_rng_state()},
        }
        if torch.cuda.is_available():
            state["rng"]["cuda"] = torch.cuda.get_rng_state()
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        return state

    def load(self, state: dict[str, Any], rank: int) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.ema.load_state_dict(state["ema"], int(state["ema_updates"]))
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        if rank == 0:  # rank 0 continues its own random stream; others reseed below
            torch.set_rng_state(state["rng"]["torch"])
            if "cuda" in state["rng"] and torch.cuda.is_available():
                torch.cuda.set_rng_state(state["rng"]["cuda"])
        else:
            torch.manual_seed(_seed(int(state["seed"]), rank, self.step))


def _seed(seed: int, rank: int, step: int) -> int:
    return (seed * 1_000_003 + rank * 7_919 + step) % (2**63 - 1)


def write_checkpoint(directory: str, cfg: StageConfig, run: TrainConfig, state: TrainState) -> None:
    """A stage checkpoint (docs/formats.md) + ``train_config.json`` in ``directory``."""
    fs.write_text(fs.join(directory, TRAIN_CONFIG), json.dumps(train_config_to_dict(run), indent=2))
    save_stage(directory, cfg, state.ema.state_dict(), state.to_dict(run.seed))


# ---------------------------------------------------------------------- metrics
class MetricsLog:
    """``metrics.jsonl`` in the run directory, rewritten whole (works on S3 too)."""

    def __init__(self, run_dir: str, resumed_step: int) -> None:
        self.uri = fs.join(run_dir, METRICS)
        self.run_dir = run_dir
        self.lines: list[str] = []
        if resumed_step and fs.exists(self.uri):  # keep history up to the resumed step
            for line in fs.read_text(self.uri).splitlines():
                if line.strip() and json.loads(line).get("step", 0) <= resumed_step:
                    self.lines.append(line)

    def write(self, record: dict[str, Any]) -> None:
        self.lines.append(json.dumps(record))
        fs.write_text(self.uri, "\n".join(self.lines) + "\n")

    def write_image(self, name: str, step: int, image: Any) -> str:
        uri = fs.join(self.run_dir, SAMPLES, f"{name}_{step:08d}.png")
        fs.write_bytes(uri, png_bytes(image))
        return uri


# ---------------------------------------------------------------------- data
def endless_batches(shard: Any, run: TrainConfig, device: torch.device) -> Iterator[Batch]:
    """Batches of this worker's shard, epoch after epoch (each epoch reshuffled locally)."""
    while True:
        n = 0
        for batch in shard.iter_torch_batches(
            batch_size=run.batch_size,
            drop_last=True,
            local_shuffle_buffer_size=max(run.shuffle_buffer, run.batch_size),
            device=device,
        ):
            n += 1
            yield batch
        if n == 0:
            raise DataError(
                f"the training split has fewer rows per worker than one batch "
                f"({run.batch_size}); lower train.batch_size or add data"
            )


def in_memory_batches(
    shard: Any, run: TrainConfig, device: torch.device, seed: int
) -> Iterator[Batch]:
    """This worker's whole shard read once into tensors, then batches in a fresh random
    order every epoch (``train.cache_data``: small tables). Between steps there is then no
    data pipeline at all: streaming batches through Ray Data's iterator in the training
    process cost 40% per decoder step on 2 cores (its threads preempt torch's)."""
    parts: dict[str, list[torch.Tensor]] = {}
    with data_threads():
        for batch in shard.iter_torch_batches(batch_size=4096, device="cpu"):
            for k, v in batch.items():
                parts.setdefault(k, []).append(v)
    data = {k: torch.cat(v) for k, v in parts.items()}
    n = len(next(iter(data.values()))) if data else 0
    if n < run.batch_size:
        raise DataError(
            f"the training split has {n} rows per worker, fewer than one batch "
            f"({run.batch_size}); lower train.batch_size or add data"
        )
    g = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(n, generator=g)
        for i in range(0, n - run.batch_size + 1, run.batch_size):
            idx = order[i : i + run.batch_size]
            yield {k: v[idx].to(device) for k, v in data.items()}


def first_rows(dataset: Any, n: int) -> Batch | None:
    """The first ``n`` rows of a (small) dataset as one batch, or None if it is empty."""
    with data_threads():
        for batch in dataset.iter_torch_batches(batch_size=n, device="cpu"):
            return batch
    return None


@contextmanager
def data_threads() -> Iterator[None]:
    """Torch at one thread while Ray Data's iterator threads run their first torch ops.

    A thread's first torch op fixes its OpenMP team size; a thread that ran ops with a team
    of 2 keeps an OpenMP pool, and while it exists the training thread's own 2-thread ops
    ran 1.6x slower on 2 cores (libgomp throttles its spin-waiting once it manages more
    threads than there are cores; measured, docs/benchmarks.md "Training inside Ray")."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def load_clip(stage: Stage, device: torch.device) -> Clip:
    """The table's CLIP (frozen), checked against the fingerprint in the stage config."""
    ref = stage.clip_ref
    clip = Clip.load(ref.model, ref.pretrained, device=str(device))
    if ref.fingerprint and clip.identity.fingerprint != ref.fingerprint:
        raise DataError(
            f"CLIP {ref.model!r} now has fingerprint {clip.identity.fingerprint}, but the "
            f"table was embedded with {ref.fingerprint}; re-embed the data with this CLIP"
        )
    return clip


# ---------------------------------------------------------------------- one step
DECAYED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW parameter groups: weight decay on the weights of linear and convolution layers
    only; norms, biases, embedding tables, positional tables and the learned null
    conditioning (classifier-free guidance's unconditional input) are not pulled to 0."""
    decay, rest = [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            layer = isinstance(module, DECAYED) and name == "weight"
            attention = isinstance(module, nn.MultiheadAttention) and name == "in_proj_weight"
            (decay if layer or attention else rest).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def new_state(
    cfg: StageConfig,
    device: torch.device | str = "cpu",
    amp: numerics.Amp = "none",
    model: nn.Module | None = None,
) -> TrainState:
    """A freshly initialised model (or ``model``) with its AdamW optimiser, EMA and (fp16)
    grad scaler."""
    model = (build_model(cfg) if model is None else model).to(device)
    o = cfg.optim
    optimizer = torch.optim.AdamW(decay_groups(model, o.weight_decay), lr=o.lr, betas=o.betas)
    scaler = torch.amp.GradScaler("cuda") if amp == "fp16" else None
    return TrainState(model, optimizer, EMA(model, o.ema_decay, o.ema_warmup), scaler)


@dataclass(frozen=True)
class StepResult:
    loss: torch.Tensor  # detached scalar
    grad_norm: torch.Tensor  # before clipping
    finite: bool  # False: nothing was updated


class Stepper:
    """One optimiser step of a stage: loss, backward, clipping, NaN guard, update, EMA.

    ``model`` is what the loss is computed with (the DDP wrapper in Ray Train, the bare
    model elsewhere); ``state.model`` is the bare model the EMA tracks. With ``check_loss``
    False (several workers) only the gradient norm decides finiteness: after DDP's
    all-reduce it is the same on every rank, so every rank stops at the same step.
    """

    def __init__(
        self,
        stage: Stage,
        model: nn.Module,
        state: TrainState,
        clip: Clip | None = None,
        settings: numerics.Numerics | None = None,
        check_loss: bool = True,
        grad_accum: int = 1,
    ) -> None:
        self.stage, self.model, self.state, self.clip = stage, model, state, clip
        self.check_loss = check_loss
        self.grad_accum = grad_accum  # micro-batches per step (TrainConfig.grad_accum)
        self.settings = settings or numerics.Numerics(threads=torch.get_num_threads())
        device_type = next(state.model.parameters()).device.type
        self.autocast = self.settings.autocast(device_type)
        self.params = [p for p in state.model.parameters() if p.requires_grad]
        clip_norm = stage.config.optim.grad_clip
        self.clip_norm = clip_norm if clip_norm > 0 else float("inf")

    def __call__(self, batch: Batch, lr: float, poison: bool = False) -> StepResult:
        state, opt, scaler = self.state, self.state.optimizer, self.state.scaler
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad(set_to_none=True)
        parts = scale.micro_batches(batch, self.grad_accum)
        losses = []
        for i, part in enumerate(parts):  # gradients add up; DDP all-reduces on the last
            defer = i < len(parts) - 1 and hasattr(self.model, "no_sync")
            with self.model.no_sync() if defer else nullcontext():
                losses.append(self._backward(part, len(parts), poison))
        loss = losses[0] if len(losses) == 1 else torch.stack(losses).sum()
        if scaler is not None:  # fp16: the scaler skips inf/NaN steps and lowers its scale
            scaler.unscale_(opt)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.clip_norm)
        if scaler is not None:
            scaler.step(opt)  # skipped by the scaler itself if the gradients are not finite
            scaler.update()
            if scaler.get_scale() < MIN_LOSS_SCALE:  # fp16 never recovered: diverged
                return StepResult(loss.detach(), grad_norm, False)
        else:
            finite = bool(torch.isfinite(grad_norm))
            if self.check_loss:
                finite = finite and bool(torch.isfinite(loss))
            if not finite:
                return StepResult(loss.detach(), grad_norm, False)
            opt.step()
        state.ema.update(state.model)
        state.step += 1
        return StepResult(loss.detach(), grad_norm, True)

    def _backward(self, batch: Batch, parts: int, poison: bool) -> torch.Tensor:
        """Forward and backward of one micro-batch (1/``parts`` of the step's rows);
        returns its detached share of the step's mean loss."""
        text = self.stage.text_cond(batch, self.clip)
        batch = {k: self.settings.layout(v) for k, v in batch.items()}
        with self.autocast:
            loss = self.stage.loss(self.model, batch, text) / parts
        if poison:  # test hook (TrainConfig.debug_nan_at_step)
            loss = loss * float("nan")
        scaler = self.state.scaler
        (scaler.scale(loss) if scaler is not None else loss).backward()
        return loss.detach()


# ---------------------------------------------------------------------- the loop
def train_loop(loop_config: dict[str, Any]) -> dict[str, Any]:
    """``train_loop_per_worker`` of the TorchTrainer (see the module docstring).

    Returns (rank 0's value is ``Result.return_value``) ``{"step": last step}`` plus
    ``"diverged": message`` if a NaN/inf stopped the run, or ``"stopped_early"``.
    """
    import ray.train
    import ray.train.torch

    loop_started = time.time()
    job = LoopConfig.from_dict(loop_config)
    cfg, run = job.stage, job.run
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    threads = run.threads or max(1, (os.cpu_count() or 1) // ctx.get_local_world_size())
    torch.set_num_threads(threads)
    device = _device(job.local_mode, rank)
    scale.check_parallel(run, device)
    stage = stage_for(cfg)
    _write_pid(run, rank)

    clip = load_clip(stage, device) if stage.needs_clip() else None
    shard = ray.train.get_dataset_shard("train")
    if run.cache_data:
        batches = in_memory_batches(shard, run, device, _seed(run.seed, rank, 0))
    else:
        batches = endless_batches(shard, run, device)
    first = next(batches)  # probed on, then trained on first: the data order is unchanged
    batches = itertools.chain([first], batches)
    if run.cache_data:  # the data is in memory: nothing of Ray's is needed at full priority
        priority.quiet_session()

    # model, optimiser, EMA; restored from the latest checkpoint if Ray hands one over
    torch.manual_seed(_seed(run.seed, rank, 0))
    state = new_state(cfg, device)
    model = state.model
    saved = restored_train_state(persisted=not job.local_mode)
    if saved is not None:
        state.load(saved, rank)
    start = state.step
    if not start and stage.prepare(model, job.data_files, run.heldout_fraction):
        o = cfg.optim  # fitted buffers changed: the average starts from them
        state.ema = EMA(model, o.ema_decay, o.ema_warmup)

    # numerics (autocast, memory format, threads) measured on this machine unless fixed
    probe_started = time.time()
    choice = choose_numerics(
        stage, run, device, threads, first, clip, ctx.get_local_world_size(), template=model
    )
    chosen = _agree(choice.numerics, world, device)
    timing = {
        "loop_started": round(loop_started, 3),  # wall clock, for start-up breakdowns
        "probe_s": round(time.time() - probe_started, 2),
    }
    chosen.apply(model)
    threads = chosen.threads
    torch.set_num_threads(threads)
    if chosen.amp == "fp16":  # GPU: a grad scaler, continued from the checkpoint if saved
        state.scaler = torch.amp.GradScaler("cuda")
        if saved is not None and "scaler" in saved:
            state.scaler.load_state_dict(saved["scaler"])
    scale.prepare(model, run)  # activation checkpointing, torch.compile (if asked)
    ddp = scale.wrap(model, run)

    log = MetricsLog(job.run_dir, start) if rank == 0 else None
    heldout, eval_model, eval_clip = None, None, clip
    if rank == 0:
        heldout = first_rows(ray.train.get_dataset_shard("heldout"), run.eval_rows)
        eval_model = build_model(cfg).to(device).eval()
        if eval_clip is None and stage.needs_clip(for_eval=True):
            eval_clip = _try_load_clip(stage, device)
        if start:
            log.write({"step": start, "resumed": True})
        log.write({"step": start, **numerics_record(choice, chosen), **timing})
        say(f"[{cfg.stage}] numerics: {choice.summary()}")
        where = "resuming at" if start else "starting at"
        say(
            f"[{cfg.stage}] {where} step {start} of {run.steps}: {world} worker(s), "
            f"{threads} thread(s) each, batch {run.batch_size} per worker, "
            f"{chosen.label}, "
            f"{0 if heldout is None else len(next(iter(heldout.values())))} held-out rows"
        )
    done: dict[str, Any] = {"numerics": chosen.label}
    if start >= run.steps:  # nothing left to do: the latest checkpoint is the final one
        return {"step": start, **done}

    stepper = Stepper(
        stage, ddp, state, clip, chosen, check_loss=world == 1, grad_accum=run.grad_accum
    )
    window = LossWindow()
    t0, last_ckpt = time.perf_counter(), start
    if log is not None:
        log.write({"step": start, "steps_started": round(time.time(), 3)})
    model.train()
    while state.step < run.steps:
        step = state.step + 1
        lr = lr_at(step, cfg.optim, run.steps)
        out = stepper(next(batches), lr, poison=step == run.debug_nan_at_step and rank == 0)
        if not out.finite:
            msg = _diverged(cfg.stage, step, out.loss, out.grad_norm, last_ckpt)
            if rank == 0:
                say(f"[{cfg.stage}] {msg}")
            return {"step": state.step, "diverged": msg, **done}
        window.add(out.loss)

        # the limit cuts a run only when steps remain: one that ends on its last step as
        # the limit passes has done all it planned
        time_up = step < run.steps and _time_up(run, t0, step, world)
        final = step == run.steps or time_up
        metrics: dict[str, Any] = {"step": step, "lr": lr, "time": round(time.time(), 3)}
        if rank == 0 and (step % run.log_every == 0 or final):
            assert log is not None and eval_model is not None
            metrics.update(window.take())
            say(
                f"[{cfg.stage}] step {step}/{run.steps} loss {metrics['loss']:.4f} "
                f"lr {lr:.2e} grad {float(out.grad_norm):.3f} "
                f"{metrics['sec_per_step']:.3f} s/step"
            )
            if step % run.eval_every == 0 or final:
                metrics.update(_evaluate(stage, state, eval_model, heldout, eval_clip, run, log))
            if time_up:
                metrics["stopped_early"] = f"time limit of {run.time_limit_minutes:g} min"
                say(f"[{cfg.stage}] time limit reached: stopping at step {step}")
            log.write(metrics)
        if step % run.checkpoint_every == 0 or final:
            _report_checkpoint(cfg, run, state, metrics, rank, job.local_mode)
            last_ckpt = step
        if step % run.log_every == 0:  # the window was just taken: time steps, not evaluation
            window.restart()  # or saving (a checkpoint between log steps still counts)
        if time_up:
            limit = f"time limit of {run.time_limit_minutes:g} min reached"
            return {"step": step, "stopped_early": limit, **done}
    return {"step": state.step, **done}


def numerics_record(choice: numerics.Choice, used: numerics.Numerics) -> dict[str, Any]:
    """What ``metrics.jsonl`` records of the numerics: the settings used, where they came
    from, and every candidate's measured seconds per step."""
    return {
        "numerics": used.label,
        "numerics_source": choice.source,
        "numerics_timings": {o.label: round(t, 4) for o, t in choice.timings.items()},
        "numerics_thread_timings": {o.label: round(t, 4) for o, t in choice.thread_timings.items()},
    }


class LossWindow:
    """Mean loss and seconds per step since the last ``take``."""

    def __init__(self) -> None:
        self.total: torch.Tensor | float = 0.0
        self.count = 0
        self.since = time.perf_counter()

    def add(self, loss: torch.Tensor) -> None:
        self.total = self.total + loss.float()
        self.count += 1

    def restart(self) -> None:
        """Start timing again from now (after work that is not a training step)."""
        self.since = time.perf_counter()

    def take(self) -> dict[str, float]:
        now = time.perf_counter()
        n = max(1, self.count)
        out = {"loss": float(self.total) / n, "sec_per_step": (now - self.since) / n}
        self.total, self.count, self.since = 0.0, 0, now
        return out


def _evaluate(
    stage: Stage,
    state: TrainState,
    eval_model: nn.Module,
    heldout: Batch | None,
    clip: Clip | None,
    run: TrainConfig,
    log: MetricsLog,
) -> dict[str, Any]:
    """Evaluate the EMA weights on held-out rows; print the metrics, save the images."""
    name = stage.config.stage
    if heldout is None:
        say(f"[{name}] no held-out rows: skipping evaluation")
        return {}
    state.ema.copy_to(eval_model)
    device = next(eval_model.parameters()).device
    rows = {k: v.to(device) for k, v in heldout.items()}
    t = time.perf_counter()
    result = stage.evaluate(eval_model, rows, clip, run.eval_images)
    record: dict[str, Any] = dict(result.metrics)
    record["eval_seconds"] = round(time.perf_counter() - t, 2)
    for image_name, image in result.images.items():
        record[f"{image_name}_png"] = log.write_image(image_name, state.step, image)
    shown = " ".join(
        f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()
    )
    say(f"[{name}] eval step {state.step}: {shown}")
    return record


def _report_checkpoint(
    cfg: StageConfig,
    run: TrainConfig,
    state: TrainState,
    metrics: dict[str, Any],
    rank: int,
    local_mode: bool,
) -> None:
    """Rank 0 writes the checkpoint; every rank reports (``ray.train.report`` is a barrier)."""
    import ray.train

    directory, checkpoint = None, None
    if rank == 0:
        directory = tempfile.mkdtemp(prefix=f"unclip-{cfg.stage}-ckpt-")
        write_checkpoint(directory, cfg, run, state)
        checkpoint = ray.train.Checkpoint.from_directory(directory)
        if local_mode:  # nothing is persisted: keep only the newest directory alive
            previous = getattr(_report_checkpoint, "_last_local", None)
            _report_checkpoint._last_local = directory  # type: ignore[attr-defined]
            if previous:
                shutil.rmtree(previous, ignore_errors=True)
    ray.train.report(
        metrics, checkpoint=checkpoint, checkpoint_dir_name=checkpoint_dir_name(state.step)
    )
    if directory and not local_mode:
        shutil.rmtree(directory, ignore_errors=True)


def _diverged(
    stage: str, step: int, loss: torch.Tensor, grad_norm: torch.Tensor, last_ckpt: int
) -> str:
    return (
        f"the {stage} loss diverged at step {step} (loss {float(loss)}, gradient "
        f"norm {float(grad_norm)}); the weights were not updated and no checkpoint was "
        f"written after step {last_ckpt}. Lower optim.lr, raise optim.warmup_steps or check "
        "the data for NaN/inf values"
    )


def _time_up(run: TrainConfig, t0: float, step: int, world: int) -> bool:
    """Whether the time limit is reached; decided by rank 0 for all (checked every log)."""
    if run.time_limit_minutes <= 0 or step % run.log_every:
        return False
    up = torch.tensor([float(time.perf_counter() - t0 > 60 * run.time_limit_minutes)])
    if world > 1 and torch.distributed.is_initialized():
        torch.distributed.broadcast(up, src=0)
    return bool(up.item())


def _device(local_mode: bool, rank: int) -> torch.device:
    """The GPU Ray assigned this worker (a clear error where CUDA cannot use it), else the
    CPU; in local mode (no worker group) Ray Train's choice for the driver process."""
    import ray.train.torch

    if local_mode:
        return ray.train.torch.get_device()
    from infra.gpus import ray_device

    return ray_device(f"Ray Train worker {rank}")


def _try_load_clip(stage: Stage, device: torch.device) -> Clip | None:
    try:
        return load_clip(stage, device)
    except Exception as e:  # noqa: BLE001 - evaluation works without it, minus one metric
        say(f"[{stage.config.stage}] CLIP not loadable for evaluation ({e})")
        return None


def _write_pid(run: TrainConfig, rank: int) -> None:
    """Test hook: with ``train.debug_pid_dir`` set, each worker writes ``rank<r>.pid``."""
    if run.debug_pid_dir:
        fs.write_text(fs.join(run.debug_pid_dir, f"rank{rank}.pid"), str(os.getpid()))
