"""The decoder stage: CLIP image embedding (+ optional text) -> base-resolution image.

Classifier-free guidance: the CLIP embedding is replaced by a learned null ``clip_drop_prob``
of the time and the text ``text_drop_prob`` of the time (the paper's 10% / 50%; docs/method.md). DDIM
inversion maps an image to the decoder latent x_T (the bipartite latent, docs/method.md "Manipulations").
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from unclip.conditioning import TextCond
from unclip.config import DecoderConfig
from unclip.diffusion import GaussianDiffusion, Generators, ModelFn, Progress, cfg_model_fn
from unclip.nn.unet import UNet


class Decoder(nn.Module):
    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.config = config
        self.net = UNet(config.net)
        self.diffusion = GaussianDiffusion.from_config(config.diffusion)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        n = self.config.net
        return (n.in_channels, n.image_size, n.image_size)

    def forward(self, images: Tensor, clip_emb: Tensor, text: TextCond | None = None) -> Tensor:
        """Training loss (scalar): images (B, 3, S, S) in [-1, 1], CLIP image emb (B, D)."""
        B = images.shape[0]
        t = self.diffusion.sample_timesteps(B, images.device)
        clip_drop = torch.rand(B, device=images.device) < self.config.clip_drop_prob
        text_drop = torch.rand(B, device=images.device) < self.config.text_drop_prob
        states, mask = (text.states, text.mask) if text is not None else (None, None)
        noise = None
        if self.config.clip_noise > 0:  # (B, D): std ~ U(0, clip_noise) per example
            std = torch.rand(B, 1, device=images.device) * self.config.clip_noise
            noise = std * torch.randn_like(clip_emb, dtype=torch.float32)

        def model_fn(x: Tensor, ts: Tensor) -> Tensor:
            return self.net(
                x, ts, clip_emb, states, mask,
                clip_drop=clip_drop, text_drop=text_drop, clip_noise=noise,
            )  # fmt: skip

        return self.diffusion.training_losses(model_fn, images, t).mean()

    def _model_fn(self, clip_emb: Tensor, text: TextCond | None, scale: float) -> ModelFn:
        return cfg_model_fn(
            self.net,
            scale,
            {
                "clip_emb": clip_emb,
                "text_states": text.states if text is not None else None,
                "text_mask": text.mask if text is not None else None,
            },
            drop_keys=("clip_drop", "text_drop"),
        )

    @torch.no_grad()
    def sample(
        self,
        clip_emb: Tensor,
        text: TextCond | None = None,
        steps: int | None = None,
        guidance_scale: float | None = None,
        eta: float | None = None,
        noise: Tensor | None = None,
        generator: Generators = None,
        progress: Progress | None = None,
        clip_denoised: bool | None = None,
    ) -> Tensor:
        """Images (B, 3, S, S) in [-1, 1] from CLIP image embeddings (B, D).

        ``noise`` fixes x_T (e.g. from ``invert``); ``eta`` > 0 adds fresh noise per step
        (variations). DDIM on a respaced schedule of ``steps`` steps.
        """
        cfg = self.config
        scale = cfg.guidance_scale if guidance_scale is None else guidance_scale
        eta = cfg.sample_eta if eta is None else eta
        diffusion = self.diffusion.respace(
            min(steps or cfg.sample_steps, self.diffusion.num_timesteps)
        )
        return diffusion.ddim_sample_loop(
            self._model_fn(clip_emb, text, scale),
            (clip_emb.shape[0], *self.image_shape),
            eta=eta,
            noise=noise,
            generator=generator,
            device=clip_emb.device,
            progress=progress,
            clip_denoised=clip_denoised,
        ).clamp(-1, 1)

    # The bipartite latent (unCLIP paper §3) and its decoding. DDIM inversion runs the
    # deterministic ODE forwards and DDIM decoding runs it backwards: they are inverses only
    # if both evaluate the same model function, so ``invert`` and ``decode_latent`` take the
    # same ``steps`` and ``guidance_scale`` (no defaults: a caller states the pair) and both
    # treat the predicted x0 the same way, by this one flag. Clamping x0 to [-1, 1] on the way
    # back only would change the ODE (an x0 prediction beyond the range is common at high
    # noise), so neither direction clamps and the end frames of a manipulation reconstruct.
    LATENT_CLIP_DENOISED = False

    @torch.no_grad()
    def invert(
        self,
        images: Tensor,
        clip_emb: Tensor,
        text: TextCond | None = None,
        *,
        steps: int,
        guidance_scale: float,
        fixed_point_iters: int = 1,
        progress: Progress | None = None,
    ) -> Tensor:
        """DDIM inversion: images (B, 3, S, S) in [-1, 1] + their CLIP embeddings (B, D) ->
        x_T (B, 3, S, S) such that ``decode_latent(clip_emb, x_T)`` with the same ``steps``
        and ``guidance_scale`` and eta 0 gives the images back."""
        diffusion = self.diffusion.respace(min(steps, self.diffusion.num_timesteps))
        return diffusion.ddim_invert(
            self._model_fn(clip_emb, text, guidance_scale),
            images,
            fixed_point_iters=fixed_point_iters,
            progress=progress,
            clip_denoised=self.LATENT_CLIP_DENOISED,
        )

    @torch.no_grad()
    def decode_latent(
        self,
        clip_emb: Tensor,
        x_T: Tensor,
        text: TextCond | None = None,
        *,
        steps: int,
        guidance_scale: float,
        eta: float = 0.0,
        generator: Generators = None,
        progress: Progress | None = None,
    ) -> Tensor:
        """Decode bipartite latents (z_i (B, D), x_T (B, 3, S, S) from ``invert`` with the
        same ``steps`` and ``guidance_scale``) -> images (B, 3, S, S) in [-1, 1]. eta 0
        reconstructs the inverted image; eta > 0 adds fresh noise per step (variations)."""
        return self.sample(
            clip_emb,
            text,
            steps=steps,
            guidance_scale=guidance_scale,
            eta=eta,
            noise=x_T,
            generator=generator,
            progress=progress,
            clip_denoised=self.LATENT_CLIP_DENOISED,
        )
