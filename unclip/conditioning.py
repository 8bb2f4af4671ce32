"""The text conditioning every stage may read, as one small value object."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class TextCond:
    """CLIP text conditioning for a batch.

    emb: (B, D) L2-normalised CLIP text embeddings.
    states: (B, L, W) per-token text states, or None.
    mask: (B, L) bool, True for real tokens, or None.
    """

    emb: Tensor
    states: Tensor | None = None
    mask: Tensor | None = None

    def __len__(self) -> int:
        return self.emb.shape[0]

    def repeat(self, n: int) -> TextCond:
        """Each row repeated ``n`` times consecutively: (B, ...) -> (B * n, ...)."""
        rep = lambda x: None if x is None else x.repeat_interleave(n, dim=0)  # noqa: E731
        return TextCond(rep(self.emb), rep(self.states), rep(self.mask))

    def to(self, device: torch.device | str) -> TextCond:
        mv = lambda x: None if x is None else x.to(device)  # noqa: E731
        return TextCond(mv(self.emb), mv(self.states), mv(self.mask))

    def index(self, idx: Tensor | slice) -> TextCond:
        sel = lambda x: None if x is None else x[idx]  # noqa: E731
        return TextCond(sel(self.emb), sel(self.states), sel(self.mask))
