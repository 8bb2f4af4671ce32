"""Image manipulations with the bipartite latent (z_i, x_T) (the unCLIP paper, section 3).

Any image x maps to (z_i, x_T): z_i from the CLIP image encoder (the original image at
CLIP's input size, prepared as the embedding ETL prepares it), x_T by DDIM inversion of the
decoder conditioned on z_i (the image at the decoder's size). Then:
- variations: decode (z_i, x_T) with DDIM eta > 0;
- interpolation: slerp between z_i1 and z_i2, with the decoder noise either slerped between
  the two inverted x_T or held fixed at the first;
- text diffs: z_d = norm(z_t - z_t0), decode slerp(z_i, z_d, theta) with x_T fixed, theta
  from 0 up to ``max_strength`` (about 0.25-0.5).
Inversion and decoding use the same steps and guidance scale and the same (no) clamping
(``Decoder.LATENT_CLIP_DENOISED``), so eta 0 with theta 0 gives the input image back.

Each manipulation is written once, as a coroutine over ``Stages``: the five model calls it
needs. ``LocalStages`` runs them in-process on an ``UnclipPipeline`` (the library and
``unclip vary`` / ``interpolate`` / ``text-diff``); the Serve ingress passes stages that call
its deployments. Same seed and settings, same pixels.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, TypeVar

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from unclip.config import SamplingSettings
from unclip.images import clip_pixels
from unclip.pipeline import (
    Generation,
    UnclipPipeline,
    decode_latents,
    encode_prompts_noting,
    from_pil,
    image_seeds,
    invert_decoder,
    prior_device,
    sample_upsampler,
    to_uint8,
)

VARIATIONS_ETA = 0.8  # DDIM eta of variations: 0 gives the image back, larger varies more
TEXT_DIFF_FROM = "a photo"  # z_t0 when the caption of the image is not given (unCLIP paper §3)
TEXT_DIFF_STRENGTH = 0.5  # the largest theta of a text diff


# ---------------------------------------------------------------------- latent arithmetic
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
    return z, x_T.expand(frames, -1, -1, -1).contiguous()


# ---------------------------------------------------------------------- inputs and stages
@dataclass(frozen=True)
class ImageInput:
    """One input image, prepared for both uses."""

    clip: Tensor  # (1, 3, Sc, Sc) in [-1, 1]: CLIP's input size, the ETL's preprocessing
    decoder: Tensor  # (1, 3, S, S) in [-1, 1]: the decoder's size, the inversion's target


def prepare_image(image: Image.Image, clip_size: int, decoder_size: int) -> ImageInput:
    """A PIL image at any size -> its CLIP input (as the ETL made the training embeddings)
    and its decoder-size tensor (as training decoded the table's images)."""
    return ImageInput(clip_pixels(image, clip_size), from_pil(image, decoder_size))


class Stages(Protocol):
    """The model calls a manipulation makes; ``timings`` collects seconds per stage."""

    timings: dict[str, float]

    async def encode_images(self, images: Tensor) -> Tensor:
        """(N, 3, Sc, Sc) CLIP-size images in [-1, 1] -> CLIP image embeddings (N, D)."""
        ...

    async def encode_text(self, text: str) -> tuple[Tensor, str | None]:
        """A caption -> (its CLIP text embedding (1, D), a truncation warning or None)."""
        ...

    async def invert(self, images: Tensor, z: Tensor, s: SamplingSettings) -> Tensor:
        """``pipeline.invert_decoder``."""
        ...

    async def decode(self, z: Tensor, x_T: Tensor, seeds: list[int], s: SamplingSettings) -> Tensor:
        """``pipeline.decode_latents``."""
        ...

    async def upsample(self, images: Tensor, seeds: list[int], s: SamplingSettings) -> Tensor:
        """Every upsampler in turn (``pipeline.sample_upsampler``)."""
        ...


@dataclass
class Manipulated:
    """A manipulation's output: images (N, 3, H, W) in [-1, 1] and the z_i they decode."""

    images: Tensor
    image_embeddings: Tensor  # (N, D)
    warnings: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------- the manipulations
async def bipartite_latents(
    stages: Stages, images: Sequence[ImageInput], s: SamplingSettings
) -> tuple[Tensor, Tensor]:
    """Images -> (z_i (N, D) from the CLIP image encoder, x_T (N, 3, S, S) by inversion)."""
    z = await stages.encode_images(torch.cat([x.clip for x in images]))
    x_T = await stages.invert(torch.cat([x.decoder for x in images]), z, s)
    return z, x_T


async def compute_variations(
    stages: Stages, image: ImageInput, num_images: int, seed: int, s: SamplingSettings
) -> Manipulated:
    """``num_images`` variations: (z_i, x_T) decoded with DDIM eta ``s.decoder_eta``."""
    seeds = image_seeds(seed, num_images)

    # 1-2. CLIP image encoder (z_i) and DDIM inversion of the decoder (x_T)
    z, x_T = await bipartite_latents(stages, [image], s)

    # 3. decoder with eta > 0 from the shared x_T: variations keep semantics and layout
    z, x_T = z.repeat(num_images, 1), x_T.repeat(num_images, 1, 1, 1)
    images = await stages.decode(z, x_T, seeds, s)

    # 4. upsamplers
    return Manipulated(await stages.upsample(images, seeds, s), z)


async def compute_interpolation(
    stages: Stages,
    image_a: ImageInput,
    image_b: ImageInput,
    frames: int,
    seed: int,
    s: SamplingSettings,
    fixed_noise: bool = False,
) -> Manipulated:
    """``frames`` images from a to b: z_i slerped, x_T slerped (or a's), eta 0."""
    seeds = image_seeds(seed, frames)
    s = replace(s, decoder_eta=0.0)

    # 1-2. bipartite latents of both images
    z, x_T = await bipartite_latents(stages, [image_a, image_b], s)

    # 3. slerp from a to b, decode deterministically from the latents
    z, x_T = interpolation_latents(z[0:1], x_T[0:1], z[1:2], x_T[1:2], frames, fixed_noise)
    images = await stages.decode(z, x_T, seeds, s)

    # 4. upsamplers
    return Manipulated(await stages.upsample(images, seeds, s), z)


async def compute_text_diff(
    stages: Stages,
    image: ImageInput,
    to_text: str,
    from_text: str,
    frames: int,
    max_strength: float,
    seed: int,
    s: SamplingSettings,
) -> Manipulated:
    """``frames`` images: z = slerp(z_i, norm(z_to - z_from), theta), theta in
    [0, max_strength], x_T fixed, eta 0 (frame 0 is the image itself)."""
    seeds = image_seeds(seed, frames)
    s = replace(s, decoder_eta=0.0)

    # 1. the two captions' CLIP text embeddings
    (to_emb, note_to), (from_emb, note_from) = await asyncio.gather(
        stages.encode_text(to_text), stages.encode_text(from_text)
    )
    notes = [f"to_text: {note_to}" if note_to else None]
    notes.append(f"from_text: {note_from}" if note_from else None)

    # 2. the image's bipartite latent
    z, x_T = await bipartite_latents(stages, [image], s)

    # 3. move z along the text diff with x_T fixed, decode deterministically
    z, x_T = text_diff_latents(z, x_T, to_emb, from_emb, frames, max_strength)
    images = await stages.decode(z, x_T, seeds, s)

    # 4. upsamplers
    images = await stages.upsample(images, seeds, s)
    return Manipulated(images, z, [n for n in notes if n])


# ---------------------------------------------------------------------- in-process
class LocalStages:
    """``Stages`` on a loaded bundle, in this process."""

    def __init__(self, pipe: UnclipPipeline) -> None:
        self.pipe = pipe
        self.timings: dict[str, float] = {}

    def _timed(self, name: str, fn: Any, *args: Any) -> Any:
        t0 = time.perf_counter()
        with torch.no_grad():
            out = fn(*args)
        self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t0
        return out

    async def encode_images(self, images: Tensor) -> Tensor:
        clip = self.pipe.clip
        return self._timed("image_encoder", clip.encode_images, images.to(clip.device))

    async def encode_text(self, text: str) -> tuple[Tensor, str | None]:
        cond, notes = self._timed(
            "text_encoder", encode_prompts_noting, self.pipe.clip, [text], False
        )
        return cond.emb, notes[0]

    async def invert(self, images: Tensor, z: Tensor, s: SamplingSettings) -> Tensor:
        return self._timed("inversion", invert_decoder, self.pipe.decoder, images, z, s)

    async def decode(self, z: Tensor, x_T: Tensor, seeds: list[int], s: SamplingSettings) -> Tensor:
        return self._timed("decoder", decode_latents, self.pipe.decoder, z, x_T, seeds, s)

    async def upsample(self, images: Tensor, seeds: list[int], s: SamplingSettings) -> Tensor:
        for i, up in enumerate(self.pipe.upsamplers):
            images = self._timed(f"upsampler{i + 1}", sample_upsampler, up, images, seeds, s, i)
        return images


T = TypeVar("T")


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to the end from sync code (in a fresh thread if a loop is running)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


def image_input(pipe: UnclipPipeline, image: Image.Image) -> ImageInput:
    ident, size = pipe.clip.identity, pipe.decoder.config.net.image_size
    x = prepare_image(image, ident.image_size, size)
    dev = prior_device(pipe.decoder)
    return ImageInput(x.clip.to(dev), x.decoder.to(dev))


def _generation(out: Manipulated, seed: int, stages: LocalStages) -> Generation:
    return Generation(
        to_uint8(out.images), seed, stages.timings, out.image_embeddings.cpu(), out.warnings
    )


def variations(
    pipe: UnclipPipeline,
    image: Image.Image,
    num_images: int = 1,
    eta: float | None = None,
    seed: int = 0,
    settings: SamplingSettings | None = None,
) -> Generation:
    """Variations of ``image`` that keep its semantics and style (eta default 0.8)."""
    s = replace(settings or pipe.settings, decoder_eta=VARIATIONS_ETA if eta is None else eta)
    stages = LocalStages(pipe)
    x = image_input(pipe, image)
    return _generation(run_sync(compute_variations(stages, x, num_images, seed, s)), seed, stages)


def interpolate(
    pipe: UnclipPipeline,
    image_a: Image.Image,
    image_b: Image.Image,
    frames: int = 5,
    seed: int = 0,
    fixed_noise: bool = False,
    settings: SamplingSettings | None = None,
) -> Generation:
    """``frames`` images from image_a to image_b: slerp of the CLIP image embeddings, with
    decoder latents slerped between the two inversions (or held at image_a's)."""
    stages = LocalStages(pipe)
    a, b = image_input(pipe, image_a), image_input(pipe, image_b)
    s = settings or pipe.settings
    out = run_sync(compute_interpolation(stages, a, b, frames, seed, s, fixed_noise))
    return _generation(out, seed, stages)


def text_diff(
    pipe: UnclipPipeline,
    image: Image.Image,
    to_text: str,
    from_text: str = TEXT_DIFF_FROM,
    frames: int = 5,
    max_strength: float = TEXT_DIFF_STRENGTH,
    seed: int = 0,
    settings: SamplingSettings | None = None,
) -> Generation:
    """Edit an image towards ``to_text``: decode slerp(z_i, z_d, theta), z_d the normalised
    difference of the two captions' CLIP text embeddings, x_T fixed (unCLIP paper §3)."""
    stages = LocalStages(pipe)
    s = settings or pipe.settings
    coro = compute_text_diff(
        stages, image_input(pipe, image), to_text, from_text, frames, max_strength, seed, s
    )
    return _generation(run_sync(coro), seed, stages)
