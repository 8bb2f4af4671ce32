"""Tiny models for fast tests: an open_clip CLIP, stage configs, and a random bundle."""

from __future__ import annotations

import open_clip
import torch

from unclip.checkpoint import make_bundle, save_stage
from unclip.clip import Clip, save_clip_checkpoint
from unclip.config import (
    ClipRef,
    DecoderConfig,
    PriorConfig,
    PriorNetConfig,
    UNetConfig,
    UpsamplerConfig,
)
from unclip.models import build_model

TINY_CLIP_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def save_tiny_clip(uri: str, seed: int = 0) -> Clip:
    torch.manual_seed(seed)
    model = open_clip.model.CLIP(**TINY_CLIP_CFG)
    save_clip_checkpoint(uri, model, TINY_CLIP_CFG)
    return Clip.load(uri)


def tiny_configs(clip: Clip, text_states: bool = True, image_size: int = 16):
    ident = clip.identity
    ref = ClipRef(
        model=ident.model,
        pretrained=ident.pretrained,
        embed_dim=ident.embed_dim,
        fingerprint=ident.fingerprint,
        text_width=ident.text_width,
        context_length=ident.context_length,
    )
    tw = ident.text_width if text_states else 0
    prior = PriorConfig(
        net=PriorNetConfig(
            embed_dim=ident.embed_dim, text_width=tw, max_text_len=16, width=64, layers=2, heads=2
        ),
        clip=ref,
        sample_steps=8,
    )
    decoder = DecoderConfig(
        net=UNetConfig(
            image_size=image_size,
            base_channels=16,
            channel_mult=(1, 2),
            attention_resolutions=(image_size // 2,),
            head_channels=16,
            clip_dim=ident.embed_dim,
            text_width=tw,
            max_text_len=16,
        ),
        clip=ref,
        sample_steps=6,
        latent_steps=6,
    )
    upsampler = UpsamplerConfig(
        net=UNetConfig(
            image_size=image_size * 2,
            base_channels=16,
            channel_mult=(1, 2),
            attention_resolutions=(),
            low_res_channels=3,
        ),
        low_res_size=image_size,
        sample_steps=4,
    )
    return prior, decoder, upsampler


def make_tiny_bundle(root: str, text_states: bool = True, seed: int = 0) -> str:
    """A bundle of randomly initialised tiny stages (for plumbing tests)."""
    clip = save_tiny_clip(f"{root}/clip_ckpt", seed)
    torch.manual_seed(seed)
    paths = []
    for cfg in tiny_configs(clip, text_states):
        model = build_model(cfg)
        path = f"{root}/{cfg.stage}_ckpt"
        save_stage(path, cfg, model.state_dict())
        paths.append(path)
    make_bundle(f"{root}/bundle", f"{root}/clip_ckpt", paths[0], paths[1], [paths[2]])
    return f"{root}/bundle"


def make_invertible_bundle(root: str, seed: int = 0) -> str:
    """A bundle without upsamplers whose decoder (v-prediction) is a smooth, non-trivial
    network whose predicted x0 overshoots [-1, 1]: every zero-initialised weight drawn at
    std 0.02 and the output bias set to 1.5 (so x0 is about -1.5 at high noise). DDIM
    inversion of it is accurate, so decoding an inverted latent must give the image back."""
    from dataclasses import replace

    from unclip.config import DiffusionConfig

    clip = save_tiny_clip(f"{root}/clip_ckpt", seed)
    prior_cfg, decoder_cfg, _ = tiny_configs(clip)
    decoder_cfg = replace(decoder_cfg, diffusion=DiffusionConfig(prediction="v"))
    torch.manual_seed(seed)
    prior, decoder = build_model(prior_cfg), build_model(decoder_cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in decoder.net.parameters():
            if p.dim() > 1 and not p.any():
                p.normal_(0, 0.02, generator=gen)
        decoder.net.out[-1].bias.fill_(1.5)
    for cfg, model in ((prior_cfg, prior), (decoder_cfg, decoder)):
        save_stage(f"{root}/{cfg.stage}_ckpt", cfg, model.state_dict())
    make_bundle(f"{root}/bundle", f"{root}/clip_ckpt", f"{root}/prior_ckpt", f"{root}/decoder_ckpt")
    return f"{root}/bundle"
