"""Plain-PyTorch pieces of CLIP training (no Ray): model, optimiser, schedule, one step,
and the resumable train state.

One step is open_clip's recipe: features of both towers, ``ClipLoss`` (symmetric InfoNCE
over the global batch when features are gathered across workers), AdamW with linear
warm-up then cosine decay, gradient clipping, and the logit scale clamped to ln(100).
"""

from __future__ import annotations

import math
from typing import Any

import open_clip
import torch
from torch import Tensor, nn

from training.clip_presets import ClipModelConfig, ClipTrainConfig

MAX_LOGIT_SCALE = math.log(100.0)
NO_DECAY_NAMES = ("token_embedding", "positional_embedding", "class_embedding", "logit_scale")


def build_clip(cfg: ClipModelConfig) -> open_clip.model.CLIP:
    return open_clip.model.CLIP(**cfg.to_open_clip())


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices and conv kernels only (not norms, biases, embeddings, scale)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or any(k in name for k in NO_DECAY_NAMES):
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def make_optimizer(model: nn.Module, cfg: ClipTrainConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6
    )


def lr_at(step: int, cfg: ClipTrainConfig) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine from ``lr`` to ``lr*min_lr_ratio``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    t = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * t))


def unwrap(model: nn.Module) -> nn.Module:
    """The CLIP inside a DDP wrapper (or the model itself)."""
    return model.module if hasattr(model, "module") else model


def train_step(
    model: nn.Module,
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    pixels: Tensor,
    tokens: Tensor,
    lr: float,
    grad_clip: float,
) -> float:
    """One optimiser step on a (local) batch: pixels (B, 3, S, S) normalised, tokens (B, L).

    Returns the loss (the same on every worker: ClipLoss is computed on the global batch).
    """
    for group in optimizer.param_groups:
        group["lr"] = lr
    image_features, text_features, logit_scale = model(pixels, tokens)  # (B, D), (B, D), ()
    loss = loss_fn(image_features, text_features, logit_scale)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"CLIP loss is {loss.item()}; lower lr (now {lr:g})")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    with torch.no_grad():
        unwrap(model).logit_scale.clamp_(0, MAX_LOGIT_SCALE)
    return float(loss.detach())


def train_state(model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> dict[str, Any]:
    """Tensors and plain containers only: loads with ``torch.load(weights_only=True)``."""
    return {
        "step": step,
        "model": {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "torch_rng": torch.get_rng_state(),
    }


def restore(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> int:
    """Load ``train_state`` into model and optimiser; returns the step to continue from."""
    unwrap(model).load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    return int(state["step"])
