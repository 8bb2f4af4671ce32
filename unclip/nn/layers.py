"""Small building blocks shared by the prior Transformer and the UNet."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps: (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class TimestepMLP(nn.Module):
    """Sinusoidal features -> MLP: (B,) -> (B, out_dim)."""

    def __init__(self, freq_dim: int, out_dim: int) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(
            nn.Linear(freq_dim, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim)
        )

    def forward(self, t: Tensor) -> Tensor:
        return self.mlp(timestep_embedding(t, self.freq_dim))


def zero_module(module: nn.Module) -> nn.Module:
    """Zero a module's parameters (residual branches start as the identity)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def replace_where(mask: Tensor | None, x: Tensor, null: Tensor) -> Tensor:
    """``null`` where ``mask`` (B,) is True, else ``x`` (B, ...); ``null`` broadcasts."""
    if mask is None:
        return x
    m = mask.reshape(-1, *([1] * (x.dim() - 1)))
    return torch.where(m, null.to(x.dtype).expand_as(x), x)


class CausalSelfAttention(nn.Module):
    def __init__(self, width: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.dropout = dropout

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape  # (B, T, C)
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class Checkpointable(nn.Module):
    """A block whose activations may be recomputed in backward instead of stored
    (activation checkpointing: memory per block ~ its inputs only, for about one more
    forward pass of compute). Subclasses implement ``block``; ``forward`` runs it, under
    ``torch.utils.checkpoint`` when ``checkpointing`` is on and gradients are being taken.
    Random draws inside the block (dropout) are replayed identically in the recomputation.
    """

    checkpointing: bool = False

    def block(self, *args: Tensor | None) -> Tensor:
        raise NotImplementedError

    def forward(self, *args: Tensor | None) -> Tensor:
        if self.checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(self.block, *args, use_reentrant=False)
        return self.block(*args)


def set_activation_checkpointing(model: nn.Module, on: bool = True) -> int:
    """Turn activation checkpointing on (or off) in every ``Checkpointable`` block of
    ``model`` (the UNet's levels, the priors' Transformer blocks); returns how many."""
    blocks = [m for m in model.modules() if isinstance(m, Checkpointable)]
    for m in blocks:
        m.checkpointing = on
    return len(blocks)


class TransformerBlock(Checkpointable):
    """Pre-LayerNorm causal Transformer block (GPT-2 style)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.ln1 = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads, dropout)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width), nn.Dropout(dropout)
        )

    def block(self, x: Tensor) -> Tensor:  # (B, T, C) -> (B, T, C)
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


def prepare_text_states(
    states: Tensor | None,
    mask: Tensor | None,
    drop: Tensor | None,
    null: Tensor,
    pad: Tensor,
    batch: int,
    like: Tensor,
) -> Tensor:
    """CLIP per-token text states -> fixed (B, L, C) conditioning, L = ``null.shape[0]``.

    Trims or pads to L, replaces padding (``mask`` False) with the learned ``pad`` vector,
    and rows with ``drop`` True by the learned ``null`` sequence (classifier-free guidance).
    Missing ``states`` means unconditional.
    """
    L, C = null.shape
    null, pad = null.to(like.dtype), pad.to(like.dtype)
    if states is None:
        return null.expand(batch, L, C)
    assert states.shape[0] == batch and states.shape[2] == C, (states.shape, (batch, L, C))
    states = states[:, :L].to(like.dtype)
    if mask is not None:
        states = torch.where(mask[:, :L, None], states, pad)
    if states.shape[1] < L:
        states = torch.cat([states, pad.expand(batch, L - states.shape[1], C)], dim=1)
    return replace_where(drop, states, null)
