"""The diffusion prior stage: caption (CLIP text) -> CLIP image embedding.

Trained with MSE on the clean (scaled) image embedding (x0 prediction, docs/method.md), text
conditioning dropped ``text_drop_prob`` of the time for classifier-free guidance. Sampling
draws ``candidates`` embeddings per caption and keeps the one with the highest dot product
with the text embedding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unclip.conditioning import TextCond
from unclip.config import PriorConfig
from unclip.diffusion import GaussianDiffusion, Generators, Progress, cfg_model_fn
from unclip.nn.prior import PriorNetwork


class DiffusionPrior(nn.Module):
    def __init__(self, config: PriorConfig) -> None:
        super().__init__()
        self.config = config
        self.net = PriorNetwork(config.net)
        self.diffusion = GaussianDiffusion.from_config(config.diffusion)
        self.scale = config.image_embed_scale or math.sqrt(config.net.embed_dim)

    def forward(self, image_emb: Tensor, text: TextCond) -> Tensor:
        """Training loss (scalar) for a batch of true (B, D) image embeddings and their text."""
        B = image_emb.shape[0]
        t = self.diffusion.sample_timesteps(B, image_emb.device)
        drop = torch.rand(B, device=image_emb.device) < self.config.text_drop_prob

        def model_fn(x: Tensor, ts: Tensor) -> Tensor:
            return self.net(x, ts, text.emb * self.scale, text.states, text.mask, text_drop=drop)

        return self.diffusion.training_losses(model_fn, image_emb * self.scale, t).mean()

    @torch.no_grad()
    def sample(
        self,
        text: TextCond,
        steps: int | None = None,
        guidance_scale: float | None = None,
        candidates: int | None = None,
        eta: float | None = None,
        generator: Generators = None,
        progress: Progress | None = None,
    ) -> Tensor:
        """Sample CLIP image embeddings (B, D), L2-normalised, one per text row.

        ``generator`` may be a list with one generator per text row (batch-independent).
        """
        cfg = self.config
        steps = steps or cfg.sample_steps
        scale = cfg.guidance_scale if guidance_scale is None else guidance_scale
        n = candidates or cfg.candidates
        eta = cfg.sample_eta if eta is None else eta
        B, D = text.emb.shape
        cond = text.repeat(n)  # (B * n, ...)
        if isinstance(generator, list | tuple):
            generator = [g for g in generator for _ in range(n)]
        diffusion = self.diffusion.respace(min(steps, self.diffusion.num_timesteps))
        model_fn = cfg_model_fn(
            self.net,
            scale,
            {"text_emb": cond.emb * self.scale, "text_states": cond.states, "text_mask": cond.mask},
            drop_keys=("text_drop",),
        )

        def renorm(x0: Tensor) -> Tensor:  # keep predictions on the sphere of CLIP embeddings
            return F.normalize(x0, dim=-1) * self.scale

        x = diffusion.ddim_sample_loop(
            model_fn,
            (B * n, D),
            eta=eta,
            generator=generator,
            device=text.emb.device,
            denoised_fn=renorm,
            progress=progress,
        )
        emb = F.normalize(x, dim=-1).reshape(B, n, D)
        # best of n: the candidate most aligned with its caption's text embedding
        best = (emb * text.emb[:, None]).sum(-1).argmax(dim=1)  # (B,)
        return emb[torch.arange(B, device=emb.device), best]
