"""Text-to-image and image-variation sampling: the one code path for every caller.

``unclip generate`` calls ``UnclipPipeline.generate`` in-process; the Serve deployments each
hold one stage and call the same stage functions below (``encode_prompts``, ``sample_prior``,
``sample_decoder``, ``sample_upsampler``), so both produce the same images for the same seed.

``invert_decoder`` (DDIM inversion) and ``decode_latents`` (decoding an inverted latent) are
stage functions too; the image manipulations built on them (variations, interpolations, text
diffs) live in ``unclip.manipulations``, written once for the library, the CLI and Serve.

Randomness: image ``j`` of a request with seed ``s`` draws its noise for stage ``k`` from its
own generator seeded by ``(s, j, k)``, so results do not depend on batching.
"""

from __future__ import annotations

import hashlib
import io
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from unclip import sampling_numerics
from unclip.checkpoint import (
    bundle_clip_source,
    load_stage,
    read_bundle_spec,
)
from unclip.clip import Clip
from unclip.conditioning import TextCond
from unclip.config import SamplingSettings
from unclip.decoder import Decoder
from unclip.diffusion import Progress
from unclip.prior import DiffusionPrior
from unclip.upsampler import Upsampler

STAGE_PRIOR, STAGE_DECODER, STAGE_UPSAMPLER = 1, 2, 3


def stage_generators(
    seeds: Sequence[int], stage: int, device: str | torch.device = "cpu"
) -> list[torch.Generator]:
    """One generator per image for one stage, derived from the image's seed."""
    gens = []
    for s in seeds:
        digest = hashlib.sha256(f"{s}:{stage}".encode()).digest()
        gens.append(
            torch.Generator(device=device).manual_seed(
                int.from_bytes(digest[:8], "little") & (2**63 - 1)
            )
        )
    return gens


def image_seeds(seed: int, n: int) -> list[int]:
    """Per-image seeds for a request: image j of seed s is (s * 1_000_003 + j)."""
    return [seed * 1_000_003 + j for j in range(n)]


def needs_text_states(*stages: Any) -> bool:
    """Whether any stage attends to per-token text states (text_width > 0).

    ``stages``: stage models or their configs (a Serve text encoder has only the configs).
    """
    return any(getattr(getattr(m, "config", m).net, "text_width", 0) for m in stages)


# ---------------------------------------------------------------------- stage functions
def encode_prompts(clip: Clip, prompts: list[str], with_states: bool) -> TextCond:
    """Prompts -> CLIP text conditioning (embedding, and per-token states if asked)."""
    return encode_prompts_noting(clip, prompts, with_states)[0]


def encode_prompts_noting(
    clip: Clip, prompts: list[str], with_states: bool
) -> tuple[TextCond, list[str | None]]:
    """``encode_prompts`` and, per prompt, a warning if CLIP truncated it (else None): CLIP
    reads a fixed number of tokens, the text beyond them does not condition the images."""
    tokens, truncated = clip.tokenize(prompts)
    if with_states:
        emb, states, mask = clip.encode_text_states(tokens)
        text = TextCond(emb, states, mask)
    else:
        text = TextCond(clip.encode_text(tokens))
    n = clip.identity.context_length
    note = (
        f"prompt longer than the CLIP context of {n} tokens: it was truncated, the words "
        "beyond it do not affect the images"
    )
    return text, [note if cut else None for cut in truncated]


class DeadlineExceeded(RuntimeError):
    """Sampling stopped because the work's deadline passed (see ``stop_at``)."""


def stop_at(deadline: float | None) -> Progress | None:
    """A per-step sampling callback that raises ``DeadlineExceeded`` at the first step that
    ends after ``deadline`` (``time.time()`` seconds), so work nobody waits for stops."""
    if deadline is None:
        return None

    def check(done: int, total: int) -> None:
        if time.time() > deadline:
            raise DeadlineExceeded(f"deadline passed after {done} of {total} sampling steps")

    return check


def sample_prior(
    prior: DiffusionPrior,
    text: TextCond,
    seeds: Sequence[int],
    s: SamplingSettings,
    progress: Progress | None = None,
) -> Tensor:
    """Caption conditioning (B rows, one per image) -> CLIP image embeddings (B, D)."""
    return prior.sample(
        text.to(prior_device(prior)),
        steps=s.prior_steps,
        guidance_scale=s.prior_guidance_scale,
        candidates=s.candidates,
        eta=s.prior_eta,
        generator=stage_generators(seeds, STAGE_PRIOR),
        progress=progress,
    )


