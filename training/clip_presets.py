"""The small CLIP's configs (model and run) and its quick/full presets.

``ClipModelConfig`` describes an open_clip ``CLIP`` in a few named fields and turns into the
keyword arguments of ``open_clip.model.CLIP`` (``to_open_clip``), which is what the checkpoint's
``config.json`` stores, so ``unclip.clip.Clip.load`` rebuilds it like any open_clip model.
``ClipTrainConfig`` holds the model config and how it is trained.

``resolve`` builds the run config from a preset, an optional config file and ``--steps``::

    preset (quick|full)  <-  --config FILE (YAML or JSON, same keys as ClipTrainConfig)  <-  --steps

e.g. a config file ``{"lr": 0.001, "model": {"vision": "vit", "patch_size": 8}}``. Unknown
keys are errors naming the key.

Preset sizes come from measurements on a 2-core CPU (bench/bench_clip.py): after 150 steps
of batch 128, open_clip's ModifiedResNet tower (width 16) read position 0.99 and shape
0.44 zero-shot (0.73 by retrieval) where a patch-8 ViT (width 128 x 3) of ~0.8x the step
cost read 0.21 and 0.29: convolutions and attention pooling over a 2x2 map keep shape and
position, which the ViT learns slowly. The step counts fit the time budgets with one worker.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Literal

from unclip.config import ConfigError, from_dict, merge, to_dict

Vision = Literal["vit", "resnet"]
ShapesEval = Literal["auto", "on", "off"]
PRESETS = ("quick", "full")


@dataclass(frozen=True)
class ClipModelConfig:
    """A small open_clip CLIP. ``vision="resnet"`` is open_clip's ModifiedResNet (conv stem,
    four bottleneck stages, attention pooling); ``"vit"`` a VisionTransformer with a class
    token. The text tower is open_clip's causal text transformer (argmax/EOT pooling)."""

    embed_dim: int = 128
    image_size: int = 64
    vision: Vision = "resnet"
    vision_width: int = 16  # resnet: stem width (stage i has width * 2**i * 4 channels)
    vision_layers: tuple[int, ...] = (1, 1, 1, 1)  # resnet: blocks per stage; vit: (layers,)
    vision_head_width: int = 64
    patch_size: int = 8  # vit only
    text_width: int = 128
    text_layers: int = 3
    text_heads: int = 4
    context_length: int = 32
    vocab_size: int = 49408  # open_clip's SimpleTokenizer: fixed

    def __post_init__(self) -> None:
        if self.vision == "resnet":
            if len(self.vision_layers) != 4:
                raise ConfigError(f"resnet vision_layers needs 4 stages, got {self.vision_layers}")
            if self.image_size % 32:
                raise ConfigError(
                    f"resnet image_size must be a multiple of 32, got {self.image_size}"
                )
        elif len(self.vision_layers) != 1:
            raise ConfigError(f"vit vision_layers is (layers,), got {self.vision_layers}")
        elif self.image_size % self.patch_size:
            raise ConfigError(
                f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
            )
        if self.text_width % self.text_heads:
            raise ConfigError(f"text_width {self.text_width} not divisible by {self.text_heads}")

    def to_open_clip(self) -> dict[str, Any]:
        """Keyword arguments of ``open_clip.model.CLIP`` (JSON-ready)."""
        if self.vision == "resnet":
            vision: dict[str, Any] = {
                "image_size": self.image_size,
                "layers": list(self.vision_layers),
                "width": self.vision_width,
                "head_width": self.vision_head_width,
            }
        else:
            vision = {
                "image_size": self.image_size,
                "layers": self.vision_layers[0],
                "width": self.vision_width,
                "head_width": self.vision_head_width,
                "patch_size": self.patch_size,
            }
        return {
            "embed_dim": self.embed_dim,
            "vision_cfg": vision,
            "text_cfg": {
                "context_length": self.context_length,
                "vocab_size": self.vocab_size,
                "width": self.text_width,
                "heads": self.text_heads,
                "layers": self.text_layers,
            },
        }


