"""Low-resolution conditioning and its train-time corruption for the upsamplers.

The paper (docs/method.md): the first upsampler sees Gaussian-blurred conditioning (kernel 3, sigma 0.6), the
second a BSR-style degradation (Zhang et al. 2021: random blur, resize, noise, JPEG). Both
make the upsampler robust to the artifacts of the stage below it. Images are in [-1, 1].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from unclip.config import DEGRADATIONS, check_choice


def resize(images: Tensor, size: int, mode: str = "bicubic") -> Tensor:
    """(B, C, H, W) -> (B, C, size, size); antialiased when shrinking, clamped to [-1, 1]."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    shrink = size < images.shape[-1]
    out = F.interpolate(
        images,
        size=(size, size),
        mode=mode,
        align_corners=False if mode != "nearest" else None,
        antialias=shrink and mode in ("bilinear", "bicubic"),
    )
    return out.clamp(-1, 1)


def gaussian_blur(images: Tensor, sigma: float | Tensor, kernel: int = 3) -> Tensor:
    """Separable Gaussian blur with reflect padding; ``sigma`` scalar or per-image (B,)."""
    B, C, H, W = images.shape
    sig = torch.as_tensor(sigma, dtype=torch.float32, device=images.device).reshape(-1)
    sig = sig.expand(B) if sig.numel() == 1 else sig
    x = torch.arange(kernel, dtype=torch.float32, device=images.device) - (kernel - 1) / 2
    k = torch.exp(-(x[None] ** 2) / (2 * sig[:, None].clamp(min=1e-3) ** 2))
    k = (k / k.sum(dim=1, keepdim=True)).to(images.dtype)  # (B, K)
    pad = kernel // 2
    # grouped conv: one kernel per image, shared over channels
    x_ = F.pad(images.reshape(1, B * C, H, W), (pad, pad, pad, pad), mode="reflect")
    kh = k.repeat_interleave(C, dim=0)[:, None, None, :]  # (B*C, 1, 1, K)
    kv = k.repeat_interleave(C, dim=0)[:, None, :, None]  # (B*C, 1, K, 1)
    x_ = F.conv2d(x_, kh, groups=B * C)
    x_ = F.conv2d(x_, kv, groups=B * C)
    return x_.reshape(B, C, H, W)


def bsr_degrade(images: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """A BSR-style random degradation of low-res images in [-1, 1] (random order-free chain:
    blur with random sigma, down-up resize with a random kernel, Gaussian noise, JPEG)."""
    B, C, H, W = images.shape
    g = generator

    def rand(n: int = B) -> Tensor:
        return torch.rand(n, generator=g).to(images.device)

    x = gaussian_blur(images, 0.1 + 1.9 * rand(), kernel=5)
    # down-up resize by a random factor in [1, 2] with a random interpolation mode
    factor = float(1 + rand(1).item())
    mode = ["bilinear", "bicubic", "area"][int(torch.randint(0, 3, (1,), generator=g))]
    small = max(4, int(round(H / factor)))
    x = F.interpolate(x, size=(small, small), mode=mode)
    x = F.interpolate(x, size=(H, W), mode="bicubic", align_corners=False)
    # Gaussian noise, std up to 0.1 (on [-1, 1] that is 5% of the range)
    x = x + 0.1 * rand()[:, None, None, None] * torch.randn(x.shape, generator=g).to(x.device)
    x = jpeg(x.clamp(-1, 1), quality=int(torch.randint(30, 96, (1,), generator=g)))
    return x.clamp(-1, 1)


def jpeg(images: Tensor, quality: int) -> Tensor:
    """JPEG round trip of (B, 3, H, W) images in [-1, 1]."""
    from torchvision.io import decode_jpeg, encode_jpeg

    u8 = ((images.detach().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    out = torch.stack([decode_jpeg(encode_jpeg(img, quality=quality)) for img in u8])
    return (out.float() / 127.5 - 1).to(images.device, images.dtype)


def degrade(
    images: Tensor,
    kind: str,
    blur_sigma: float = 0.6,
    blur_kernel: int = 3,
    generator: torch.Generator | None = None,
    blur_random: bool = False,
) -> Tensor:
    """Apply the named train-time corruption: ``none``, ``blur`` or ``bsr``.

    ``blur_random``: each image gets its own sigma ~ U(0, blur_sigma), so the model also
    sees sharp inputs (and learns not to over-sharpen them) instead of only one blur level.
    """
    check_choice("degradation", kind, DEGRADATIONS)
    if kind == "none":
        return images
    if kind == "blur":
        if not blur_random:
            return gaussian_blur(images, blur_sigma, blur_kernel)
        sigma = blur_sigma * torch.rand(images.shape[0], generator=generator)
        return gaussian_blur(images, sigma.to(images.device), blur_kernel)
    return bsr_degrade(images, generator)
