"""Image manipulations with the bipartite latent (z_i, x_T) (docs/method.md, "Manipulations").

Any image x maps to (z_i, x_T): z_i from the CLIP image encoder, x_T by DDIM inversion of
the decoder conditioned on z_i. Then:
- variations: decode (z_i, x_T) with DDIM eta > 0 (``UnclipPipeline.variations``);
- interpolation: slerp between z_i1 and z_i2, with the decoder noise either slerped between
  the two inverted x_T or held fixed;
- text diffs: z_d = norm(z_t - z_t0), decode slerp(z_i, z_d, theta) with x_T fixed, theta
  from 0 up to ``max_strength`` (about 0.25-0.5).
"""

from __future__ import annotations

import time
from dataclasses import replace

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from unclip.pipeline import (
    Generation,
    UnclipPipeline,
    encode_prompts,
    from_pil,
    image_seeds,
    prior_device,
    sample_decoder,
    sample_upsampler,
    to_uint8,
)


def slerp(a: Tensor, b: Tensor, t: float | Tensor) -> Tensor:
    """Spherical interpolation between rows of ``a`` and ``b`` (any norms), t in [0, 1].

    Interpolates direction by angle and norm linearly; falls back to lerp for (anti)parallel
    rows. Shapes (B, ...) flattened per row.
    """
    shape = a.shape
    a2, b2 = a.reshape(shape[0], -1).double(), b.reshape(shape[0], -1).double()
    t = torch.as_tensor(t, dtype=torch.float64, device=a.device).reshape(-1, 1)
    na, nb = a2.norm(dim=1, keepdim=True), b2.norm(dim=1, keepdim=True)
    ua, ub = a2 / na.clamp(min=1e-12), b2 / nb.clamp(min=1e-12)
    omega = torch.arccos((ua * ub).sum(1, keepdim=True).clamp(-1, 1))
    so = torch.sin(omega)
    safe = so.abs() > 1e-6
    direction = torch.where(
        safe,
        (torch.sin((1 - t) * omega) * ua + torch.sin(t * omega) * ub) / so.where(safe, 1.0),
        (1 - t) * ua + t * ub,
    )
    out = direction * ((1 - t) * na + t * nb)
    return out.reshape(shape).to(a.dtype)


def interpolation_latents(
    za: Tensor, xa: Tensor, zb: Tensor, xb: Tensor, frames: int, fixed_noise: bool = False
) -> tuple[Tensor, Tensor]:
    """Bipartite latents of two images (z (1, D), x_T (1, 3, S, S) each) -> ``frames`` rows
    (z (F, D), x_T (F, 3, S, S)) from a to b: z slerped (unit norm), x_T slerped or a's."""
    thetas = torch.linspace(0, 1, frames, device=za.device)
    z = F.normalize(slerp(za.expand(frames, -1), zb.expand(frames, -1), thetas), dim=-1)
    x_T = (
        xa.expand(frames, -1, -1, -1).clone()
        if fixed_noise
        else slerp(xa.expand(frames, -1, -1, -1), xb.expand(frames, -1, -1, -1), thetas)
    )
    return z, x_T


def text_diff_latents(
    z_i: Tensor, x_T: Tensor, to_emb: Tensor, from_emb: Tensor, frames: int, max_strength: float
) -> tuple[Tensor, Tensor]:
    """An image's latent (z_i (1, D), x_T (1, 3, S, S)) and two captions' CLIP text
    embeddings (1, D) -> ``frames`` rows: z = slerp(z_i, z_d, theta), theta in [0, max_strength],
    z_d = norm(to - from); x_T held fixed."""
    z_d = F.normalize(to_emb - from_emb, dim=-1).to(z_i.device)
    thetas = torch.linspace(0, max_strength, frames, device=z_i.device)
    z = F.normalize(slerp(z_i.expand(frames, -1), z_d.expand(frames, -1), thetas), dim=-1)
    return z, x_T.expand(frames, -1, -1, -1)


def bipartite_latent(
    pipe: UnclipPipeline, image: Image.Image, steps: int | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Image -> (x in [-1, 1] (1, 3, S, S), z_i (1, D), x_T (1, 3, S, S))."""
    s = pipe.settings
    x = from_pil(image, pipe.decoder.config.net.image_size).to(prior_device(pipe.decoder))
    z = pipe.clip.encode_images(x)
    x_T = pipe.decoder.invert(
        x, z, steps=steps or s.decoder_steps, guidance_scale=s.decoder_guidance_scale
    )
    return x, z, x_T


def _decode_frames(
    pipe: UnclipPipeline, z: Tensor, x_T: Tensor, seed: int, timings: dict[str, float]
) -> Tensor:
    """Decode (z, x_T) rows deterministically (eta = 0) and upsample."""
    s = pipe.settings
    seeds = image_seeds(seed, z.shape[0])
    t0 = time.perf_counter()
    det = replace(s, decoder_eta=0.0)
    images = sample_decoder(pipe.decoder, z, None, seeds, det, noise=x_T)
    timings["decoder"] = time.perf_counter() - t0
    for i, up in enumerate(pipe.upsamplers):
        t0 = time.perf_counter()
        images = sample_upsampler(up, images, seeds, s, i)
        timings[f"upsampler{i + 1}"] = time.perf_counter() - t0
    return images


@torch.no_grad()
def interpolate(
    pipe: UnclipPipeline,
    image_a: Image.Image,
    image_b: Image.Image,
    frames: int = 5,
    seed: int = 0,
    fixed_noise: bool = False,
) -> Generation:
    """``frames`` images from image_a to image_b: slerp of the CLIP image embeddings, with
    decoder latents slerped between the two inversions (or held at image_a's)."""
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    _, za, xa = bipartite_latent(pipe, image_a)
    _, zb, xb = bipartite_latent(pipe, image_b)
    timings["inversion"] = time.perf_counter() - t0
    z, x_T = interpolation_latents(za, xa, zb, xb, frames, fixed_noise)
    images = _decode_frames(pipe, z, x_T, seed, timings)
    return Generation(to_uint8(images), seed, timings, z.cpu())


@torch.no_grad()
def text_diff(
    pipe: UnclipPipeline,
    image: Image.Image,
    to_text: str,
    from_text: str = "a photo",
    frames: int = 5,
    max_strength: float = 0.5,
    seed: int = 0,
) -> Generation:
    """Edit an image towards ``to_text``: decode slerp(z_i, z_d, theta), z_d the normalised
    difference of the two captions' CLIP text embeddings, x_T fixed (docs/method.md)."""
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    _, z_i, x_T = bipartite_latent(pipe, image)
    timings["inversion"] = time.perf_counter() - t0
    text = encode_prompts(pipe.clip, [to_text, from_text], with_states=False)
    z, x_T = text_diff_latents(z_i, x_T, text.emb[0:1], text.emb[1:2], frames, max_strength)
    images = _decode_frames(pipe, z, x_T, seed, timings)
    return Generation(to_uint8(images), seed, timings, z.cpu())
