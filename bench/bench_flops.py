"""Model FLOP utilisation of the prior and decoder training steps vs this machine's matmul peak.

    python bench/bench_flops.py [--threads 2] [--repeats 7]

1. Peak: the median GFLOP/s of large fp32 matmuls (the best the BLAS does on these cores).
2. For each stage config, the FLOPs of one training step (forward + backward, counted by
   torch.utils.flop_counter on the real step) and its median wall time -> achieved GFLOP/s.
3. Prints achieved / peak (model FLOP utilisation). Timings are medians of ``--repeats``.
Run it on a quiet machine (check ``uptime``): other processes halve what 2 cores give.
"""

from __future__ import annotations

import argparse
import statistics
import time

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
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
