"""The autoregressive prior (docs/method.md, "Autoregressive prior"), for the paper's prior ablation.

The CLIP image embedding z_i is reduced with PCA to ``pca_dims`` components, each quantised
into ``bins`` uniform buckets, and predicted token by token by a causal Transformer whose
sequence is [encoded text tokens, CLIP text embedding, dot token, z_1 .. z_k]. The dot token
is the quantised z_i . z_t; at inference it is sampled from the top ``dot_top_fraction`` of
its predicted distribution, steering samples towards embeddings that match the caption.
The PCA basis and bucket ranges are fitted on training data (``fit``) and stored as buffers,
so they travel in ``model.safetensors`` with the weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unclip.conditioning import TextCond
from unclip.config import ARPriorConfig
from unclip.diffusion import Generators
from unclip.nn.layers import TransformerBlock, prepare_text_states, replace_where


class ARPrior(nn.Module):
    def __init__(self, config: ARPriorConfig) -> None:
        super().__init__()
        self.config = config
        c = config.net
        D, W, k = c.embed_dim, c.width, c.pca_dims
        self.register_buffer("pca_mean", torch.zeros(D))
        self.register_buffer("pca_components", torch.zeros(k, D))
        self.register_buffer("code_lo", -torch.ones(k))
        self.register_buffer("code_hi", torch.ones(k))
        self.register_buffer("dot_range", torch.tensor([-1.0, 1.0]))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))
        self.text_emb_in = nn.Linear(D, W)
        self.null_text_emb = nn.Parameter(torch.randn(D) / D**0.5)
        n_text = c.max_text_len if c.text_width else 0
        if c.text_width:
            self.text_states_in = nn.Linear(c.text_width, W)
            self.null_text_states = nn.Parameter(torch.randn(n_text, c.text_width) * 0.02)
            self.pad_text_state = nn.Parameter(torch.randn(c.text_width) * 0.02)
        self.token_emb = nn.Embedding(c.bins, W)
        self.dot_emb = nn.Embedding(c.bins, W)
        self.pos = nn.Parameter(torch.randn(n_text + 2 + k, W) * 0.02)
        self.blocks = nn.ModuleList(
            TransformerBlock(W, c.heads, c.mlp_ratio, c.dropout) for _ in range(c.layers)
        )
        self.ln_out = nn.LayerNorm(W)
        self.head = nn.Linear(W, c.bins)

    # ------------------------------------------------------------------ codebook
    @torch.no_grad()
    def fit(self, image_emb: Tensor, text_emb: Tensor) -> float:
        """Fit the PCA basis and bucket ranges on training pairs (N, D); returns the fraction
        of the embeddings' variance the kept components explain."""
        k, bins = self.config.net.pca_dims, self.config.net.bins
        z = image_emb.double()
        mean = z.mean(0)
        _, s, vh = torch.linalg.svd(z - mean, full_matrices=False)
        comps = vh[:k]
        proj = (z - mean) @ comps.T  # (N, k)
        # robust ranges; half a bucket of margin so extremes land inside
        lo, hi = proj.quantile(0.001, dim=0), proj.quantile(0.999, dim=0)
        pad = (hi - lo) / (2 * bins)
        dots = (
            F.normalize(image_emb.double(), dim=-1) * F.normalize(text_emb.double(), dim=-1)
        ).sum(-1)
        self.pca_mean.copy_(mean)
        self.pca_components.copy_(comps)
        self.code_lo.copy_(lo - pad)
        self.code_hi.copy_(hi + pad)
        self.dot_range.copy_(torch.stack([dots.min(), dots.max()]))
        self.fitted.fill_(True)
        return float((s[:k] ** 2).sum() / (s**2).sum())

    def encode(self, image_emb: Tensor) -> Tensor:
        """(N, D) embeddings -> (N, k) bucket indices."""
        bins = self.config.net.bins
        proj = (image_emb.to(self.pca_mean.dtype) - self.pca_mean) @ self.pca_components.T
        u = (proj - self.code_lo) / (self.code_hi - self.code_lo)
        return (u * bins).floor().clamp(0, bins - 1).long()

    def decode(self, codes: Tensor) -> Tensor:
        """(N, k) bucket indices -> (N, D) L2-normalised embeddings (bucket centres)."""
        bins = self.config.net.bins
        centres = (
            self.code_lo
            + (codes.to(self.code_lo.dtype) + 0.5) * (self.code_hi - self.code_lo) / bins
        )
        return F.normalize((self.pca_mean + centres @ self.pca_components).float(), dim=-1)

    def dot_token(self, image_emb: Tensor, text_emb: Tensor) -> Tensor:
        bins = self.config.net.bins
        dot = (F.normalize(image_emb, dim=-1) * F.normalize(text_emb, dim=-1)).sum(-1)
        lo, hi = self.dot_range[0], self.dot_range[1]
        u = (dot - lo) / (hi - lo).clamp(min=1e-6)
        return (u * bins).floor().clamp(0, bins - 1).long()

    # ------------------------------------------------------------------ network
    def logits(self, text: TextCond, tokens: Tensor, text_drop: Tensor | None = None) -> Tensor:
        """Next-token logits. tokens: (B, n) = [dot, z_1 .. z_{n-1}], n <= k.

        Returns (B, n + 1, bins): position j predicts token j ([dot, z_1, ..., z_n]).
        """
        c = self.config.net
        B = text.emb.shape[0]
        emb = replace_where(text_drop, text.emb.to(self.pos.dtype), self.null_text_emb)
        parts = [self.text_emb_in(emb)[:, None]]  # (B, 1, W)
        if c.text_width:
            states = prepare_text_states(
                text.states,
                text.mask,
                text_drop,
                self.null_text_states,
                self.pad_text_state,
                B,
                self.pos,
            )
            parts.insert(0, self.text_states_in(states))
        if tokens.shape[1]:
            parts.append(self.dot_emb(tokens[:, :1]))
            parts.append(self.token_emb(tokens[:, 1:]))
        h = torch.cat(parts, dim=1)
        h = h + self.pos[: h.shape[1]]
        for block in self.blocks:
            h = block(h)
        prefix = h.shape[1] - tokens.shape[1] - 1
        return self.head(self.ln_out(h[:, prefix:]))

    def forward(self, image_emb: Tensor, text: TextCond) -> Tensor:
        """Training loss: cross-entropy of the dot token and the k codes (teacher forcing)."""
        assert bool(self.fitted), "call fit() on training embeddings before training"
        B = image_emb.shape[0]
        targets = torch.cat(
            [self.dot_token(image_emb, text.emb)[:, None], self.encode(image_emb)], dim=1
        )  # (B, k + 1)
        drop = torch.rand(B, device=image_emb.device) < self.config.text_drop_prob
        out = self.logits(text, targets[:, :-1], drop)
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), targets.reshape(-1))

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(
        self,
        text: TextCond,
        temperature: float | None = None,
        guidance_scale: float | None = None,
        dot_top_fraction: float | None = None,
        generator: Generators = None,
    ) -> Tensor:
        """(B, D) L2-normalised image embeddings, one per text row."""
        cfg = self.config
        temp = cfg.temperature if temperature is None else temperature
        scale = cfg.guidance_scale if guidance_scale is None else guidance_scale
        top = cfg.dot_top_fraction if dot_top_fraction is None else dot_top_fraction
        B = text.emb.shape[0]
        tokens = torch.zeros(B, 0, dtype=torch.long, device=text.emb.device)
        for j in range(cfg.net.pca_dims + 1):
            logits = self._guided_last_logits(text, tokens, scale) / max(temp, 1e-4)
            probs = logits.float().softmax(-1)
            if j == 0 and top < 1.0:
                probs = _keep_top_mass(probs, top)
            nxt = _categorical(probs, generator)
            tokens = torch.cat([tokens, nxt[:, None]], dim=1)
        return self.decode(tokens[:, 1:])

    def _guided_last_logits(self, text: TextCond, tokens: Tensor, scale: float) -> Tensor:
        if scale == 1.0:
            return self.logits(text, tokens)[:, -1]
        B = tokens.shape[0]
        both = TextCond(
            torch.cat([text.emb, text.emb]),
            None if text.states is None else torch.cat([text.states, text.states]),
            None if text.mask is None else torch.cat([text.mask, text.mask]),
        )
        drop = torch.cat([torch.zeros(B, dtype=torch.bool), torch.ones(B, dtype=torch.bool)])
        out = self.logits(both, torch.cat([tokens, tokens]), drop.to(tokens.device))[:, -1]
        c, u = out.chunk(2)
        return u + scale * (c - u)


def _keep_top_mass(probs: Tensor, fraction: float) -> Tensor:
    """Keep the highest-valued buckets (by index) holding ``fraction`` of the mass."""
    from_top = probs.flip(-1).cumsum(-1).flip(-1)  # mass at or above each bucket
    keep = from_top <= fraction
    # also keep the bucket straddling the boundary, so at least ``fraction`` is kept
    boundary = ((~keep).sum(-1) - 1).clamp(min=0)
    keep[torch.arange(probs.shape[0]), boundary] = True
    out = probs * keep
    return out / out.sum(-1, keepdim=True)


def _categorical(probs: Tensor, generator: Generators) -> Tensor:
    if isinstance(generator, list | tuple):
        return torch.cat(
            [
                torch.multinomial(p[None].cpu(), 1, generator=g)[:, 0]
                for p, g in zip(probs, generator, strict=True)
            ]
        ).to(probs.device)
    return torch.multinomial(probs.cpu(), 1, generator=generator)[:, 0].to(probs.device)
