"""The diffusion prior's network: a decoder-only causal Transformer (docs/method.md, "Diffusion prior").

Sequence, in order: [encoded text tokens (optional), CLIP text embedding, timestep
embedding, noised CLIP image embedding, learned query]. The output at the query predicts the
clean (scaled) image embedding.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from unclip.config import PriorNetConfig
from unclip.nn.layers import (
    TimestepMLP,
    TransformerBlock,
    prepare_text_states,
    replace_where,
)


class PriorNetwork(nn.Module):
    def __init__(self, cfg: PriorNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        D, W = cfg.embed_dim, cfg.width
        self.text_emb_in = nn.Linear(D, W)
        self.image_in = nn.Linear(D, W)
        self.time_in = TimestepMLP(W, W)
        self.query = nn.Parameter(torch.randn(W) * 0.02)
        n_text = cfg.max_text_len if cfg.text_width else 0
        self.pos = nn.Parameter(torch.randn(n_text + 4, W) * 0.02)
        # learned null conditioning for classifier-free guidance
        self.null_text_emb = nn.Parameter(torch.randn(D) / D**0.5)
        if cfg.text_width:
            self.text_states_in = nn.Linear(cfg.text_width, W)
            self.null_text_states = nn.Parameter(torch.randn(n_text, cfg.text_width) * 0.02)
            self.pad_text_state = nn.Parameter(torch.randn(cfg.text_width) * 0.02)
        self.blocks = nn.ModuleList(
            TransformerBlock(W, cfg.heads, cfg.mlp_ratio, cfg.dropout) for _ in range(cfg.layers)
        )
        self.ln_out = nn.LayerNorm(W)
        self.out = nn.Linear(W, D)

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        text_emb: Tensor,
        text_states: Tensor | None = None,
        text_mask: Tensor | None = None,
        text_drop: Tensor | None = None,
    ) -> Tensor:
        """Predict the clean image embedding.

        Args:
            x: noised (scaled) image embedding (B, D).
            t: timesteps (B,).
            text_emb: (scaled) CLIP text embedding (B, D).
            text_states: CLIP per-token text states (B, L, text_width), L <= max_text_len.
            text_mask: (B, L) bool, True for real tokens (padding is replaced by a learned pad).
            text_drop: (B,) bool, True = use the learned null text conditioning (CFG).
        Returns:
            (B, D) predicted clean (scaled) image embedding.
        """
        cfg = self.cfg
        B, D = x.shape
        assert cfg.embed_dim == D and text_emb.shape == (B, D), (x.shape, text_emb.shape)
        text_emb = replace_where(text_drop, text_emb, self.null_text_emb)
        tokens = [
            self.text_emb_in(text_emb)[:, None],  # (B, 1, W)
            self.time_in(t)[:, None],
            self.image_in(x)[:, None],
            self.query.expand(B, 1, -1),
        ]
        if cfg.text_width:
            states = prepare_text_states(
                text_states,
                text_mask,
                text_drop,
                self.null_text_states,
                self.pad_text_state,
                B,
                x,
            )
            tokens.insert(0, self.text_states_in(states))  # (B, L, W)
        h = torch.cat(tokens, dim=1) + self.pos  # (B, L + 4, W)
        for block in self.blocks:
            h = block(h)
        return self.out(self.ln_out(h[:, -1]))
