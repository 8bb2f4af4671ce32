"""A diffusion upsampler stage: low-res image -> image at ``net.image_size``.

The network sees x_t concatenated with the bicubically upsampled low-res image. At train
time the low-res image is made from the target and corrupted (``degradation``); optionally
on random crops (the paper: 1/4 of the target size; docs/method.md), which the fully convolutional UNet
(no attention) allows. No text, no guidance. With ``residual`` (the default) the diffusion runs on the residual
``image - bicubic(low_res)``: the network only has to add the detail bicubic lacks, and an
undertrained one degrades to bicubic rather than to noise (measured on shapes: see
training/presets.py).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from unclip.config import UpsamplerConfig
from unclip.degrade import degrade, resize
from unclip.diffusion import GaussianDiffusion, Generators, Progress
from unclip.nn.unet import UNet


class Upsampler(nn.Module):
    def __init__(self, config: UpsamplerConfig) -> None:
        super().__init__()
        self.config = config
        self.net = UNet(config.net)
        self.diffusion = GaussianDiffusion.from_config(config.diffusion)

    @property
    def factor(self) -> int:
        return self.config.net.image_size // self.config.low_res_size

    def condition(self, low_res: Tensor, size: int) -> Tensor:
        """Bicubic upsampling of (B, 3, h, w) to (B, 3, size, size)."""
        return resize(low_res, size, mode="bicubic")

    def forward(self, images: Tensor) -> Tensor:
        """Training loss (scalar) for high-res images (B, 3, H, W) in [-1, 1]."""
        cfg = self.config
        hi = images
        if cfg.crop_size and cfg.crop_size < hi.shape[-1]:
            hi = random_crop(hi, cfg.crop_size)
        size = hi.shape[-1]
        low = resize(hi, size // self.factor, mode="bicubic")
        low = degrade(
            low, cfg.degradation, cfg.blur_sigma, cfg.blur_kernel, blur_random=cfg.blur_random
        )
        cond = self.condition(low, size)
        target = hi - cond if cfg.residual else hi
        t = self.diffusion.sample_timesteps(hi.shape[0], hi.device)
        return self.diffusion.training_losses(
            lambda x, ts: self.net(x, ts, low_res=cond), target, t
        ).mean()

    @torch.no_grad()
    def sample(
        self,
        low_res: Tensor,
        steps: int | None = None,
        eta: float | None = None,
        noise: Tensor | None = None,
        generator: Generators = None,
        progress: Progress | None = None,
    ) -> Tensor:
        """Upsample (B, 3, h, w) in [-1, 1] by ``factor``: (B, 3, h * f, w * f) in [-1, 1]."""
        cfg = self.config
        size = low_res.shape[-1] * self.factor
        cond = self.condition(low_res, size)
        diffusion = self.diffusion.respace(
            min(steps or cfg.sample_steps, self.diffusion.num_timesteps)
        )
        eta = cfg.sample_eta if eta is None else eta
        clamp = cfg.diffusion.clip_denoised
        out = diffusion.ddim_sample_loop(
            lambda x, ts: self.net(x, ts, low_res=cond),
            cond.shape,
            eta=eta,
            noise=noise,
            generator=generator,
            device=low_res.device,
            progress=progress,
            # a residual's valid range is [-1 - cond, 1 - cond]: clamp the image it makes
            denoised_fn=self._clamp_image(cond) if cfg.residual and clamp else None,
            clip_denoised=clamp and not cfg.residual,
        )
        return (cond + out if cfg.residual else out).clamp(-1, 1)

    @staticmethod
    def _clamp_image(cond: Tensor) -> Callable[[Tensor], Tensor]:
        """A predicted residual x0 -> the residual whose image cond + x0 is in [-1, 1]."""
        return lambda residual: (cond + residual).clamp(-1.0, 1.0) - cond


def random_crop(images: Tensor, size: int) -> Tensor:
    """The same-size random crop per image: (B, C, H, W) -> (B, C, size, size)."""
    B, _, H, W = images.shape
    tops = torch.randint(0, H - size + 1, (B,)).tolist()
    lefts = torch.randint(0, W - size + 1, (B,)).tolist()
    return torch.stack(
        [
            img[:, t : t + size, left : left + size]
            for img, t, left in zip(images, tops, lefts, strict=True)
        ]
    )
