"""Model FLOP utilisation of the prior and decoder training steps vs this machine's matmul peak.

    python bench/bench_flops.py [--threads 2] [--repeats 7]
    python bench/bench_flops.py --paper-scale      # counted FLOPs per sample, nothing timed

1. Peak: the median GFLOP/s of large fp32 matmuls (the best the BLAS does on these cores).
2. For each stage config, the FLOPs of one training step (forward + backward, counted by
   torch.utils.flop_counter on the real step) and its median wall time -> achieved GFLOP/s.
3. Prints achieved / peak (model FLOP utilisation). Timings are medians of ``--repeats``.
Run it on a quiet machine (check ``uptime``): other processes halve what 2 cores give.

``--paper-scale`` builds this project's networks at the paper's sizes (Table 3 of unCLIP
as docs/scaling.md reads it) and the CLIP ViT-L/14 on PyTorch's ``meta`` device (shapes
only, no memory, no arithmetic) and counts the FLOPs of one training sample (forward +
backward) or one ETL row (CLIP forward of one image and one caption) with
``torch.utils.flop_counter``: the inputs of docs/scaling.md's GPU-hour table.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from unclip.conditioning import TextCond
from unclip.config import (
    DecoderConfig,
    PriorConfig,
    PriorNetConfig,
    UNetConfig,
    UpsamplerConfig,
)
from unclip.models import build_model, count_parameters


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_peak(repeats: int) -> float:
    """Best median GFLOP/s of square fp32 matmuls over a range of sizes."""
    best = 0.0
    for n in (512, 1024, 2048, 3072):
        a, b = torch.randn(n, n), torch.randn(n, n)
        best = max(best, 2 * n**3 / _median_seconds(lambda a=a, b=b: a @ b, repeats) / 1e9)
    return best


def conv_peak(repeats: int) -> float:
    """Median GFLOP/s of a 3x3 conv, 64 -> 64 channels on 32x32, batch 32 (nominal FLOPs)."""
    x, w = torch.randn(32, 64, 32, 32), torch.randn(64, 64, 3, 3)
    flops = 2 * 32 * 64 * 64 * 9 * 32 * 32
    return (
        flops / _median_seconds(lambda: torch.nn.functional.conv2d(x, w, padding=1), repeats) / 1e9
    )


def step_fn(model: torch.nn.Module, batch: dict) -> callable:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        loss = model(**batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def measure(name: str, model: torch.nn.Module, batch: dict, repeats: int, peak: float) -> dict:
    model.train()
    step = step_fn(model, batch)
    with FlopCounterMode(display=False) as counter:
        loss = model(**batch)
        loss.backward()
    flops = counter.get_total_flops()
    sec = _median_seconds(step, repeats)
    achieved = flops / sec / 1e9
    return {
        "stage": name,
        "params_M": count_parameters(model) / 1e6,
        "gflop_per_step": flops / 1e9,
        "s_per_step": sec,
        "gflops": achieved,
        "mfu": achieved / peak,
    }


def counted(fn: Callable[[], Any], batch: int) -> float:
    """FLOPs per sample of ``fn`` (which runs a batch of ``batch``), counted, not timed."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / batch


