"""Where the demo's time goes: each stage's wall time split into start-up, steps and the rest,
and each training stage's step time inside the demo against the same step in a plain loop.

    PYTHONPATH=. python bench/bench_demo_overhead.py work/demo [--plain-steps 30]

Reads what a finished ``unclip demo --workdir DIR`` left behind (no re-run): the stage
markers (``.stages/*.json``: wall seconds and finishing time), and each training run's
``metrics.jsonl`` (when the loop started, the numerics probe, when stepping began, the
step-time windows, evaluation seconds). For a training stage:

    start-up  stage start -> the train loop running in its worker (Ray Train controller,
              worker group, dataset planning and materialisation)
    set-up    loop start -> first step, less the probe (model, CLIP, held-out rows)
    probe     timing the numerics candidates (0 when cached)
    steps     the sum of the step-time windows (training steps only)
    eval      held-out evaluations during training
    rest      wall - all of the above (checkpoints, copying the result, shutdown)

With ``--plain-steps N`` each training stage's own ``config.json`` is rebuilt and N steps
are timed in this process (the ``Stepper`` of the Ray loop, in-memory batches from the same
table, the numerics the stage used), so ``demo / plain`` is the per-step overhead of
running inside the demo's Ray session.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TRAINED = ("prior", "ar_prior", "decoder", "upsampler")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def stage_breakdown(w: Path, name: str, marker: dict) -> dict[str, float] | None:
    """Seconds per part of one training stage (see the module docstring)."""
    metrics = w / f"{name}.run" / "metrics.jsonl"
    if not metrics.exists():
        return None
    records = read_jsonl(metrics)
    wall = float(marker["seconds"])
    started = float(marker["finished"]) - wall
    head = next((r for r in records if "loop_started" in r), None)
    stepping = next((r for r in records if "steps_started" in r), None)
    if head is None or stepping is None:
        return None
    windows = [r for r in records if "sec_per_step" in r]
    steps, prev = 0.0, int(stepping["step"])
    for r in windows:
        steps += r["sec_per_step"] * (int(r["step"]) - prev)
        prev = int(r["step"])
    evals = sum(float(r.get("eval_seconds", 0.0)) for r in records)
    startup = float(head["loop_started"]) - started
    probe = float(head.get("probe_s", 0.0))
    setup = float(stepping["steps_started"]) - float(head["loop_started"]) - probe
    step_times = [r["sec_per_step"] for r in windows[1:]] or [r["sec_per_step"] for r in windows]
    return {
        "wall": wall,
        "startup": startup,
        "setup": setup,
        "probe": probe,
        "steps": steps,
        "eval": evals,
        "rest": wall - startup - setup - probe - steps - evals,
        "n_steps": prev - int(stepping["step"]),
        "sec_per_step": statistics.median(step_times) if step_times else float("nan"),
        "numerics": head.get("numerics", ""),
    }


def plain_step_time(w: Path, name: str, numerics_label: str, n: int) -> float:
    """Median seconds per step of the stage's own config in a plain loop in this process."""
    import pyarrow.parquet as pq
    import torch

    from training.data import prepare_batch
    from training.harness import TRAIN_CONFIG, Stepper, lr_at, new_state
    from training.presets import train_config_from_dict
    from training.stages import stage_for
    from unclip.checkpoint import load_stage_config
    from unclip.clip import Clip
    from unclip.numerics import Numerics
    from unclip.schema import read_table_info

    cfg = load_stage_config(str(w / name))
    run = train_config_from_dict(json.loads((w / name / TRAIN_CONFIG).read_text()))
    spec = stage_for(cfg)
    files = read_table_info(str(w / "embeddings")).files
    arrays = [
        prepare_batch(pq.read_table(f), spec.columns(), "train", run.heldout_fraction)
        for f in files[:4]
    ]
    data = {k: torch.cat([torch.from_numpy(a[k].copy()) for a in arrays]) for k in arrays[0]}
    rows = len(next(iter(data.values())))
    amp, fmt, threads = numerics_label.split("/")
    settings = Numerics("none" if amp == "fp32" else amp, fmt, int(threads.rstrip("t")))  # type: ignore[arg-type]
    torch.set_num_threads(settings.threads)
    torch.manual_seed(0)
    clip = Clip.load(cfg.clip.model) if spec.needs_clip() else None
    state = new_state(cfg, "cpu", settings.amp)
    settings.apply(state.model)
    stepper = Stepper(spec, state.model, state, clip, settings)
    g = torch.Generator().manual_seed(0)
    times = []
    for step in range(1, n + 4):
        idx = torch.randint(0, rows, (run.batch_size,), generator=g)
        batch = {k: v[idx] for k, v in data.items()}
        t = time.perf_counter()
        stepper(batch, lr_at(step, cfg.optim, run.steps))
        if step > 3:  # warm-up steps are not timed
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("workdir")
    p.add_argument("--plain-steps", type=int, default=0, help="0 = no plain-loop comparison")
    args = p.parse_args()
    w = Path(args.workdir)
    markers = {m.stem: json.loads(m.read_text()) for m in sorted((w / ".stages").glob("*.json"))}
    order = sorted(markers, key=lambda k: markers[k]["finished"])
    total = sum(float(m["seconds"]) for m in markers.values())
    print(f"{w}: {len(markers)} stages, {total / 60:.1f} min in stages")
    head = (
        f"{'stage':<10}{'wall':>7}{'start-up':>9}{'set-up':>7}{'probe':>6}{'steps':>7}"
        f"{'eval':>6}{'rest':>6}{'steps':>7}{'s/step':>8}  numerics"
    )
    print(head)
    rows = {}
    for name in order:
        m = markers[name]
        b = stage_breakdown(w, name, m) if name in TRAINED else None
        if b is None:
            print(f"{name:<10}{float(m['seconds']):>7.0f}")
            continue
        rows[name] = b
        print(
            f"{name:<10}{b['wall']:>7.0f}{b['startup']:>9.1f}{b['setup']:>7.1f}{b['probe']:>6.1f}"
            f"{b['steps']:>7.0f}{b['eval']:>6.1f}{b['rest']:>6.1f}{b['n_steps']:>7d}"
            f"{b['sec_per_step']:>8.3f}  {b['numerics']}"
        )
    if args.plain_steps:
        print(f"\nstep time inside the demo vs a plain loop ({args.plain_steps} steps, median)")
        for name, b in rows.items():
            plain = plain_step_time(w, name, b["numerics"], args.plain_steps)
            print(
                f"{name:<10} demo {b['sec_per_step']:.3f} s/step, plain {plain:.3f} s/step: "
                f"demo / plain {b['sec_per_step'] / plain:.2f}"
            )


if __name__ == "__main__":
    main()
