"""Exponential moving average of a model's weights (sampling uses the EMA weights)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class EMA:
    """Shadow copy of every floating-point parameter and buffer, in float32.

    With ``warmup`` the decay is ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates, so
    early averages are not dominated by the random initialisation.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = True) -> None:
        self.decay = decay
        self.warmup = warmup
        self.updates = 0
        self.shadow: dict[str, Tensor] = {
            k: v.detach().clone().float() if v.is_floating_point() else v.detach().clone()
            for k, v in model.state_dict().items()
        }

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = self.current_decay()
        for k, v in model.state_dict().items():
            s = self.shadow[k]
            if s.is_floating_point():
                s.lerp_(v.detach().float(), 1.0 - d)
            else:
                s.copy_(v)

    def state_dict(self) -> dict[str, Tensor]:
        """The averaged weights, in the model's own state_dict layout."""
        return {k: v.clone() for k, v in self.shadow.items()}

    def load_state_dict(self, state: dict[str, Tensor], updates: int) -> None:
        for k, v in state.items():
            self.shadow[k].copy_(v)
        self.updates = updates

    def copy_to(self, model: nn.Module) -> None:
        model.load_state_dict(self.shadow)