@dataclass(frozen=True)
class ClipTrainConfig:
    """What to train and how. ``batch_size`` is the global batch (all workers together): the
    contrastive loss sees that many negatives whatever the number of workers."""

    model: ClipModelConfig = field(default_factory=ClipModelConfig)
    steps: int = 1000
    batch_size: int = 128
    lr: float = 2e-3
    min_lr_ratio: float = 0.05  # cosine decay down to lr * min_lr_ratio
    warmup_steps: int = 50
    weight_decay: float = 0.1  # not on norms, biases, embeddings, logit scale
    grad_clip: float = 1.0
    upsample_fraction: float = 0.25  # images trained as 32 px bicubically upsampled to 64
    hard_negatives: int = 0  # shapes folders (attributes.parquet): batches of groups of this
    # many images that differ only in their shape (0 = random batches; see clip_data)
    seed: int = 0
    threads: int = 0  # torch threads per worker (0: cores of the node / workers on it)
    # numerics: "auto" = time a few real steps under each choice on this machine and keep
    # the fastest (unclip.numerics, cached per machine); a value fixes it
    amp: Literal["auto", "none", "bf16", "fp16"] = "auto"
    memory_format: Literal["auto", "contiguous", "channels_last"] = "auto"
    cpus_per_worker: float = 0.5  # Ray resources: 2 workers fit on 2 CPUs
    max_failures: int = 2  # FailureConfig: restarts from the last checkpoint
    log_every: int = 25
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    time_limit_minutes: float = 0.0  # stop early with a final checkpoint (0: no limit)
    eval_images: int = 1000  # held-out renders (shapes) for zero-shot and retrieval
    eval_seed: int = 1_000_003  # shapes seed of the held-out renders (no training set uses it)
    eval_shapes: ShapesEval = "auto"  # auto: when the folder has attributes.parquet
    eval_captions_per_combo: int = 4  # prompt ensemble size per attribute tuple (zero-shot)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "log_every", "checkpoint_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.hard_negatives < 0 or (
            self.hard_negatives and self.batch_size % self.hard_negatives
        ):
            raise ConfigError(
                f"hard_negatives must be 0 or divide batch_size {self.batch_size}, "
                f"got {self.hard_negatives}"
            )
        if not 0 <= self.upsample_fraction <= 1:
            raise ConfigError(f"upsample_fraction must be in [0, 1], got {self.upsample_fraction}")
        if self.lr <= 0 or self.warmup_steps < 0:
            raise ConfigError("lr must be > 0 and warmup_steps >= 0")


# Sized for a quiet 2-core CPU, 1 worker x 2 threads: the default resnet tower (width 16)
# takes ~1.3x the 0.7 s per batch of 128 of a plain small ViT (docs/benchmarks.md, "Sizing the CPU presets") (bench/bench_clip.py
# --timing, steps interleaved), so ~0.9 s. Reading 20k images, starting the worker and
# evaluating take ~1 minute besides. The time limits keep the
# budgets on a slower or busier machine (fewer steps, a final checkpoint all the same).
# Quick (2026-12, ~0.3-0.5 s per step on a 2-core Xeon). The decoder can only draw the
# shape a CLIP image embedding encodes: after 240 steps a linear probe read the shape from
# the image embeddings 81% of the time (zero-shot 0.76) and the quick decoder's ground-truth
# shape accuracy was 0.53 after 1000 steps; after 480 steps, 95% (zero-shot 0.96) and 0.80.
# Pairs of images that differ only in shape in every batch (hard_negatives 2) raised
# zero-shot shape from 0.96 to 0.98 at 480 steps and cost nothing. The time limits are
# safety nets at about twice the expected time on the slowest CPU of this kind.
# The quick run's zero-shot check renders 400 held-out images instead of 1000 (~30 s less
# on a CPU without AMX; a shape accuracy of 0.95 is then known to about +-0.01).
# Quick: 600 steps (was 400; Xeon without AMX, 2026-12-03, same data): zero-shot shape
# 0.993 (0.965 at 400) and the quick decoder's ground-truth shape after 1000 steps 0.57
# (0.50 on the 400-step CLIP's table), so the decoder needs fewer steps: 200 CLIP steps
# (~100 s) buy back 300 decoder steps (~90 s). Groups of 4 shape variants per batch
# (hard_negatives 4) instead of pairs lost position (zero-shot 0.81) and kept shape at 0.95.
_QUICK = ClipTrainConfig(
    steps=600, warmup_steps=40, hard_negatives=2, time_limit_minutes=10, eval_images=400
)
_FULL = ClipTrainConfig(steps=1200, warmup_steps=60, hard_negatives=2, time_limit_minutes=20)
_PRESETS = {"quick": _QUICK, "full": _FULL}


def preset(name: str) -> ClipTrainConfig:
    if name not in _PRESETS:
        raise ConfigError(f"unknown preset {name!r}; valid: {', '.join(PRESETS)}")
    return _PRESETS[name]


def resolve(
    preset_name: str, overrides: dict[str, Any] | None = None, steps: int | None = None
) -> ClipTrainConfig:
    """Preset <- overrides (a config file's contents) <- steps."""
    cfg = preset(preset_name)
    if overrides:
        cfg = merge(cfg, overrides)
    if steps is not None:
        cfg = replace(cfg, steps=steps)
    return cfg


def config_to_dict(cfg: ClipTrainConfig) -> dict[str, Any]:
    return to_dict(cfg)


def config_from_dict(data: dict[str, Any]) -> ClipTrainConfig:
    return from_dict(ClipTrainConfig, data)
