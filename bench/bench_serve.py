"""Serving throughput and latency: Ray Serve over HTTP vs. the pipeline in-process.

    python bench/bench_serve.py [--requests 32] [--steps 16,16,8] [--out results.json]

Builds a bundle of randomly initialised stages at the sizes of the CPU "quick" preset
(DESIGN.md: CLIP embed 128 / ViT 128x3 patch 8 at 64 px / text 128x3 ctx 32; prior width
256 x 4 layers; decoder UNet 32 base channels at 32 px; upsampler 32 -> 64 px): weights do
not matter for speed, sizes do. Then, in one process:

1. in-process: ``UnclipPipeline.generate`` one image per call, sequentially (what
   ``unclip generate`` does), and one call with 16 images (the in-process batching bound);
2. Serve: ``serving/config.yaml`` deployed as ``unclip serve`` does, one image per HTTP
   request, at concurrency 1 and 16, with dynamic batching on (the config's user_config)
   and off (``max_batch_size: 1``).

Prints images/s, p50 / p95 latency and ratios against in-process sequential generation.
Check ``uptime`` first: the numbers are only comparable between rows of one run.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import socket
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def summarise(latencies: list[float], images: int, wall: float) -> dict[str, float]:
    q = statistics.quantiles(latencies, n=20, method="inclusive")
    return {
        "images_per_s": images / wall,
        "p50_s": statistics.median(latencies),
        "p95_s": q[18],
        "requests": len(latencies),
    }


def bench_in_process(bundle: str, n: int, threads: list[int]) -> dict[str, dict[str, float]]:
    pipe = UnclipPipeline.from_bundle(bundle)
    out = {}
    for th in threads:
        torch.set_num_threads(th)
        pipe.generate(PROMPTS[0], 1, 0)  # warm-up
        lat = []
        t0 = time.perf_counter()
        for i in range(n):
            t = time.perf_counter()
            pipe.generate(PROMPTS[i % len(PROMPTS)], 1, i)
            lat.append(time.perf_counter() - t)
        out[f"sequential_t{th}"] = summarise(lat, n, time.perf_counter() - t0)
    torch.set_num_threads(threads[0])
    t = time.perf_counter()
    pipe.generate(PROMPTS[0], 16, 0)
    wall = time.perf_counter() - t
    out["one_call_16_images"] = {"images_per_s": 16 / wall, "p50_s": wall, "p95_s": wall}
    return out


def bench_http(url: str, n: int, concurrency: int) -> dict[str, float]:
    session = requests.Session()

    def one(i: int) -> float:
        t = time.perf_counter()
        body = {"prompt": PROMPTS[i % len(PROMPTS)], "seed": i}
        r = session.post(f"{url}/v1/generate", json=body, timeout=600)
        r.raise_for_status()
        return time.perf_counter() - t

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(min(concurrency, 4))))  # warm-up
        t0 = time.perf_counter()
        lat = list(pool.map(one, range(n)))
        wall = time.perf_counter() - t0
    return summarise(lat, n, wall)


def with_batching(config: dict[str, Any], on: bool) -> dict[str, Any]:
    cfg = copy.deepcopy(config)
    for d in cfg["applications"][0]["deployments"]:
        if not on and "user_config" in d:
            d["user_config"] = {**d["user_config"], "max_batch_size": 1}
    return cfg


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=32, help="requests per measurement")
    p.add_argument("--steps", default="16,16,8", help="prior,decoder,upsampler sampling steps")
    p.add_argument(
        "--threads",
        default="1,2",
        help="torch threads for the in-process rows (Serve replicas run 1 thread each, "
        "as Ray sets OMP_NUM_THREADS=1 for fractional-CPU actors); the first is the baseline",
    )
    p.add_argument("--out", default=None, help="also write the results as JSON")
    args = p.parse_args()
    steps = tuple(int(s) for s in args.steps.split(","))
    assert len(steps) == 3, "--steps needs prior,decoder,upsampler"
    print(f"load average {os.getloadavg()[0]:.2f}; torch threads {torch.get_num_threads()}")

    import ray
    from ray import serve

    results: dict[str, Any] = {"steps": steps, "load_before": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory() as tmp:
        bundle = quick_bundle(tmp, steps)  # type: ignore[arg-type]
        threads = [int(t) for t in args.threads.split(",")]
        results["in_process"] = bench_in_process(bundle, args.requests, threads)
        print("in-process:", json.dumps(results["in_process"]), flush=True)

        ray.init(
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}},
        )
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        try:
            for on in (True, False):
                name = "batching_on" if on else "batching_off"
                schema = serve_config(with_batching(load_config(), on), bundle, port=port)
                deploy_config(schema)
                for c in (1, 16):
                    res = bench_http(url, args.requests if c == 1 else 2 * args.requests, c)
                    results[f"{name}_c{c}"] = res
                    print(f"{name} c={c}:", json.dumps(res), flush=True)
        finally:
            serve.shutdown()
            ray.shutdown()
    results["load_after"] = os.getloadavg()[0]
    report(results)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


def report(r: dict[str, Any]) -> None:
    inproc = r["in_process"]
    seq = [k for k in inproc if k.startswith("sequential_t")]
    base = inproc[seq[0]]
    print(
        f"\nsteps prior/decoder/upsampler {tuple(r['steps'])}; load average "
        f"{r['load_before']:.2f} -> {r['load_after']:.2f}; one image per request; "
        f"ratios against in-process sequential with {seq[0].removeprefix('sequential_t')} "
        "thread(s)\n"
    )
    print(f"{'':38} {'images/s':>9} {'p50 s':>8} {'p95 s':>8} {'x img/s':>8} {'x p50':>7}")
    rows = [(f"in-process, sequential, {k.removeprefix('sequential_')}", inproc[k]) for k in seq]
    rows.append(("in-process, one call of 16 images", inproc["one_call_16_images"]))
    for name in ("batching_on", "batching_off"):
        for c in (1, 16):
            rows.append((f"Serve HTTP, {name.replace('_', ' ')}, c={c}", r[f"{name}_c{c}"]))
    for label, m in rows:
        print(
            f"{label:38} {m['images_per_s']:9.2f} {m['p50_s']:8.3f} {m['p95_s']:8.3f} "
            f"{m['images_per_s'] / base['images_per_s']:8.2f} {m['p50_s'] / base['p50_s']:7.2f}"
        )


if __name__ == "__main__":
    main()
