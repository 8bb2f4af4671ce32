"""Options for models larger than a CPU preset (GPU clusters): how a worker's model is
prepared for training and how a batch is split into micro-batches.

All are ``TrainConfig`` fields, off by default (docs/scaling.md):

    grad_accum                each worker's batch runs as this many micro-batches whose
                              gradients add up before one optimiser step (``micro_batches``)
    activation_checkpointing  UNet levels / prior Transformer blocks recompute their
                              activations in backward (``unclip.nn.layers.Checkpointable``)
    compile                   ``torch.compile`` of the stage's network, in place (state-dict
                              keys unchanged, so checkpoints stay interchangeable)
    parallel                  "ddp" (Ray Train's ``prepare_model``) or "fsdp" (refused with a
                              message where this loop cannot run it: ``check_parallel``)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from training.presets import TrainConfig
from unclip.config import ConfigError
from unclip.nn.layers import set_activation_checkpointing

Batch = dict[str, torch.Tensor]


def micro_batches(batch: Batch, parts: int) -> list[Batch]:
    """``batch`` (every value (B, ...)) split into ``parts`` equal micro-batches in order."""
    if parts == 1:
        return [batch]
    size = len(next(iter(batch.values())))
    if size % parts:
        raise ValueError(f"a batch of {size} rows does not split into {parts} micro-batches")
    step = size // parts
    return [{k: v[i : i + step] for k, v in batch.items()} for i in range(0, size, step)]


def check_parallel(run: TrainConfig, device: torch.device) -> None:
    """Refuse options this machine or this loop cannot run, before any worker trains.

    FSDP: the loop keeps an EMA of every weight and writes whole-model checkpoints on rank
    0; with sharded weights both need gathers on every rank at every save and evaluation,
    which the loop does not do yet. Until it does, ``parallel: fsdp`` is refused with the
    way out (DDP plus activation checkpointing and gradient accumulation), not run wrongly.
    """
    if run.parallel == "fsdp":
        where = "on CPU (gloo)" if device.type == "cpu" else f"on {device.type}"
        raise ConfigError(
            f"train.parallel 'fsdp' is not supported by this training loop {where} yet: its "
            "EMA weights and rank-0 checkpoints need unsharded weights. Use train.parallel "
            "'ddp' with train.activation_checkpointing and train.grad_accum to fit a larger "
            "model per GPU (docs/scaling.md, 'Models larger than one GPU')"
        )


def prepare(model: nn.Module, run: TrainConfig) -> nn.Module:
    """Apply the memory / speed options that change the bare model in place; returns it."""
    if run.activation_checkpointing and not set_activation_checkpointing(model):
        raise ConfigError(
            f"train.activation_checkpointing: {type(model).__name__} has no blocks that support it"
        )
    if run.compile:
        # the network only (in place: state-dict keys unchanged): the diffusion wrapper's
        # random draws (timesteps, noise, CFG drops) stay eager, so a compiled run draws
        # the same numbers as an eager one (inductor's own RNG would not)
        net = getattr(model, "net", None)
        (net if isinstance(net, nn.Module) else model).compile()
    return model


def wrap(model: nn.Module, run: TrainConfig) -> Any:
    """The data-parallel wrapper the loss is computed with (Ray Train's ``prepare_model``:
    DDP with more than one worker, the model itself with one)."""
    import ray.train.torch

    return ray.train.torch.prepare_model(model, parallel_strategy=run.parallel)