def paper_scale() -> None:
    """Parameters and FLOPs per sample of the paper-sized stages, on the meta device."""
    import open_clip

    B = 2
    rows = []
    with torch.device("meta"):
        # decoder: GLIDE's UNet widths (512 channels, mult 1,2,3,4, 3 res blocks, attention
        # at 32/16/8, 64-channel heads) conditioned on a 768-d CLIP ViT-L/14 embedding and
        # 77 CLIP text states (the paper trains a 1.2B text transformer instead; added in
        # docs/scaling.md by 6 N T)
        unet = UNetConfig(
            image_size=64, base_channels=512, channel_mult=(1, 2, 3, 4), num_res_blocks=3,
            attention_resolutions=(32, 16, 8), head_channels=64, clip_dim=768,
            text_width=768, max_text_len=77, dropout=0.1,
        )  # fmt: skip
        dec = build_model(DecoderConfig(net=unet))
        text = TextCond(
            torch.randn(B, 768), torch.randn(B, 77, 768), torch.ones(B, 77, dtype=torch.bool)
        )
        x64, emb = torch.randn(B, 3, 64, 64), torch.randn(B, 768)
        rows.append(("decoder 64px (GLIDE widths)", dec, lambda: dec(x64, emb, text).backward()))
        # upsamplers: no attention, no conditioning but the low-res image; trained on crops
        # of a quarter of the target side (paper: 64->256 at 320 channels, 256->1024 at 192)
        up1 = build_model(
            UpsamplerConfig(
                net=UNetConfig(image_size=256, base_channels=320, channel_mult=(1, 2, 3, 4),
                               num_res_blocks=3, attention_resolutions=(), low_res_channels=3),
                low_res_size=64, crop_size=64,
            )
        )  # fmt: skip
        x256 = torch.randn(B, 3, 64, 64)
        rows.append(("upsampler 64->256 (64px crops)", up1, lambda: up1(x256).backward()))
        up2 = build_model(
            UpsamplerConfig(
                net=UNetConfig(image_size=1024, base_channels=192, channel_mult=(1, 1, 2, 2, 4, 4),
                               num_res_blocks=2, attention_resolutions=(), low_res_channels=3),
                low_res_size=256, crop_size=256,
            )
        )  # fmt: skip
        x1024 = torch.randn(B, 3, 256, 256)
        rows.append(("upsampler 256->1024 (256px crops)", up2, lambda: up2(x1024).backward()))
        # diffusion prior: a 1B-class decoder-only Transformer (width 2048, 24 layers) over
        # 77 CLIP text states + 4 tokens
        prior = build_model(
            PriorConfig(net=PriorNetConfig(embed_dim=768, text_width=768, max_text_len=77,
                                           width=2048, layers=24, heads=32))
        )  # fmt: skip
        img = torch.randn(B, 768)
        rows.append(("diffusion prior (w2048 L24)", prior, lambda: prior(img, text).backward()))
        # the ETL: CLIP ViT-L/14 forward of one 224 px image and one 77-token caption
        clip = open_clip.create_model("ViT-L-14", pretrained=None, device="meta")
        imgs, toks = torch.randn(B, 3, 224, 224), torch.zeros(B, 77, dtype=torch.long)
        rows.append(("ETL: CLIP ViT-L/14 image", clip.visual, lambda: clip.encode_image(imgs)))
        rows.append(("ETL: CLIP ViT-L/14 caption", None, lambda: clip.encode_text(toks)))
    print(f"{'stage':40s} {'params':>9s} {'GFLOP/sample':>13s}  (fwd+bwd; ETL rows fwd only)")
    for name, model, fn in rows:
        flops = counted(fn, B)
        params = f"{count_parameters(model) / 1e9:.2f}B" if model is not None else "-"
        print(f"{name:40s} {params:>9s} {flops / 1e9:13.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--paper-scale", action="store_true", help="count paper-sized FLOPs only")
    args = ap.parse_args()
    if args.paper_scale:
        paper_scale()
        return
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    peak = matmul_peak(args.repeats)
    conv = conv_peak(args.repeats)
    print(
        f"fp32 matmul peak: {peak:.1f} GFLOP/s with {args.threads} threads; "
        f"3x3 conv 64ch@32px: {conv:.1f} GFLOP/s ({conv / peak:.0%} of the matmul peak; "
        "oneDNN convs may beat nominal FLOPs)"
    )

    D, B = 128, 32
    emb = torch.nn.functional.normalize(torch.randn(B, D), dim=-1)
    cases = [
        (
            "decoder 32px base32 (quick)",
            build_model(DecoderConfig(net=UNetConfig(clip_dim=D))),
            {"images": torch.rand(B, 3, 32, 32) * 2 - 1, "clip_emb": emb},
        ),
        (
            "decoder 32px base64",
            build_model(
                DecoderConfig(net=UNetConfig(clip_dim=D, base_channels=64, head_channels=64))
            ),
            {"images": torch.rand(B, 3, 32, 32) * 2 - 1, "clip_emb": emb},
        ),
        (
            "upsampler 32->64 base32",
            build_model(UpsamplerConfig()),
            {"images": torch.rand(B, 3, 64, 64) * 2 - 1},
        ),
        (
            "prior w256 L6 (B=256)",
            build_model(PriorConfig(net=PriorNetConfig(embed_dim=D, width=256, layers=6))),
            {"image_emb": torch.randn(256, D), "text": TextCond(torch.randn(256, D))},
        ),
        (
            "prior w256 L6 +32 text tokens (B=256)",
            build_model(
                PriorConfig(net=PriorNetConfig(embed_dim=D, text_width=128, width=256, layers=6))
            ),
            {
                "image_emb": torch.randn(256, D),
                "text": TextCond(
                    torch.randn(256, D),
                    torch.randn(256, 32, 128),
                    torch.ones(256, 32, dtype=torch.bool),
                ),
            },
        ),
    ]
    print(
        f"{'stage':40s} {'params':>8s} {'GFLOP/step':>11s} {'s/step':>8s} "
        f"{'GFLOP/s':>8s} {'MFU':>6s}"
    )
    for name, model, batch in cases:
        r = measure(name, model, batch, args.repeats, peak)
        print(
            f"{name:40s} {r['params_M']:7.2f}M {r['gflop_per_step']:11.2f} "
            f"{r['s_per_step']:8.3f} {r['gflops']:8.1f} {r['mfu']:6.1%}"
        )


if __name__ == "__main__":
    main()
