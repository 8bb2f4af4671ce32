"""What identifies a CLIP, read without torch: the ETL's driver and the table readers use it.

A CLIP checkpoint directory (``save_clip_checkpoint``) is ``config.json`` (the open_clip
model config) + ``model.safetensors``; its identity is derived from the config and a hash
of the weights, so a driver can check a table against ``--clip`` and write the schema
without importing torch or open_clip (about 4 s of a job's start on a small CPU).
``unclip.clip.Clip.from_checkpoint`` builds the model and uses the same identity. This module
imports nothing of ``unclip.clip`` (which imports it): the identity of an open_clip *name*
needs open_clip, so ``unclip.clip`` provides it (``Clip.load(...).identity``,
``identity_from_config``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any

from unclip import fs

CLIP_CHECKPOINT_KIND = "open_clip"
# open_clip's defaults for fields a model config may leave out (CLIPTextCfg, CLIPVisionCfg)
DEFAULT_TEXT_WIDTH = 512
DEFAULT_IMAGE_SIZE = 224


class ClipLoadError(ValueError):
    """The CLIP named by the user cannot be loaded; the message says why and what to do."""


@dataclass(frozen=True)
class ClipIdentity:
    """What identifies a CLIP for the data it embedded (Parquet metadata, stage configs)."""

    model: str  # open_clip name, or checkpoint URI
    pretrained: str  # pretrained tag / weights path ("" for a checkpoint or random init)
    embed_dim: int
    context_length: int
    text_width: int  # width of per-token text states (0 if unavailable)
    image_size: int
    fingerprint: str  # stable content id: name/tag, or hash of the checkpoint weights

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def looks_like_checkpoint(model: str) -> bool:
    """True for a path or URI holding a ``config.json`` (not a bare open_clip name)."""
    if "/" not in model and "\\" not in model and not model.startswith("."):
        return False  # a bare name: open_clip model (names have no slashes except hf-hub:)
    if model.startswith("hf-hub:"):
        return False
    try:
        return fs.exists(fs.join(model, "config.json"))
    except Exception as e:  # noqa: BLE001 - e.g. no credentials for s3
        raise ClipLoadError(f"cannot read CLIP checkpoint {model!r}: {e}") from e


def read_checkpoint(uri: str) -> tuple[dict[str, Any], bytes]:
    """``(config, safetensors bytes)`` of a CLIP checkpoint directory, checked."""
    try:
        cfg = json.loads(fs.read_text(fs.join(uri, "config.json")))
        blob = fs.read_bytes(fs.join(uri, "model.safetensors"))
    except FileNotFoundError as e:
        raise ClipLoadError(f"CLIP checkpoint {uri!r} is incomplete: {e}") from e
    if cfg.get("kind") != CLIP_CHECKPOINT_KIND:
        raise ClipLoadError(f"{uri!r} is not a CLIP checkpoint (kind={cfg.get('kind')!r})")
    return cfg, blob


def checkpoint_identity(uri: str, cfg: dict[str, Any], blob: bytes) -> ClipIdentity:
    """The identity of a checkpoint from its config and weights (what the model reports:
    tested against the built model for ViT and ResNet towers)."""
    model_cfg = cfg["model_cfg"]
    fingerprint = "sha256:" + hashlib.sha256(blob).hexdigest()[:16]
    context = int(model_cfg["text_cfg"]["context_length"])
    return config_identity(model_cfg, uri, "", fingerprint, context)


def config_identity(
    model_cfg: dict[str, Any], model: str, pretrained: str, fingerprint: str, context_length: int
) -> ClipIdentity:
    """The identity of a plain open_clip ``CLIP`` built from ``model_cfg`` (its
    ``embed_dim``, ``text_cfg`` and ``vision_cfg``), without building it."""
    text, vision = model_cfg["text_cfg"], model_cfg.get("vision_cfg", {})
    # an open_clip text tower has a final LayerNorm of its width; a Hugging Face one has none
    text_width = 0 if text.get("hf_model_name") else int(text.get("width", DEFAULT_TEXT_WIDTH))
    size = vision.get("image_size", DEFAULT_IMAGE_SIZE)
    return ClipIdentity(
        model=model,
        pretrained=pretrained,
        embed_dim=int(model_cfg["embed_dim"]),
        context_length=context_length,
        text_width=text_width,
        image_size=int(size[0] if isinstance(size, list | tuple) else size),
        fingerprint=fingerprint,
    )


def read_identity(uri: str) -> ClipIdentity:
    """The identity of the CLIP checkpoint at ``uri`` (no torch)."""
    return checkpoint_identity(uri, *read_checkpoint(uri))