def sample_decoder(
    decoder: Decoder,
    image_emb: Tensor,
    text: TextCond | None,
    seeds: Sequence[int],
    s: SamplingSettings,
    noise: Tensor | None = None,
    progress: Progress | None = None,
) -> Tensor:
    """CLIP image embeddings (B, D) -> images (B, 3, S, S) in [-1, 1].

    Runs under the decoder's measured sampling numerics (``unclip.sampling_numerics``);
    a fixed ``noise`` (an inverted x_T) is decoded in fp32, like the inversion."""
    dev = prior_device(decoder)
    emb, text = image_emb.to(dev), text.to(dev) if text is not None else None

    def probe(m: torch.nn.Module, rows: Tensor) -> None:
        m.sample(
            emb[rows],
            text.index(rows) if text is not None else None,
            steps=2,
            guidance_scale=s.decoder_guidance_scale,
            generator=torch.Generator().manual_seed(0),
        )

    sampling_numerics.ensure(decoder, probe, emb.shape[0])
    with sampling_numerics.running(decoder, exact=noise is not None):
        return decoder.sample(
            emb,
            text,
            steps=s.decoder_steps,
            guidance_scale=s.decoder_guidance_scale,
            eta=s.decoder_eta,
            noise=None if noise is None else noise.to(dev),
            generator=stage_generators(seeds, STAGE_DECODER),
            progress=progress,
        ).float()


def invert_decoder(
    decoder: Decoder,
    images: Tensor,
    image_emb: Tensor,
    s: SamplingSettings,
    progress: Progress | None = None,
) -> Tensor:
    """DDIM inversion (images (B, 3, S, S) at the decoder's size + their CLIP embeddings
    (B, D)) -> x_T (B, 3, S, S) such that ``decode_latents`` with eta 0 gives the images back
    (unCLIP paper §3). Inversion and decoding both run at ``s.latent_steps`` and
    ``s.latent_guidance_scale``: the bipartite latent belongs to that pair."""
    dev = prior_device(decoder)
    return decoder.invert(
        images.to(dev),
        image_emb.to(dev),
        steps=s.latent_steps,
        guidance_scale=s.latent_guidance_scale,
        progress=progress,
    )


def decode_latents(
    decoder: Decoder,
    image_emb: Tensor,
    x_T: Tensor,
    seeds: Sequence[int],
    s: SamplingSettings,
    progress: Progress | None = None,
) -> Tensor:
    """Bipartite latents (z_i (B, D), x_T (B, 3, S, S) from ``invert_decoder`` with the same
    settings) -> images (B, 3, S, S) in [-1, 1], DDIM at ``s.latent_steps`` and
    ``s.latent_guidance_scale`` with ``s.decoder_eta`` (0: the inverted image itself; > 0:
    variations, fresh noise from each row's seed)."""
    dev = prior_device(decoder)
    return decoder.decode_latent(
        image_emb.to(dev),
        x_T.to(dev),
        steps=s.latent_steps,
        guidance_scale=s.latent_guidance_scale,
        eta=s.decoder_eta,
        generator=stage_generators(seeds, STAGE_DECODER),
        progress=progress,
    )


def sample_upsampler(
    upsampler: Upsampler,
    images: Tensor,
    seeds: Sequence[int],
    s: SamplingSettings,
    index: int = 0,
    progress: Progress | None = None,
) -> Tensor:
    """Images (B, 3, s, s) -> (B, 3, s * f, s * f), both in [-1, 1], under the upsampler's
    measured sampling numerics (``unclip.sampling_numerics``)."""
    low = images.to(prior_device(upsampler)).float()

    def probe(m: torch.nn.Module, rows: Tensor) -> None:
        m.sample(low[rows], steps=2, generator=torch.Generator().manual_seed(0))

    sampling_numerics.ensure(upsampler, probe, low.shape[0])
    with sampling_numerics.running(upsampler):
        return upsampler.sample(
            low,
            steps=s.upsampler_steps,
            generator=stage_generators(seeds, STAGE_UPSAMPLER + index),
            progress=progress,
        ).float()


