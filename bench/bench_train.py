"""Training throughput: Ray Train vs the same step in a plain process, 1 vs 2 workers, and
the numerics probe's choice against every alternative.

    PYTHONPATH=. python bench/bench_train.py [--stages decoder,prior] [--rows 2048]

For each stage at its quick-preset size (CPU), on a synthetic table embedded with a random
CLIP of the embedded default's shape (embed 128, text width 128, context 32):

    probe   ``training.harness.choose_numerics`` (what ``unclip train`` runs before step 1,
            here without its cache): the settings it picks and its own timings
    plain   ``training.harness.Stepper`` on in-memory batches in this process under every
            candidate setting (fp32 / bf16 autocast x contiguous / channels-last, 2 threads):
            the same step code as the Ray loop, without Ray, Ray Data or DDP
    ray x1  ``unclip train``'s path (plan + execute): TorchTrainer, 1 worker, 2 threads,
            data streamed from the Parquet table through Ray Data, numerics "auto"
    ray x2  2 workers (DDP over gloo), 1 thread each, the same per-worker batch
    ray x2h 2 workers, 1 thread each, half the batch each: the same global batch (the same
            training, step for step) as ray x1, split over the two cores by DDP instead of
            by intra-op threads

Seconds per step are measured in windows of ``--window`` steps (the Ray loop's own
``metrics.jsonl`` windows, skipping the first, which holds the start-up); the script prints
median window times and the ratios: the probe's pick against the fastest plain setting, and
ray x1 against plain under the settings the probe picked. Check ``uptime`` first: other
processes on the machine distort the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import open_clip
import pyarrow.parquet as pq
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.tables import write_table  # noqa: E402
from training.cli import execute, plan  # noqa: E402
from training.data import prepare_batch  # noqa: E402
from training.harness import Stepper, choose_numerics, lr_at, new_state  # noqa: E402
from training.stages import stage_for  # noqa: E402
from unclip.clip import Clip, save_clip_checkpoint  # noqa: E402
from unclip.numerics import Numerics, candidates  # noqa: E402
from unclip.schema import read_table_info  # noqa: E402

# the embedded default's CLIP shape (docs/benchmarks.md, "Sizing the CPU presets"), randomly initialised
BENCH_CLIP = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 64, "layers": 3, "width": 128, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 3},
}
STEPS = {"decoder": 70, "prior": 240, "upsampler": 70}


def make_table(root: str, rows: int) -> str:
    torch.manual_seed(0)
    save_clip_checkpoint(f"{root}/clip", open_clip.model.CLIP(**BENCH_CLIP), BENCH_CLIP)
    write_table(f"{root}/table", Clip.load(f"{root}/clip"), n=rows, image_size=64, files=4)
    return f"{root}/table"


def run_options(stage: str, window: int, **extra) -> dict:
    steps = STEPS[stage]
    return {
        "train": {
            "steps": steps,
            "log_every": window,
            "eval_every": steps,  # evaluate and checkpoint only at the end: clean windows
            "checkpoint_every": steps,
            "time_limit_minutes": 0,
            **extra,
        }
    }


def load_plain(stage: str, table: str, window: int):
    job = plan(stage, table, tempfile.mkdtemp() + "/x", overrides=run_options(stage, window))
    cfg, run = job.stage, job.run
    spec = stage_for(cfg)
    arrays = [
        prepare_batch(pq.read_table(f), spec.columns(), "train", run.heldout_fraction)
        for f in read_table_info(table).files
    ]
    data = {k: torch.cat([torch.from_numpy(a[k]) for a in arrays]) for k in arrays[0]}
    clip = Clip.load(cfg.clip.model) if spec.needs_clip() else None
    return cfg, run, spec, data, clip


def plain(loaded, window: int, n: Numerics) -> list[float]:
    """Window times (s/step) of the Stepper on in-memory batches under ``n``, no Ray."""
    cfg, run, spec, data, clip = loaded
    rows = len(next(iter(data.values())))
    torch.set_num_threads(n.threads)
    torch.manual_seed(0)
    state = new_state(cfg, "cpu", n.amp)
    n.apply(state.model)
    stepper = Stepper(spec, state.model, state, clip, n)
    g = torch.Generator().manual_seed(0)
    times, t = [], time.perf_counter()
    for step in range(1, run.steps + 1):
        idx = torch.randint(0, rows, (run.batch_size,), generator=g)
        stepper({k: v[idx] for k, v in data.items()}, lr_at(step, cfg.optim, run.steps))
        if step % window == 0:
            now = time.perf_counter()
            times.append((now - t) / window)
            t = now
    return times[1:]


def probe_choice(loaded) -> Numerics:
    cfg, run, spec, data, clip = loaded
    batch = {k: v[: run.batch_size] for k, v in data.items()}
    choice = choose_numerics(spec, run, torch.device("cpu"), 2, batch, clip, 1, cache=_NoCache())
    print(f"  probe: {choice.summary()}", flush=True)
    return choice.numerics


class _NoCache:
    """A cache that never hits: the benchmark measures the probe itself."""

    def get(self, workload: str) -> None:
        return None

    def put(self, *args) -> None:
        pass


def ray_train(
    stage: str, table: str, window: int, workers: int, batch: int = 0
) -> tuple[list[float], int]:
    """Window times (s/step) of a real Ray Train run with ``workers`` workers (per-worker
    ``batch`` rows if given, else the preset's)."""
    extra = {"threads": 2 // workers, "cpus_per_worker": 1.0 / workers}
    if batch:
        extra["batch_size"] = batch
    root = tempfile.mkdtemp()
    job = plan(
        stage, table, f"{root}/{stage}", overrides=run_options(stage, window, **extra),
        workers=workers,
    )  # fmt: skip
    execute(job)
    with open(f"{root}/{stage}.run/metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    times = [r["sec_per_step"] for r in records if "sec_per_step" in r]
    return times[1:-1], job.run.batch_size  # the last window holds the evaluation


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stages", default="decoder,prior")
    p.add_argument("--rows", type=int, default=2048)
    p.add_argument("--window", type=int, default=10)
    p.add_argument("--ray", default="x1,x2,x2h", help="Ray runs to time (x1 is needed)")
    args = p.parse_args()
    modes = set(args.ray.split(","))
    import ray

    print(f"load average before: {os.getloadavg()}", flush=True)
    root = tempfile.mkdtemp(prefix="bench-train-")
    table = make_table(root, args.rows)
    from infra import local_ray

    local_ray.init(
        num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False
    )
    ray.data.DataContext.get_current().enable_progress_bars = False
    rows = []
    for stage in args.stages.split(","):
        loaded = load_plain(stage, table, args.window)
        print(f"{stage}:", flush=True)
        chosen = probe_choice(loaded)
        conv = stage in ("decoder", "upsampler")
        settings = candidates(torch.device("cpu"), 2, convolutional=conv)
        if chosen not in settings:
            settings.append(chosen)
        plain_s = {}
        for n in settings:
            plain_s[n] = statistics.median(plain(loaded, args.window, n))
            print(f"  plain {n.label}: {plain_s[n]:.3f} s/step", flush=True)
        one, batch = ray_train(stage, table, args.window, 1)
        nan = [float("nan")]
        two = ray_train(stage, table, args.window, 2)[0] if "x2" in modes else nan
        half = ray_train(stage, table, args.window, 2, batch // 2)[0] if "x2h" in modes else nan
        r1, r2, rh = statistics.median(one), statistics.median(two), statistics.median(half)
        print(
            f"  ray x1 {r1:.3f} s/step (windows {', '.join(f'{x:.3f}' for x in one)}) | "
            f"ray x2 {r2:.3f} s/step | ray x2h {rh:.3f} s/step "
            f"(windows {', '.join(f'{x:.3f}' for x in half)})",
            flush=True,
        )
        rows.append((stage, batch, plain_s, chosen, r1, r2, rh))
    print(f"\nload average after: {os.getloadavg()}")
    print(
        f"{'stage':<10}{'batch':>6}{'probe pick':>24}{'fastest plain':>24}{'pick/fastest':>13}"
        f"{'plain(pick)':>12}{'ray x1':>8}{'x1/plain':>9}{'ray x2':>8}{'x2/x1 samples/s':>17}"
        f"{'ray x2h':>8}{'x2h/x1':>10}"
    )
    for stage, batch, plain_s, chosen, r1, r2, rh in rows:
        fastest = min(plain_s, key=plain_s.get)
        base = plain_s[chosen]
        # ratios of throughput: > 1 means faster than the reference
        print(
            f"{stage:<10}{batch:>6}{chosen.label:>24}{fastest.label:>24}"
            f"{plain_s[fastest] / base:>13.2f}{base:>12.3f}{r1:>8.3f}{base / r1:>9.2f}"
            f"{r2:>8.3f}{(2 * batch / r2) / (batch / r1):>17.2f}{rh:>8.3f}{r1 / rh:>10.2f}"
        )
    ray.shutdown()


if __name__ == "__main__":
    main()
