"""Measure small-CLIP recipes on the shapes data: seconds per step and quality per step.

    python bench/bench_clip.py --data FOLDER --variants vit8,rn16 --steps 400 --eval-at 200,400

    python bench/bench_clip.py --data FOLDER --variants vit8,rn16 --timing 12

``--timing R`` only times training steps: R rounds, each one step of every variant in turn
(so load changes hit all alike), and prints the median wall and CPU seconds per step and each
variant's ratio to the first. Otherwise it trains each variant in-process (no Ray: the same ``training.clip_steps`` step the Ray Train
loop runs), with the given threads, and prints per variant the median seconds per step
(after 3 warm-up steps) and the zero-shot / retrieval numbers of ``training.clip_eval`` at
the ``--eval-at`` steps, on held-out renders of a seed no training set uses. Check ``uptime``
first: on a shared machine compare steps, and seconds only between variants run together.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np
import torch

from training.clip_data import augment, normalise, read_folder, to_unit, worker_batches
from training.clip_eval import evaluate_shapes, render_heldout
from training.clip_presets import ClipModelConfig, ClipTrainConfig
from training.clip_steps import build_clip, lr_at, make_optimizer, train_step
from unclip.clip import OPENAI_MEAN, OPENAI_STD

VARIANTS: dict[str, ClipModelConfig] = {
    "vit8": ClipModelConfig(vision="vit", vision_width=128, vision_layers=(3,), patch_size=8),
    "vit4": ClipModelConfig(vision="vit", vision_width=128, vision_layers=(3,), patch_size=4),
    "rn16": ClipModelConfig(vision="resnet", vision_width=16, vision_layers=(1, 1, 1, 1)),
    "rn24": ClipModelConfig(vision="resnet", vision_width=24, vision_layers=(1, 1, 1, 1)),
    "rn32": ClipModelConfig(vision="resnet", vision_width=32, vision_layers=(1, 1, 1, 1)),
}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--variants", default="vit8,rn16")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--eval-at", default="")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--upsample-fraction", type=float, default=0.25)
    p.add_argument("--eval-images", type=int, default=500)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default="")
    p.add_argument("--timing", type=int, default=0, help="rounds of interleaved timing only")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"load average at start: {os.getloadavg()}", flush=True)
    if args.timing:
        timing(args)
        return

    data = read_folder(args.data, 64, 32)
    renders = render_heldout(args.eval_images, 1_000_003, 64)
    eval_at = {int(s) for s in args.eval_at.split(",") if s}
    results = {}
    for name in args.variants.split(","):
        cfg = ClipTrainConfig(
            model=VARIANTS[name],
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            warmup_steps=args.warmup,
            upsample_fraction=args.upsample_fraction,
        )
        torch.manual_seed(0)
        model = build_clip(cfg.model)
        n_params = sum(p.numel() for p in model.parameters())
        opt = make_optimizer(model, cfg)
        from open_clip.loss import ClipLoss

        loss_fn = ClipLoss()
        gen = torch.Generator().manual_seed(0)
        times, evals, losses = [], {}, []
        for step, rows in worker_batches(len(data), cfg.batch_size, 0, 1, cfg.seed):
            if step >= cfg.steps:
                break
            t0 = time.perf_counter()
            x = augment(to_unit(torch.from_numpy(data.images[rows])), cfg.upsample_fraction, gen)
            tokens = torch.from_numpy(data.tokens[rows]).long()
            loss = train_step(
                model,
                loss_fn,
                opt,
                normalise(x, OPENAI_MEAN, OPENAI_STD),
                tokens,
                lr_at(step, cfg),
                cfg.grad_clip,
            )
            times.append(time.perf_counter() - t0)
            losses.append(loss)
            if (step + 1) % 50 == 0:
                print(
                    f"{name} step {step + 1} loss {np.mean(losses[-50:]):.3f} "
                    f"{statistics.median(times[3:]):.3f} s/step",
                    flush=True,
                )
            if step + 1 in eval_at or step + 1 == cfg.steps:
                m = evaluate_shapes(model, renders, 32, OPENAI_MEAN, OPENAI_STD)
                evals[step + 1] = m
                print(
                    f"{name} @ {step + 1}: "
                    + json.dumps({k: {a: round(v, 3) for a, v in d.items()} for k, d in m.items()}),
                    flush=True,
                )
        results[name] = {
            "params": n_params,
            "median_s_per_step": statistics.median(times[3:]),
            "evals": evals,
            "load_end": os.getloadavg(),
        }
        print(
            f"{name}: {n_params / 1e6:.2f}M params, median {results[name]['median_s_per_step']:.3f} "
            f"s/step, load {os.getloadavg()}",
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


def timing(args: argparse.Namespace) -> None:
    """Median seconds per training step of each variant, steps interleaved across variants."""
    from open_clip.loss import ClipLoss

    data = read_folder(args.data, 64, 32)
    rows = np.arange(args.batch_size)
    x = normalise(to_unit(torch.from_numpy(data.images[rows])), OPENAI_MEAN, OPENAI_STD)
    tokens = torch.from_numpy(data.tokens[rows]).long()
    names = args.variants.split(",")
    runs = {}
    for name in names:
        torch.manual_seed(0)
        model = build_clip(VARIANTS[name])
        cfg = ClipTrainConfig(model=VARIANTS[name])
        runs[name] = (model, make_optimizer(model, cfg), ClipLoss())
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(args.timing):
        for name in names:
            model, opt, loss_fn = runs[name]
            t0, c0 = time.perf_counter(), time.process_time()
            train_step(model, loss_fn, opt, x, tokens, 1e-3, 1.0)
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    ref = statistics.median(wall[names[0]][2:])
    for name in names:
        w, c = statistics.median(wall[name][2:]), statistics.median(cpu[name][2:])
        print(f"{name}: {w:.3f} s/step wall (x{w / ref:.2f} of {names[0]}), {c:.3f} s CPU")
    print(f"load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
