"""Run options (``TrainConfig``) and the quick/full presets of every trainable stage.

A run is described by two frozen configs: the stage config (``unclip.config``: the model,
its diffusion and optimiser, saved as ``config.json`` with every checkpoint) and the
``TrainConfig`` below (steps, batch size, intervals, ...; saved beside it as
``train_config.json``). ``resolve`` builds both from a preset, an optional config file and
command-line flags:

    preset (quick|full, CPU or GPU sized)  <-  --config FILE  <-  --steps N

A config file (YAML or JSON) holds stage-config keys at the top level and run options
under ``train``; unknown keys are errors that name the key::

    optim: {lr: 0.001, warmup_steps: 200}
    net: {base_channels: 48}
    train: {steps: 3000, batch_size: 32, checkpoint_every: 500}

Sizes and steps of the CPU presets come from measurements (docs/benchmarks.md);
each preset states its expected time (measured with 1 worker, 2 threads, unloaded) and a
``time_limit_minutes`` after which the run stops early with a final checkpoint, so the demo
keeps its time budget on a slower machine.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any, Literal

from unclip import fs
from unclip.config import (
    ARPriorConfig,
    ARPriorNetConfig,
    ConfigError,
    DecoderConfig,
    DiffusionConfig,
    OptimConfig,
    PriorConfig,
    PriorNetConfig,
    StageConfig,
    UNetConfig,
    UpsamplerConfig,
    from_dict,
    merge,
    to_dict,
)
from unclip.split import HELDOUT_FRACTION

STAGES = ("prior", "ar_prior", "decoder", "upsampler")
PRESETS = ("quick", "full")
AmpChoice = Literal["auto", "none", "bf16", "fp16"]
ParallelChoice = Literal["ddp", "fsdp"]
FormatChoice = Literal["auto", "contiguous", "channels_last"]


@dataclass(frozen=True)
class TrainConfig:
    """How a stage is trained (not what it is): saved as ``train_config.json``."""

    steps: int = 1000  # optimiser steps in total (a resumed run continues up to this)
    batch_size: int = 32  # per worker; the global batch is batch_size * workers
    checkpoint_every: int = 250  # steps between checkpoints (the last step always gets one)
    eval_every: int = 250  # steps between evaluations on held-out rows (and the last step)
    log_every: int = 50  # steps between printed loss lines
    keep_checkpoints: int = 2  # CheckpointConfig(num_to_keep)
    max_failures: int = 3  # FailureConfig(max_failures): worker losses survived per run
    heldout_fraction: float = HELDOUT_FRACTION  # as `unclip eval`; raise only for tiny tables
    eval_rows: int = 256  # held-out rows used by an evaluation (prior cosine)
    eval_images: int = 8  # images in a sample grid (decoder / upsampler)
    shuffle_buffer: int = 2048  # rows in the local shuffle buffer of each worker
    cache_data: bool = True  # hold each worker's decoded training split in memory (small
    # tables; the driver falls back to streaming when it would not fit)
    # numerics: "auto" = time a few real steps under each choice on this machine and keep
    # the fastest (unclip.numerics; cached per machine); a value fixes it
    amp: AmpChoice = "auto"  # autocast dtype: none (fp32), bf16, fp16 (GPU only)
    memory_format: FormatChoice = "auto"  # of the UNets' activations: contiguous, channels_last
    threads: int = 0  # torch threads per worker; 0 = cores of the node / workers on it (and
    # with amp or memory_format "auto", half as many if that measures faster)
    cpus_per_worker: float = 0.0  # Ray CPUs per worker; 0 = leave a CPU for Ray Data
    time_limit_minutes: float = 0.0  # stop early (with a final checkpoint); 0 = no limit
    # large models (GPU clusters; all off by default; training/scale.py, docs/scaling.md)
    grad_accum: int = 1  # micro-batches per optimiser step: each worker's batch_size rows
    # run as this many forward/backward passes whose gradients add up (same update, less
    # activation memory; batch_size must divide evenly)
    activation_checkpointing: bool = False  # recompute UNet levels / prior blocks in backward
    compile: bool = False  # torch.compile the stage model (slow first steps while it compiles)
    parallel: ParallelChoice = "ddp"  # fsdp: shard weights, gradients and optimiser state
    # across the workers (FSDP2); needs GPUs (refused on CPU) and amp none or bf16
    seed: int = 0
    debug_nan_at_step: int = 0  # test hook: make the loss NaN at this step (0 = off)
    debug_pid_dir: str = ""  # test hook: each worker writes rank<r>.pid here

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "checkpoint_every", "eval_every", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.grad_accum < 1 or self.batch_size % self.grad_accum:
            raise ConfigError(
                f"train.grad_accum must be >= 1 and divide train.batch_size "
                f"({self.batch_size}), got {self.grad_accum}"
            )
        if self.keep_checkpoints < 1:
            raise ConfigError(f"train.keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        if not 0.0 < self.heldout_fraction < 0.5:
            raise ConfigError(
                f"train.heldout_fraction must be in (0, 0.5), got {self.heldout_fraction}"
            )


# ---------------------------------------------------------------------- presets
# Embedding sizes below fit the embedded default CLIP (embed 128, text width 128, context
# 32); ``training.cli`` adapts them to the table's CLIP unless a config file sets them.
_CLIP_DIM = 128
_TEXT_WIDTH = 128


def _prior(gpu: bool, name: str) -> PriorConfig:
    # Per-token text states lengthen the sequence from 4 to 4 + max_text_len tokens: on a
    # CPU that costs ~2.5x per step (plus the CLIP text tower), so the quick CPU preset
    # conditions on the text embedding only and the full one on 16 text tokens as well.
    tokens = gpu or name == "full"
    net = PriorNetConfig(
        embed_dim=_CLIP_DIM,
        text_width=_TEXT_WIDTH if tokens else 0,
        max_text_len=32 if gpu else 16,
        width=512 if gpu else 256,
        layers=12 if gpu else 4,
        heads=8 if gpu else 4,
    )
    return PriorConfig(
        net=net,
        diffusion=DiffusionConfig(prediction="x0", clip_denoised=False),
        optim=OptimConfig(lr=3e-4, weight_decay=1e-2, warmup_steps=100, lr_schedule="cosine"),
    )


def _ar_prior(gpu: bool, name: str) -> ARPriorConfig:
    # The paper's AR prior (PCA 319 of 1024 dims, 1024 buckets) scaled to a 128-d CLIP:
    # 32 components keep most of the variance of the shapes embeddings at a sequence of 33
    # tokens, which a CPU trains at ~0.1 s/step (batch 128, width 128, 3 layers).
    tokens = gpu or name == "full"
    net = ARPriorNetConfig(
        embed_dim=_CLIP_DIM,
        pca_dims=64 if gpu else 32,
        bins=256 if gpu else 64,
        text_width=_TEXT_WIDTH if tokens else 0,
        max_text_len=32 if gpu else 16,
        width=512 if gpu else 128,
        layers=12 if gpu else 3,
        heads=8 if gpu else 4,
    )
    return ARPriorConfig(
        net=net,
        optim=OptimConfig(lr=5e-4, weight_decay=1e-2, warmup_steps=100, lr_schedule="cosine"),
        guidance_scale=2.0,
    )


def _decoder(gpu: bool, name: str) -> DecoderConfig:
    net = UNetConfig(
        image_size=64 if gpu else 32,
        base_channels=64 if gpu else 32,
        channel_mult=(1, 2, 3, 4) if gpu else (1, 2, 2),
        num_res_blocks=2 if gpu else 1,
        attention_resolutions=(16, 8) if gpu else (8,),
        clip_dim=_CLIP_DIM,
        # the CLIP embedding whitened (every attribute at the same scale) and also projected
        # into a feature map at the lowest resolution: what to draw where. Measured on the
        # quick table (bench/bench_decoder_recipe.py, ground-truth embeddings, 1000 steps):
        # shape 0.80 and all attributes 0.77 with both, 0.22 / 0.20 with the map alone, at
        # chance (0.20-0.25) with neither; see docs/training.md
        clip_whiten=True,
        clip_spatial=True,
    )
    return DecoderConfig(
        net=net,
        # plain v-prediction loss: min-SNR weighting (x0-space weight min(SNR, 5)) starves
        # the low-SNR steps where an image's layout is decided; with it position stayed at
        # chance after 1500 steps, without it 0.98
        diffusion=DiffusionConfig(prediction="v"),
        optim=OptimConfig(lr=1e-3 if gpu else 3e-3, warmup_steps=100, lr_schedule="constant"),
    )


def _upsampler(gpu: bool, name: str) -> UpsamplerConfig:
    net = UNetConfig(
        image_size=256 if gpu else 64,
        base_channels=64 if gpu else 32,
        channel_mult=(1, 2, 2),
        attention_resolutions=(),
        low_res_channels=3,
    )
    return UpsamplerConfig(
        net=net,
        low_res_size=64 if gpu else 32,
        crop_size=64 if gpu else 32,  # train on crops; sample on the whole image
        # x0-prediction of the residual over bicubic: at 300 steps (quick) PSNR on blurred
        # 32 px inputs 39.3 dB vs bicubic 30.7 (clean inputs 33.6 vs 33.4); eps-prediction
        # of the image itself left visible noise (10.3 dB) and v + min-SNR 32.5 at 700 steps
        diffusion=DiffusionConfig(prediction="x0"),
        # blur sigma ~ U(0, 0.6) per image instead of the paper's fixed 0.6: trained on one
        # blur level the model over-sharpened sharp inputs (quick, 250 steps: clean inputs
        # 33.96 dB vs bicubic 34.34); with random sigma 39.95 vs 32.9 on clean inputs and
        # 36.07 vs 30.22 on sigma-0.6 inputs (fixed: 40.4 vs 31.3)
        blur_random=True,
        optim=OptimConfig(lr=1e-3, warmup_steps=100),
    )


_STAGE_BUILDERS = {
    "prior": _prior,
    "ar_prior": _ar_prior,
    "decoder": _decoder,
    "upsampler": _upsampler,
}

# (stage, preset) -> run options on a 2-core CPU. Comments: measured seconds per step and
# the resulting expected time (1 worker, 2 threads, machine otherwise idle, with the numerics
# the probe picks: bench/bench_train.py). Time limits are safety nets at about twice the
# expected time on the slowest CPU of this kind: the demo reports any stage they cut.
_CPU_RUNS: dict[tuple[str, str], TrainConfig] = {
    # prior: 0.09 s/step at batch 128 (fp32 0.12; ~0.2 with 16 text tokens) -> quick ~1 min
    # (quick: held-out cosine 0.931 at 500 steps, 0.926 at 1000; baseline 0.916)
    ("prior", "quick"): TrainConfig(
        steps=400, batch_size=128, checkpoint_every=200, eval_every=400, log_every=50,
        time_limit_minutes=3,
    ),
    ("prior", "full"): TrainConfig(
        steps=2000, batch_size=128, checkpoint_every=500, eval_every=1000, log_every=200,
        time_limit_minutes=10,
    ),
    # AR prior: 0.13 s/step at batch 128 -> quick ~2 min, full ~6 min
    ("ar_prior", "quick"): TrainConfig(
        steps=1000, batch_size=128, checkpoint_every=500, eval_every=500, log_every=100,
        time_limit_minutes=5,
    ),
    ("ar_prior", "full"): TrainConfig(
        steps=2500, batch_size=128, checkpoint_every=500, eval_every=1250, log_every=250,
        time_limit_minutes=12,
    ),
    # decoder, batch 32: 0.21 s/step bf16 (AMX), 0.32 fp32 channels-last; ~0.46-0.54 fp32 on
    # a Xeon without AMX; batch 16: 0.155 s/step bf16 (AMX, in the demo), ~0.3 without AMX.
    # Three seeds each (plain loop, AMX Xeon, bf16, the 600-step CLIP's table, ground-truth
    # embeddings, 96 held-out rows): batch 32 x 900 steps colour 0.92 / 0.96 / 0.92, shape
    # 0.67 / 0.51 / 0.57; batch 16 x 1200 colour 0.90 / 0.76 / 0.68, shape 0.58 / 0.62 /
    # 0.32 (cosine lr 0.89 / 0.77 / 0.74, 0.45 / 0.53 / 0.63). Batch 16 had won a
    # single-seed comparison; across seeds it is a lottery. 900 x 32 costs 1.19x the steps'
    # time of 1200 x 16 with AMX (interleaved, 0.289 vs 0.181 s/step), ~1.5x without.
    ("decoder", "quick"): TrainConfig(
        steps=900, batch_size=32, checkpoint_every=300, eval_every=900, log_every=50,
        time_limit_minutes=16,
    ),
    ("decoder", "full"): TrainConfig(
        steps=4000, batch_size=32, checkpoint_every=1000, eval_every=2000, log_every=100,
        time_limit_minutes=60,
    ),
    # upsampler on 32 px crops: 0.24 s/step bf16 (AMX), ~0.55 fp32 elsewhere
    ("upsampler", "quick"): TrainConfig(
        steps=150, batch_size=32, checkpoint_every=75, eval_every=150, log_every=25,
        time_limit_minutes=5,
    ),
    ("upsampler", "full"): TrainConfig(
        steps=1000, batch_size=32, checkpoint_every=500, eval_every=1000, log_every=100,
        time_limit_minutes=15,
    ),
}  # fmt: skip


# On a GPU: bigger models and batches, same structure, streamed data, no time limit.
def _gpu(steps: int, batch: int, every: int) -> TrainConfig:
    return TrainConfig(
        steps=steps,
        batch_size=batch,
        checkpoint_every=every,
        eval_every=every,
        log_every=100,
        cache_data=False,
    )


_GPU_RUNS: dict[tuple[str, str], TrainConfig] = {
    ("prior", "quick"): _gpu(5000, 512, 1000),
    ("prior", "full"): _gpu(50000, 512, 5000),
    ("ar_prior", "quick"): _gpu(5000, 512, 1000),
    ("ar_prior", "full"): _gpu(50000, 512, 5000),
    ("decoder", "quick"): _gpu(5000, 64, 1000),
    ("decoder", "full"): _gpu(100000, 64, 5000),
    ("upsampler", "quick"): _gpu(3000, 32, 1000),
    ("upsampler", "full"): _gpu(50000, 32, 5000),
}


def preset(stage: str, name: str = "quick", gpu: bool = False) -> tuple[StageConfig, TrainConfig]:
    """The stage config and run options of preset ``name`` for ``stage``."""
    if stage not in STAGES:
        raise ConfigError(f"unknown stage {stage!r}; valid stages: {', '.join(STAGES)}")
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
    runs = _GPU_RUNS if gpu else _CPU_RUNS
    return _STAGE_BUILDERS[stage](gpu, name), runs[(stage, name)]


# ---------------------------------------------------------------------- resolution
def load_config_file(uri: str) -> dict[str, Any]:
    """Read a YAML or JSON config file (local or s3://) into a dict."""
    text = fs.read_text(uri)
    try:
        if uri.endswith(".json"):
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except (ValueError, ImportError) as e:  # json.JSONDecodeError / yaml.YAMLError
        raise ConfigError(f"{uri}: not valid YAML/JSON: {e}") from None
    except Exception as e:  # noqa: BLE001 - yaml.YAMLError has no common base with ValueError
        raise ConfigError(f"{uri}: not valid YAML/JSON: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{uri}: expected a mapping of config keys, got {type(data).__name__}")
    return data


def split_overrides(stage: str, data: dict[str, Any], where: str) -> tuple[dict, dict]:
    """(stage-config overrides, run-option overrides) from a config file's contents."""
    data = dict(data)
    file_stage = data.pop("stage", stage)
    if file_stage != stage:
        raise ConfigError(f"{where}: is a config for stage {file_stage!r}, not {stage!r}")
    run = data.pop("train", {}) or {}
    if not isinstance(run, dict):
        raise ConfigError(f"{where}: 'train' must be a mapping of run options")
    return data, run


def resolve(
    stage: str,
    preset_name: str = "quick",
    gpu: bool = False,
    overrides: dict[str, Any] | None = None,
    steps: int | None = None,
    where: str = "config",
) -> tuple[StageConfig, TrainConfig]:
    """Preset <- config-file overrides <- ``--steps``; strict (unknown keys raise)."""
    cfg, run = preset(stage, preset_name, gpu)
    stage_over, run_over = split_overrides(stage, overrides or {}, where)
    try:
        cfg = merge(cfg, stage_over)
        run = from_dict(TrainConfig, {**to_dict(run), **run_over}, "train")
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    if steps is not None:
        run = with_steps(run, steps)
    return cfg, run


def with_steps(run: TrainConfig, steps: int) -> TrainConfig:
    if steps < 1:
        raise ConfigError(f"--steps must be >= 1, got {steps}")
    return replace(run, steps=steps)


def train_config_from_dict(data: dict[str, Any]) -> TrainConfig:
    return from_dict(TrainConfig, data, "train")


def train_config_to_dict(run: TrainConfig) -> dict[str, Any]:
    return to_dict(run)


def explicit_keys(overrides: dict[str, Any], prefix: str = "") -> set[str]:
    """Dotted names of every leaf a config file sets, e.g. {"net.embed_dim", "optim.lr"}."""
    keys: set[str] = set()
    for k, v in overrides.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            keys |= explicit_keys(v, name + ".")
        else:
            keys.add(name)
    return keys
