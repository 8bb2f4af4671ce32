"""Serving throughput and latency: Ray Serve over HTTP vs. the pipeline in-process.

    python bench/bench_serve.py [--requests 24] [--steps 16,16,8] [--out results.json]

Builds a bundle of randomly initialised stages at the sizes of the CPU "quick" preset
(docs/benchmarks.md: CLIP embed 128 / ViT 128x3 patch 8 at 64 px / text 128x3 ctx 32; prior width
256 x 4 layers; decoder UNet 32 base channels at 32 px; upsampler 32 -> 64 px): weights do
not matter for speed, sizes do. ``serving/config.yaml`` is deployed as ``unclip serve``
does, once with dynamic batching on (the config's user_config) and once off
(``max_batch_size: 1``); in each phase, in one process:

1. concurrency 1: alternately one in-process ``UnclipPipeline.generate`` call (what
   ``unclip generate`` does; torch threads as Serve's replicas, 1) and one HTTP request,
   so both see the same machine load;
2. concurrency 16: one image per HTTP request, 16 clients;
3. in-process, one call of 16 images (what batching could reach in one process).

Prints images/s, p50 / p95 latency and ratios against the in-process sequential calls of
the same phase. On a shared machine check ``uptime`` first; only ratios within a phase are
meaningful when the load moves.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import open_clip
import requests
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.local_serve import free_port, local_ray  # noqa: E402
from serving.cli import deploy as deploy_config  # noqa: E402
from serving.cli import load_config, serve_config  # noqa: E402
from unclip.checkpoint import make_bundle, save_stage  # noqa: E402
from unclip.clip import Clip, save_clip_checkpoint  # noqa: E402
from unclip.config import (  # noqa: E402
    ClipRef,
    DecoderConfig,
    PriorConfig,
    PriorNetConfig,
    SamplingSettings,
    UNetConfig,
    UpsamplerConfig,
)
from unclip.models import build_model  # noqa: E402
from unclip.pipeline import UnclipPipeline  # noqa: E402

QUICK_CLIP = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 64, "layers": 3, "width": 128, "patch_size": 8},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 3},
}
PROMPTS = ["a small red circle", "a big blue square", "a green triangle at the top"]


def quick_bundle(root: str, steps: tuple[int, int, int]) -> str:
    """A random bundle with the quick preset's stage sizes."""
    torch.manual_seed(0)
    save_clip_checkpoint(f"{root}/clip", open_clip.model.CLIP(**QUICK_CLIP), QUICK_CLIP)
    ident = Clip.load(f"{root}/clip").identity
    ref = ClipRef(
        model=ident.model,
        embed_dim=ident.embed_dim,
        fingerprint=ident.fingerprint,
        text_width=ident.text_width,
        context_length=ident.context_length,
    )
    prior = PriorConfig(
        net=PriorNetConfig(embed_dim=128, text_width=128, max_text_len=32, width=256, layers=4),
        clip=ref,
    )
    decoder = DecoderConfig(
        net=UNetConfig(
            image_size=32,
            base_channels=32,
            channel_mult=(1, 2, 2),
            attention_resolutions=(8,),
            clip_dim=128,
        ),
        clip=ref,
    )
    upsampler = UpsamplerConfig(
        net=UNetConfig(
            image_size=64,
            base_channels=32,
            channel_mult=(1, 2, 2),
            attention_resolutions=(),
            low_res_channels=3,
        ),
        low_res_size=32,
    )
    paths = []
    for cfg in (prior, decoder, upsampler):
        save_stage(f"{root}/{cfg.stage}", cfg, build_model(cfg).state_dict())
        paths.append(f"{root}/{cfg.stage}")
    sampling = SamplingSettings(
        prior_steps=steps[0], decoder_steps=steps[1], upsampler_steps=steps[2], candidates=2
    )
    make_bundle(f"{root}/bundle", f"{root}/clip", *paths[:2], paths[2:], sampling=sampling)
    return f"{root}/bundle"


def summarise(latencies: list[float], images: int, wall: float) -> dict[str, float]:
    q = statistics.quantiles(latencies, n=20, method="inclusive")
    return {
        "images_per_s": images / wall,
        "p50_s": statistics.median(latencies),
        "p95_s": q[18],
        "requests": len(latencies),
    }


