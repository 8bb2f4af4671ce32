"""The one factory from a stage config to its model (docs/architecture.md)."""

from __future__ import annotations

from torch import nn

from unclip.ar_prior import ARPrior
from unclip.config import (
    ARPriorConfig,
    DecoderConfig,
    PriorConfig,
    StageConfig,
    UpsamplerConfig,
)
from unclip.decoder import Decoder
from unclip.prior import DiffusionPrior
from unclip.upsampler import Upsampler

StageModel = DiffusionPrior | ARPrior | Decoder | Upsampler


def build_model(config: StageConfig) -> StageModel:
    """Prior (diffusion or autoregressive), decoder or upsampler (randomly initialised)."""
    if isinstance(config, PriorConfig):
        return DiffusionPrior(config)
    if isinstance(config, ARPriorConfig):
        return ARPrior(config)
    if isinstance(config, DecoderConfig):
        return Decoder(config)
    if isinstance(config, UpsamplerConfig):
        return Upsampler(config)
    raise TypeError(f"not a stage config: {type(config).__name__}")


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