def prior_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


# ---------------------------------------------------------------------- images
def to_uint8(images: Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def from_pil(image: Image.Image, size: int) -> Tensor:
    """PIL image -> (1, 3, size, size) in [-1, 1] (RGB, centre-cropped square, resized)."""
    img = image.convert("RGB")
    w, h = img.size
    side = min(w, h)
    img = img.crop(
        ((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side)
    )
    img = img.resize((size, size), Image.Resampling.BICUBIC)
    arr = torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1)
    return arr.permute(2, 0, 1)[None]


def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def grid(images: np.ndarray, cols: int) -> np.ndarray:
    """(N, H, W, 3) uint8 -> one (rows * H, cols * W, 3) image, padded with white."""
    n, h, w, c = images.shape
    rows = -(-n // cols)
    out = np.full((rows * h, cols * w, c), 255, dtype=np.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, cols)
        out[r * h : (r + 1) * h, col * w : (col + 1) * w] = img
    return out


# ---------------------------------------------------------------------- the pipeline
@dataclass
class Generation:
    """Result of one request: images (N, H, W, 3) uint8, the seed, per-stage seconds."""

    images: np.ndarray
    seed: int
    timings: dict[str, float] = field(default_factory=dict)
    image_embeddings: Tensor | None = None
    warnings: list[str] = field(default_factory=list)  # e.g. the prompt was truncated


@dataclass
class UnclipPipeline:
    """A loaded bundle: CLIP + prior + decoder + upsamplers + default settings."""

    clip: Clip
    prior: DiffusionPrior
    decoder: Decoder
    upsamplers: list[Upsampler]
    settings: SamplingSettings
    spec: Any = None

    @classmethod
    def from_bundle(cls, uri: str, device: str = "cpu") -> UnclipPipeline:
        spec = read_bundle_spec(uri)
        model, pretrained = bundle_clip_source(uri, spec)
        clip = Clip.load(model, pretrained, device=device)
        stages = [load_stage(f"{uri.rstrip('/')}/{name}", device) for name in spec.stages]
        prior, decoder, *ups = stages
        assert isinstance(prior, DiffusionPrior) and isinstance(decoder, Decoder)
        return cls(clip, prior, decoder, list(ups), spec.sampling, spec)

    @property
    def with_states(self) -> bool:
        return needs_text_states(self.prior, self.decoder)

    def resolve(self, **overrides: Any) -> SamplingSettings:
        """Bundle defaults with the non-None overrides applied."""
        return replace(self.settings, **{k: v for k, v in overrides.items() if v is not None})

    @torch.no_grad()
    def generate(
        self,
        prompt: str,
        num_images: int = 1,
        seed: int = 0,
        settings: SamplingSettings | None = None,
    ) -> Generation:
        """Text -> prior -> decoder -> upsamplers, one commented block per stage."""
        s = settings or self.settings
        seeds = image_seeds(seed, num_images)
        timings: dict[str, float] = {}
        t0 = time.perf_counter()

        # 1. CLIP text encoder: the caption's embedding (and token states), one row per image
        text, notes = encode_prompts_noting(self.clip, [prompt], self.with_states)
        text = text.repeat(num_images)
        timings["text_encoder"] = time.perf_counter() - t0

        # 2. prior: CLIP text embedding -> CLIP image embedding (best of `candidates`)
        t0 = time.perf_counter()
        image_emb = sample_prior(self.prior, text, seeds, s)
        timings["prior"] = time.perf_counter() - t0

        # 3. decoder: CLIP image embedding -> base-resolution image
        t0 = time.perf_counter()
        images = sample_decoder(self.decoder, image_emb, text, seeds, s)
        timings["decoder"] = time.perf_counter() - t0

        # 4. upsamplers: each multiplies the resolution
        for i, up in enumerate(self.upsamplers):
            t0 = time.perf_counter()
            images = sample_upsampler(up, images, seeds, s, i)
            timings[f"upsampler{i + 1}"] = time.perf_counter() - t0
        warnings = [n for n in notes if n]
        return Generation(to_uint8(images), seed, timings, image_emb.cpu(), warnings)
