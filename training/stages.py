"""What differs between the trainable stages; everything else is in ``training.harness``.

For each stage: which table columns it reads (the prior never reads image bytes), how a
batch becomes the stage model's loss inputs, and its evaluation on held-out rows:

    prior      mean cosine(sampled image emb, true image emb) beside the baseline
               cosine(text emb, true image emb)
    decoder    a sample grid (true images above, samples from their true CLIP image
               embeddings below) and, with the CLIP at hand, cosine(CLIP(sample), true emb)
               beside cosine(CLIP(true image at the decoder's size), true emb)
    upsampler  a grid (bicubic / sample / truth) of held-out images downscaled to the
               low-res size, corrupted as in training, and upsampled, with PSNR vs the
               truth beside bicubic's PSNR; the same on uncorrupted inputs (clean_*)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training.data import StageColumns, train_embeddings
from unclip.ar_prior import ARPrior
from unclip.clip import Clip
from unclip.conditioning import TextCond
from unclip.config import (
    ARPriorConfig,
    ClipRef,
    DecoderConfig,
    PriorConfig,
    StageConfig,
    UpsamplerConfig,
)
from unclip.decoder import Decoder
from unclip.degrade import degrade, resize
from unclip.pipeline import grid, to_uint8
from unclip.prior import DiffusionPrior
from unclip.upsampler import Upsampler

Batch = dict[str, Tensor]


@dataclass
class EvalResult:
    """Metrics (name -> number) and images (name -> (H, W, 3) uint8) of one evaluation."""

    metrics: dict[str, float] = field(default_factory=dict)
    images: dict[str, np.ndarray] = field(default_factory=dict)


def to_unit(images: Tensor) -> Tensor:
    """(B, 3, S, S) uint8 -> float in [-1, 1]."""
    return images.float() / 127.5 - 1.0


def psnr(x: Tensor, ref: Tensor) -> float:
    """Mean PSNR (dB) of images in [-1, 1] against references, on the [0, 1] scale."""
    mse = ((x.float() - ref.float()) / 2).pow(2).flatten(1).mean(dim=1).clamp(min=1e-10)
    return float((10 * torch.log10(1.0 / mse)).mean())


def mean_cosine(a: Tensor, b: Tensor) -> float:
    return float(F.cosine_similarity(a.float(), b.float(), dim=-1).mean())


class Stage:
    """Base: the per-stage pieces the harness calls."""

    config: StageConfig

    def __init__(self, config: StageConfig) -> None:
        self.config = config

    @property
    def text_width(self) -> int:
        return getattr(self.config.net, "text_width", 0)

    @property
    def clip_ref(self) -> ClipRef:
        return self.config.clip  # type: ignore[union-attr] - the upsampler never asks

    def columns(self) -> StageColumns:
        raise NotImplementedError

    def needs_clip(self, for_eval: bool = False) -> bool:
        """Whether the worker loads the CLIP (text states; decoder evaluation)."""
        return self.text_width > 0

    def text_cond(self, batch: Batch, clip: Clip | None) -> TextCond | None:
        """CLIP text conditioning of a batch: stored embeddings, per-token states if used."""
        if "text_emb" not in batch:
            return None
        emb = batch["text_emb"].float()
        if not self.text_width:
            return TextCond(emb)
        assert clip is not None, "text_width > 0 needs the CLIP"
        tokens = batch["text_tokens"].long()
        with torch.no_grad():
            _, states, mask = clip.encode_text_states(tokens)
        return TextCond(emb, None if states is None else states.to(emb.device), mask.to(emb.device))

    def prepare(self, model: nn.Module, data_files: tuple[str, ...], heldout: float) -> bool:
        """Before step 1 of a new run: fit what is fitted from data, not learned (the AR
        prior's PCA codebook). Returns whether the model changed (the EMA restarts)."""
        return False

    def loss(self, model: nn.Module, batch: Batch, text: TextCond | None) -> Tensor:
        """Scalar training loss; ``model`` may be DDP-wrapped (call it, not its methods)."""
        raise NotImplementedError

    def evaluate(
        self, model: nn.Module, heldout: Batch, clip: Clip | None, n_images: int
    ) -> EvalResult:
        raise NotImplementedError


class PriorStage(Stage):
    config: PriorConfig

    def columns(self) -> StageColumns:
        cols = ("text_emb", "image_emb") + (("text_tokens",) if self.text_width else ())
        return StageColumns(cols, context_length=self.config.clip.context_length or 77)

    def loss(self, model: nn.Module, batch: Batch, text: TextCond | None) -> Tensor:
        assert text is not None
        return model(batch["image_emb"].float(), text)

    @torch.no_grad()
    def evaluate(
        self, model: nn.Module, heldout: Batch, clip: Clip | None, n_images: int
    ) -> EvalResult:
        assert isinstance(model, DiffusionPrior | ARPrior)
        text = self.text_cond(heldout, clip)
        assert text is not None
        true = heldout["image_emb"].float()
        sampled = model.sample(text, generator=torch.Generator().manual_seed(0))
        return EvalResult(
            {
                "heldout_cos": mean_cosine(sampled, true),
                "baseline_cos": mean_cosine(text.emb, true),
                "heldout_rows": float(true.shape[0]),
            }
        )


class ARPriorStage(PriorStage):
    """The autoregressive prior: same data and metric as the diffusion prior; its PCA basis
    and bucket ranges are fitted on training embeddings before the first step."""

    config: ARPriorConfig  # type: ignore[assignment]
    fit_rows: int = 20_000

    def prepare(self, model: nn.Module, data_files: tuple[str, ...], heldout: float) -> bool:
        assert isinstance(model, ARPrior)
        image_emb, text_emb = train_embeddings(data_files, self.fit_rows, heldout)
        device = model.pca_mean.device
        explained = model.fit(
            torch.from_numpy(image_emb).to(device), torch.from_numpy(text_emb).to(device)
        )
        self.explained_variance = explained
        return True

    @torch.no_grad()
    def evaluate(
        self, model: nn.Module, heldout: Batch, clip: Clip | None, n_images: int
    ) -> EvalResult:
        assert isinstance(model, ARPrior)
        out = super().evaluate(model, heldout, clip, n_images)
        true = heldout["image_emb"].float()
        out.metrics["codebook_cos"] = mean_cosine(model.decode(model.encode(true)), true)
        return out


class DecoderStage(Stage):
    config: DecoderConfig

    def columns(self) -> StageColumns:
        cols = ("image", "image_emb") + (("text_emb", "text_tokens") if self.text_width else ())
        return StageColumns(
            cols,
            image_size=self.config.net.image_size,
            context_length=self.config.clip.context_length or 77,
        )

    def needs_clip(self, for_eval: bool = False) -> bool:
        return self.text_width > 0 or (for_eval and bool(self.config.clip.model))

    def prepare(self, model: nn.Module, data_files: tuple[str, ...], heldout: float) -> bool:
        """With ``net.clip_whiten``: fit the conditioning's whitening on training embeddings."""
        assert isinstance(model, Decoder)
        if not self.config.net.clip_whiten:
            return False
        image_emb, _ = train_embeddings(data_files, self.fit_rows, heldout)
        model.net.fit_whitening(torch.from_numpy(image_emb))
        return True

    fit_rows: int = 20_000

    def loss(self, model: nn.Module, batch: Batch, text: TextCond | None) -> Tensor:
        return model(to_unit(batch["image"]), batch["image_emb"].float(), text)

    @torch.no_grad()
    def evaluate(
        self, model: nn.Module, heldout: Batch, clip: Clip | None, n_images: int
    ) -> EvalResult:
        assert isinstance(model, Decoder)
        rows = {k: v[:n_images] for k, v in heldout.items()}
        true = to_unit(rows["image"])
        emb = rows["image_emb"].float()
        text = self.text_cond(rows, clip)
        samples = model.sample(emb, text, generator=torch.Generator().manual_seed(0))
        out = EvalResult(images={"samples": grid(to_uint8(torch.cat([true, samples])), len(emb))})
        if clip is not None:
            out.metrics["sample_clip_cos"] = mean_cosine(clip.encode_images(samples), emb)
            out.metrics["true_clip_cos"] = mean_cosine(clip.encode_images(true), emb)
        return out


class UpsamplerStage(Stage):
    config: UpsamplerConfig

    def columns(self) -> StageColumns:
        return StageColumns(("image",), image_size=self.config.net.image_size)

    def loss(self, model: nn.Module, batch: Batch, text: TextCond | None) -> Tensor:
        return model(to_unit(batch["image"]))

    @torch.no_grad()
    def evaluate(
        self, model: nn.Module, heldout: Batch, clip: Clip | None, n_images: int
    ) -> EvalResult:
        assert isinstance(model, Upsampler)
        cfg = self.config
        true = to_unit(heldout["image"][:n_images])
        low = resize(true, cfg.low_res_size, mode="bicubic")
        # the train-time corruption (the decoder's outputs are soft), fixed for comparability
        soft = degrade(
            low, cfg.degradation, cfg.blur_sigma, cfg.blur_kernel, torch.Generator().manual_seed(0)
        )
        out = EvalResult()
        for name, inputs in (("", soft), ("clean_", low)):
            bicubic = resize(inputs, cfg.net.image_size, mode="bicubic")
            samples = model.sample(inputs, generator=torch.Generator().manual_seed(0))
            out.metrics[f"{name}sample_psnr"] = psnr(samples, true)
            out.metrics[f"{name}bicubic_psnr"] = psnr(bicubic, true)
            if not name:
                grid_rows = torch.cat([bicubic, samples, true])
                out.images["samples"] = grid(to_uint8(grid_rows), true.shape[0])
        return out


def stage_for(config: StageConfig) -> Stage:
    """The stage pieces for a stage config."""
    if isinstance(config, PriorConfig):
        return PriorStage(config)
    if isinstance(config, ARPriorConfig):
        return ARPriorStage(config)
    if isinstance(config, DecoderConfig):
        return DecoderStage(config)
    if isinstance(config, UpsamplerConfig):
        return UpsamplerStage(config)
    raise TypeError(f"not a trainable stage config: {type(config).__name__}")