def post(session: requests.Session, url: str, i: int) -> float:
    t = time.perf_counter()
    body = {"prompt": PROMPTS[i % len(PROMPTS)], "seed": i}
    r = session.post(f"{url}/v1/generate", json=body, timeout=600)
    r.raise_for_status()
    return time.perf_counter() - t


def bench_phase(pipe: UnclipPipeline, url: str, n: int) -> dict[str, dict[str, float]]:
    """Interleaved in-process / HTTP at concurrency 1, then HTTP at 16, then one big call."""
    session = requests.Session()
    for i in range(3):  # warm-up both paths
        pipe.generate(PROMPTS[0], 1, i)
        post(session, url, i)
    local, http = [], []
    for i in range(n):
        t = time.perf_counter()
        pipe.generate(PROMPTS[i % len(PROMPTS)], 1, i)
        local.append(time.perf_counter() - t)
        http.append(post(session, url, i))
    out = {
        "in_process_c1": summarise(local, n, sum(local)),
        "http_c1": summarise(http, n, sum(http)),
    }
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda i: post(session, url, i), range(16)))  # warm-up at 16
        t0 = time.perf_counter()
        lat = list(pool.map(lambda i: post(session, url, i), range(2 * n)))
        out["http_c16"] = summarise(lat, 2 * n, time.perf_counter() - t0)
    t = time.perf_counter()
    pipe.generate(PROMPTS[0], 16, 0)
    wall = time.perf_counter() - t
    out["in_process_16_images"] = {"images_per_s": 16 / wall, "p50_s": wall, "p95_s": wall}
    return out


def with_batching(config: dict[str, Any], on: bool) -> dict[str, Any]:
    cfg = copy.deepcopy(config)
    for d in cfg["applications"][0]["deployments"]:
        if not on and "user_config" in d:
            d["user_config"] = {**d["user_config"], "max_batch_size": 1}
    return cfg


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=24, help="requests at concurrency 1")
    p.add_argument("--steps", default="16,16,8", help="prior,decoder,upsampler sampling steps")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads in-process (Serve replicas run 1: Ray sets OMP_NUM_THREADS=1 "
        "for fractional-CPU actors)",
    )
    p.add_argument("--out", default=None, help="also write the results as JSON")
    args = p.parse_args()
    steps = tuple(int(s) for s in args.steps.split(","))
    assert len(steps) == 3, "--steps needs prior,decoder,upsampler"
    torch.set_num_threads(args.threads)

    results: dict[str, Any] = {"steps": steps, "threads": args.threads}
    with tempfile.TemporaryDirectory() as tmp:
        bundle = quick_bundle(tmp, steps)  # type: ignore[arg-type]
        pipe = UnclipPipeline.from_bundle(bundle)
        with local_ray():
            port = free_port()
            for on in (True, False):
                name = "batching_on" if on else "batching_off"
                deploy_config(serve_config(with_batching(load_config(), on), bundle, port=port))
                load = os.getloadavg()[0]
                results[name] = bench_phase(pipe, f"http://127.0.0.1:{port}", args.requests)
                results[name]["load"] = {"before": load, "after": os.getloadavg()[0]}
                print(name, json.dumps(results[name]), flush=True)
    report(results)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


def report(r: dict[str, Any]) -> None:
    print(
        f"\nsteps prior/decoder/upsampler {tuple(r['steps'])}; one image per request; "
        f"in-process with {r['threads']} torch thread(s); ratios against the in-process "
        "sequential calls of the same phase\n"
    )
    print(f"{'':36} {'images/s':>9} {'p50 s':>8} {'p95 s':>8} {'x img/s':>8} {'x p50':>7}")
    labels = {
        "in_process_c1": "in-process, sequential",
        "http_c1": "Serve HTTP, c=1",
        "http_c16": "Serve HTTP, c=16",
        "in_process_16_images": "in-process, one call of 16 images",
    }
    for name in ("batching_on", "batching_off"):
        phase = r[name]
        base = phase["in_process_c1"]
        load = phase["load"]
        print(
            f"{name.replace('_', ' ')} (load average {load['before']:.1f} -> {load['after']:.1f})"
        )
        for key, label in labels.items():
            m = phase[key]
            print(
                f"  {label:34} {m['images_per_s']:9.2f} {m['p50_s']:8.3f} {m['p95_s']:8.3f} "
                f"{m['images_per_s'] / base['images_per_s']:8.2f} "
                f"{m['p50_s'] / base['p50_s']:7.2f}"
            )


if __name__ == "__main__":
    main()
