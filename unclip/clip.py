"""A thin wrapper over open_clip: one way to load, tokenize and embed, whatever the CLIP.

``Clip.load("ViT-L-14", "openai")`` loads a real open_clip model (with network or a local
weights file as the pretrained tag); ``Clip.load("path/or/s3://clip_ckpt")`` loads a CLIP
trained by ``unclip train clip`` (a directory with ``config.json`` + ``model.safetensors``).
Embeddings are always L2-normalised. ``identity`` is what goes into the Parquet metadata.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from unclip import fs
from unclip.clip_identity import (
    CLIP_CHECKPOINT_KIND,
    ClipIdentity,
    ClipLoadError,
    checkpoint_identity,
    config_identity,
    looks_like_checkpoint,
    read_checkpoint,
)

__all__ = ["Clip", "ClipIdentity", "ClipLoadError", "identity_of", "save_clip_checkpoint"]

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


class Clip:
    """A frozen open_clip model with its tokenizer and image preprocessing."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        identity: ClipIdentity,
        mean: tuple[float, ...] = OPENAI_MEAN,
        std: tuple[float, ...] = OPENAI_STD,
    ) -> None:
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.identity = identity
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, model: str, pretrained: str = "", device: str = "cpu") -> Clip:
        """From an open_clip name (+ pretrained tag) or a checkpoint directory URI."""
        if looks_like_checkpoint(model):
            return cls.from_checkpoint(model, device)
        import open_clip

        _check_name(model)
        if not pretrained:
            warnings.warn(
                f"CLIP {model!r} without a pretrained tag is randomly initialised (testing only)",
                stacklevel=2,
            )
        try:
            net, _, preprocess = open_clip.create_model_and_transforms(
                model, pretrained=pretrained or None, device=device
            )
        except Exception as e:  # noqa: BLE001 - open_clip raises many kinds; re-raise clearly
            raise ClipLoadError(
                f"could not load CLIP {model!r} with pretrained {pretrained!r}: {e} "
                "(no network here? pass a local weights file as --pretrained)"
            ) from e
        tokenizer = open_clip.get_tokenizer(model)
        mean, std = _mean_std(net)
        identity = ClipIdentity(
            model=model,
            pretrained=pretrained,
            embed_dim=_embed_dim(net),
            context_length=int(getattr(tokenizer, "context_length", 77)),
            text_width=_text_width(net),
            image_size=_image_size(net),
            fingerprint=_name_fingerprint(model, pretrained),
        )
        return cls(net, tokenizer, identity, mean, std)

    @classmethod
    def from_checkpoint(cls, uri: str, device: str = "cpu") -> Clip:
        """A CLIP saved by ``save_clip_checkpoint`` (local path or s3://)."""
        import open_clip
        from safetensors.torch import load as load_safetensors

        cfg, blob = read_checkpoint(uri)
        net = open_clip.model.CLIP(**cfg["model_cfg"])
        net.load_state_dict(load_safetensors(blob))
        net = net.to(device)
        identity = checkpoint_identity(uri, cfg, blob)
        tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=identity.context_length)
        return cls(net, tokenizer, identity, tuple(cfg["mean"]), tuple(cfg["std"]))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ------------------------------------------------------------------ text
    def tokenize(self, texts: list[str]) -> tuple[Tensor, list[bool]]:
        """Token ids (B, context_length) and whether each text was truncated to fit."""
        tokens = self.tokenizer(texts)
        truncated = [False] * len(texts)
        encode = getattr(self.tokenizer, "encode", None)
        if encode is not None:
            limit = self.identity.context_length - 2  # start and end tokens
            truncated = [len(encode(t)) > limit for t in texts]
        return tokens, truncated

    def pad_tokens(self, ids: list[list[int]] | list[np.ndarray]) -> Tensor:
        """Variable-length token id lists (as stored in Parquet) -> (B, context_length)."""
        L = self.identity.context_length
        out = torch.zeros(len(ids), L, dtype=torch.long)
        for i, row in enumerate(ids):
            row = list(row)[:L]
            out[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
        return out

    @staticmethod
    def strip_tokens(tokens: Tensor) -> list[list[int]]:
        """(B, L) padded ids -> list of ids without the zero padding (for Parquet)."""
        return [row[row != 0].tolist() for row in tokens]

    @torch.no_grad()
    def encode_text(self, tokens: Tensor) -> Tensor:
        """(B, L) ids -> (B, D) L2-normalised text embeddings."""
        emb = self.model.encode_text(tokens.to(self.device))
        return F.normalize(emb.float(), dim=-1)

    @torch.no_grad()
    def encode_text_states(self, tokens: Tensor) -> tuple[Tensor, Tensor | None, Tensor]:
        """(B, L) ids -> (embedding (B, D), per-token states (B, L, W) or None, mask (B, L)).

        The per-token states are the text transformer's final-LayerNorm outputs, the
        "encoded text" the prior and decoder can attend to.
        """
        tokens = tokens.to(self.device)
        mask = tokens != 0
        m = self.model
        if not hasattr(m, "token_embedding"):  # e.g. HF text towers: embedding only
            return self.encode_text(tokens), None, mask
        cast = m.transformer.get_cast_dtype()
        x = m.token_embedding(tokens).to(cast) + m.positional_embedding.to(cast)
        x = m.ln_final(m.transformer(x, attn_mask=m.attn_mask))  # (B, L, W)
        from open_clip.transformer import text_global_pool

        pooled = text_global_pool(
            x, tokens, m.text_pool_type, eos_token_id=getattr(m, "text_eos_id", None)
        )
        if m.text_projection is not None:
            proj = m.text_projection
            pooled = proj(pooled) if isinstance(proj, torch.nn.Linear) else pooled @ proj
        return F.normalize(pooled.float(), dim=-1), x.float(), mask

    # ------------------------------------------------------------------ images
    def preprocess(self, image: Image.Image) -> Tensor:
        """PIL image -> (3, S, S) normalised tensor (resize shorter side, centre crop)."""
        arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
        x = torch.from_numpy(arr).permute(2, 0, 1)[None] * 2 - 1
        return self.preprocess_tensor(x)[0]

    def preprocess_tensor(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) images in [-1, 1] -> (B, 3, S, S) normalised for the image tower."""
        S = self.identity.image_size
        x = (images.float() + 1) / 2
        H, W = x.shape[-2:]
        if (H, W) != (S, S):
            scale = S / min(H, W)
            size = (max(S, round(H * scale)), max(S, round(W * scale)))
            x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True)
            top, left = (size[0] - S) // 2, (size[1] - S) // 2
            x = x[..., top : top + S, left : left + S]
        x = x.clamp(0, 1)
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    @torch.no_grad()
    def encode_image(self, pixels: Tensor) -> Tensor:
        """(B, 3, S, S) preprocessed pixels -> (B, D) L2-normalised image embeddings."""
        emb = self.model.encode_image(pixels.to(self.device))
        return F.normalize(emb.float(), dim=-1)

    @torch.no_grad()
    def encode_images(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) images in [-1, 1] -> (B, D) embeddings (preprocess + encode)."""
        return self.encode_image(self.preprocess_tensor(images))


def identity_of(model: str, pretrained: str = "") -> ClipIdentity:
    """The identity ``Clip.load(model, pretrained)`` reports, without loading weights.

    A checkpoint's is read from its files; a plain open_clip model name's from open_clip's
    model config (so naming ``ViT-L-14`` / ``openai`` needs neither the weights nor the
    network); other open_clip models (custom or Hugging Face text towers) are built randomly
    initialised to read it.
    """
    if looks_like_checkpoint(model):
        return checkpoint_identity(model, *read_checkpoint(model))
    import open_clip

    _check_name(model)
    cfg = open_clip.get_model_config(model)
    text = (cfg or {}).get("text_cfg", {})
    fingerprint = _name_fingerprint(model, pretrained)
    if (
        not cfg
        or "custom_text" in cfg
        or text.get("hf_model_name")
        or text.get("hf_tokenizer_name")
    ):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # randomly initialised on purpose
            built = Clip.load(model, "").identity
        return dataclasses.replace(built, pretrained=pretrained, fingerprint=fingerprint)
    context = int(getattr(open_clip.get_tokenizer(model), "context_length", 77))
    return config_identity(cfg, model, pretrained, fingerprint, context)


def _check_name(model: str) -> None:
    import open_clip

    if model not in open_clip.list_models():
        raise ClipLoadError(
            f"CLIP {model!r} is neither an open_clip model name nor a CLIP checkpoint "
            "directory (config.json + model.safetensors); see open_clip.list_models() "
            "or train one with `unclip train clip`"
        )


def _name_fingerprint(model: str, pretrained: str) -> str:
    return f"{model}/{pretrained or 'random'}"


def save_clip_checkpoint(
    uri: str,
    model: torch.nn.Module,
    model_cfg: dict[str, Any],
    extra: dict[str, Any] | None = None,
    mean: tuple[float, ...] = OPENAI_MEAN,
    std: tuple[float, ...] = OPENAI_STD,
) -> None:
    """Write a CLIP checkpoint directory: ``config.json`` + ``model.safetensors``."""
    from safetensors.torch import save

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    cfg = {
        "kind": CLIP_CHECKPOINT_KIND,
        "model_cfg": model_cfg,
        "mean": list(mean),
        "std": list(std),
        **(extra or {}),
    }
    fs.makedirs(uri)
    fs.write_bytes(fs.join(uri, "model.safetensors"), save(state))
    fs.write_text(fs.join(uri, "config.json"), json.dumps(cfg, indent=2))


def _embed_dim(net: torch.nn.Module) -> int:
    proj = getattr(net, "text_projection", None)
    if isinstance(proj, torch.nn.Linear):
        return proj.out_features
    if proj is not None:
        return int(proj.shape[1])
    return int(getattr(net, "embed_dim", 0) or net.visual.output_dim)


def _text_width(net: torch.nn.Module) -> int:
    ln = getattr(net, "ln_final", None)
    return int(ln.normalized_shape[0]) if ln is not None else 0


def _image_size(net: torch.nn.Module) -> int:
    size = getattr(net.visual, "image_size", 224)
    return int(size[0] if isinstance(size, tuple | list) else size)


def _mean_std(net: torch.nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    pcfg = getattr(net.visual, "preprocess_cfg", None) or {}
    return tuple(pcfg.get("mean", OPENAI_MEAN)), tuple(pcfg.get("std", OPENAI_STD))
