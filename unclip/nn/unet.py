"""The decoder / upsampler UNet (a small ADM / GLIDE UNet, docs/method.md "Decoder").

Conditioning of the decoder: the CLIP image embedding is projected and added to the
timestep embedding, and projected into ``clip_tokens`` extra context tokens; optional CLIP
per-token text states join them. Every attention layer attends over the image positions
plus these context tokens. An upsampler is the same UNet with ``low_res_channels > 0``: the
(bicubically upsampled, degraded) low-res image is concatenated to the input.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unclip.config import UNetConfig
from unclip.nn.layers import (
    Checkpointable,
    TimestepMLP,
    prepare_text_states,
    replace_where,
    zero_module,
)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with scale-shift conditioning on the embedding."""

    def __init__(self, ch_in: int, ch_out: int, emb_dim: int, groups: int, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, ch_in)
        self.conv1 = nn.Conv2d(ch_in, ch_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * ch_out)
        self.norm2 = nn.GroupNorm(groups, ch_out)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_module(nn.Conv2d(ch_out, ch_out, 3, padding=1))
        self.skip = nn.Conv2d(ch_in, ch_out, 1) if ch_in != ch_out else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Self-attention over positions, with context tokens appended to keys and values."""

    def __init__(self, ch: int, head_channels: int, ctx_dim: int, groups: int) -> None:
        super().__init__()
        self.heads = max(1, ch // head_channels)
        self.norm = nn.GroupNorm(groups, ch)
        self.qkv = nn.Conv1d(ch, 3 * ch, 1)
        self.ctx_kv = nn.Linear(ctx_dim, 2 * ch) if ctx_dim else None
        self.proj = zero_module(nn.Conv1d(ch, ch, 1))

    def forward(self, x: Tensor, ctx: Tensor | None) -> Tensor:
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x).reshape(B, C, H * W))  # (B, 3C, N)
        q, k, v = qkv.reshape(B, 3, self.heads, C // self.heads, H * W).unbind(1)
        if ctx is not None and self.ctx_kv is not None:
            ck, cv = self.ctx_kv(ctx).transpose(1, 2).chunk(2, dim=1)  # (B, C, S) each
            ck = ck.reshape(B, self.heads, C // self.heads, -1)
            cv = cv.reshape(B, self.heads, C // self.heads, -1)
            k, v = torch.cat([k, ck], dim=-1), torch.cat([v, cv], dim=-1)
        # (B, heads, N, c) layout for SDPA
        y = F.scaled_dot_product_attention(
            q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2)
        )
        y = y.transpose(-1, -2).reshape(B, C, H * W)
        return x + self.proj(y).reshape(B, C, H, W)


class Level(Checkpointable):
    """ResBlock (+ attention) applied at one resolution (the unit of activation
    checkpointing in the UNet)."""

    def __init__(self, res: ResBlock, attn: AttentionBlock | None) -> None:
        super().__init__()
        self.res, self.attn = res, attn

    def block(self, x: Tensor, emb: Tensor, ctx: Tensor | None) -> Tensor:
        x = self.res(x, emb)
        return self.attn(x, ctx) if self.attn is not None else x


class UNet(nn.Module):
    def __init__(self, cfg: UNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        base, G = cfg.base_channels, cfg.groups
        emb_dim = 4 * base
        self.time = TimestepMLP(base, emb_dim)
        ctx_dim = emb_dim if (cfg.clip_dim or cfg.text_width) else 0
        if cfg.clip_dim:
            self.clip_to_emb = nn.Linear(cfg.clip_dim, emb_dim)
            self.clip_to_tokens = nn.Linear(cfg.clip_dim, cfg.clip_tokens * emb_dim)
            self.null_clip = nn.Parameter(torch.randn(cfg.clip_dim) / cfg.clip_dim**0.5)
            if cfg.clip_whiten:  # fitted on training embeddings (fit_whitening), then fixed
                self.register_buffer("clip_mean", torch.zeros(cfg.clip_dim))
                self.register_buffer("clip_whitening", torch.eye(cfg.clip_dim))
        if cfg.text_width:
            self.text_to_ctx = nn.Linear(cfg.text_width, emb_dim)
            self.null_text_states = nn.Parameter(
                torch.randn(cfg.max_text_len, cfg.text_width) * 0.02
            )
            self.pad_text_state = nn.Parameter(torch.randn(cfg.text_width) * 0.02)
        if ctx_dim:
            self.ctx_norm = nn.LayerNorm(emb_dim)

        def level(ch_in: int, ch_out: int, res: int) -> Level:
            attn = (
                AttentionBlock(ch_out, cfg.head_channels, ctx_dim, G)
                if res in cfg.attention_resolutions
                else None
            )
            return Level(ResBlock(ch_in, ch_out, emb_dim, G, cfg.dropout), attn)

        self.inp = nn.Conv2d(cfg.in_channels + cfg.low_res_channels, base, 3, padding=1)
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        skips, ch, res = [base], base, cfg.image_size
        for i, mult in enumerate(cfg.channel_mult):
            blocks = nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                blocks.append(level(ch, base * mult, res))
                ch = base * mult
                skips.append(ch)
            self.down.append(blocks)
            last = i == len(cfg.channel_mult) - 1
            self.downsample.append(
                nn.Identity() if last else nn.Conv2d(ch, ch, 3, stride=2, padding=1)
            )
            if not last:
                skips.append(ch)
                res //= 2
        if cfg.clip_dim and cfg.clip_spatial:  # (B, D) -> (B, ch, res, res) at the bottom
            self.clip_to_map = nn.Linear(cfg.clip_dim, ch * res * res)
            nn.init.zeros_(self.clip_to_map.weight)
            nn.init.zeros_(self.clip_to_map.bias)
        mid_attn = (
            AttentionBlock(ch, cfg.head_channels, ctx_dim, G) if cfg.attention_resolutions else None
        )
        self.mid = nn.ModuleList(
            [
                Level(ResBlock(ch, ch, emb_dim, G, cfg.dropout), mid_attn),
                Level(ResBlock(ch, ch, emb_dim, G, cfg.dropout), None),
            ]
        )
        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for i, mult in reversed(list(enumerate(cfg.channel_mult))):
            blocks = nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(level(ch + skips.pop(), base * mult, res))
                ch = base * mult
            self.up.append(blocks)
            self.upsample.append(nn.Conv2d(ch, ch, 3, padding=1) if i > 0 else nn.Identity())
            if i > 0:
                res *= 2
        self.out = nn.Sequential(
            nn.GroupNorm(G, ch),
            nn.SiLU(),
            zero_module(nn.Conv2d(ch, cfg.out_channels, 3, padding=1)),
        )

    @torch.no_grad()
    def fit_whitening(self, emb: Tensor, eps: float | None = None) -> None:
        """Fit the conditioning's whitening (``clip_whiten``) on training embeddings (N, D):
        ZCA with the eigenvalues floored at ``eps`` (default: the config's
        ``clip_whiten_floor``) times the largest, so the nearly empty
        directions of the embedding space are not blown up into noise."""
        assert self.cfg.clip_whiten, "clip_whiten is off"
        eps = self.cfg.clip_whiten_floor if eps is None else eps
        z = emb.double()
        mean = z.mean(0)
        evals, evecs = torch.linalg.eigh(torch.cov((z - mean).T))
        floor = eps * evals.max()
        scale = (evals.clamp(min=0) + floor).rsqrt()
        self.clip_mean.copy_(mean.float())
        self.clip_whitening.copy_((evecs * scale) @ evecs.T)

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        clip_emb: Tensor | None = None,
        text_states: Tensor | None = None,
        text_mask: Tensor | None = None,
        low_res: Tensor | None = None,
        clip_drop: Tensor | None = None,
        text_drop: Tensor | None = None,
        clip_noise: Tensor | None = None,
    ) -> Tensor:
        """Predict the diffusion target for x_t.

        Args:
            x: noised image (B, in_channels, H, W); H = W = image_size except for upsamplers
               trained on crops (any size divisible by 2**(levels-1)).
            t: timesteps (B,).
            clip_emb: CLIP image embedding (B, clip_dim); required when clip_dim > 0.
            text_states: CLIP per-token text states (B, L, text_width), optional.
            text_mask: (B, L) bool, True for real tokens.
            low_res: upsampled low-res image (B, low_res_channels, S, S) for upsamplers.
            clip_drop / text_drop: (B,) bool, True = learned null conditioning (CFG).
            clip_noise: (B, clip_dim) added to the (whitened) CLIP embedding: training-time
               conditioning augmentation (``DecoderConfig.clip_noise``).
        Returns:
            (B, out_channels, S, S)
        """
        cfg = self.cfg
        B = x.shape[0]
        down = 2 ** (len(cfg.channel_mult) - 1)
        assert x.shape[1] == cfg.in_channels and x.shape[2] % down == 0 == x.shape[3] % down, (
            f"x {tuple(x.shape)}: need {cfg.in_channels} channels and sides divisible by {down}"
        )
        emb = self.time(t)  # (B, E)
        ctx_parts: list[Tensor] = []
        if cfg.clip_dim:
            assert clip_emb is not None and clip_emb.shape == (B, cfg.clip_dim), "need clip_emb"
            if cfg.clip_whiten:  # (B, D) @ (D, D)
                clip_emb = (clip_emb.float() - self.clip_mean) @ self.clip_whitening
            if clip_noise is not None:
                clip_emb = clip_emb + clip_noise
            clip_emb = replace_where(clip_drop, clip_emb.to(x.dtype), self.null_clip)
            emb = emb + self.clip_to_emb(clip_emb)
            ctx_parts.append(self.clip_to_tokens(clip_emb).reshape(B, cfg.clip_tokens, -1))
        if cfg.text_width:
            states = prepare_text_states(
                text_states,
                text_mask,
                text_drop,
                self.null_text_states,
                self.pad_text_state,
                B,
                x,
            )
            ctx_parts.append(self.text_to_ctx(states))
        ctx = self.ctx_norm(torch.cat(ctx_parts, dim=1)) if ctx_parts else None  # (B, S_ctx, E)
        if cfg.low_res_channels:
            assert low_res is not None and low_res.shape == (
                B,
                cfg.low_res_channels,
                *x.shape[2:],
            ), "upsampler needs low_res upsampled to x's size"
            x = torch.cat([x, low_res.to(x.dtype)], dim=1)

        h = self.inp(x)
        hs = [h]
        for blocks, down in zip(self.down, self.downsample, strict=True):
            for blk in blocks:
                h = blk(h, emb, ctx)
                hs.append(h)
            if not isinstance(down, nn.Identity):
                h = down(h)
                hs.append(h)
        if cfg.clip_dim and cfg.clip_spatial:
            h = h + self.clip_to_map(clip_emb).reshape(h.shape)
        for blk in self.mid:
            h = blk(h, emb, ctx)
        for blocks, up in zip(self.up, self.upsample, strict=True):
            for blk in blocks:
                h = blk(torch.cat([h, hs.pop()], dim=1), emb, ctx)
            if not isinstance(up, nn.Identity):
                h = up(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.out(h)
