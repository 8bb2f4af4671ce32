"""Memory as the table grows: the embedding ETL at 1k / 10k / 100k rows, then prior and
decoder training streaming a table larger than the Ray object store.

    PYTHONPATH=. python bench/bench_growth.py [--sizes 1000,10000,100000] [--store-mb 128]
        [--train-rows 100000] [--skip-train]

ETL: for each size, a folder of ``size`` 32 px PNGs + captions (bench_embed.make_images)
embedded by ``run_embed`` on one local Ray for all runs (2 CPUs, ``object_store_memory`` =
``--store-mb``) with the small CLIP of bench_embed (64 px ViT, embed 128), image column
at 32 px. Training: the largest table, read through ``unclip train``'s own path (plan,
``fit_cache``, execute; one worker) on the same Ray, whose object store is smaller than the
table's decoded training split, so the split can only be streamed; the decoder preset's
``cache_data`` is switched off by ``fit_cache`` (its log line is printed) with a budget
below the split's size.

For every run it prints, per kind of process (the driver, GCS, raylet, the embedding
actor, decode tasks, training workers, ...), the largest RSS and the largest private RSS
(``RssAnon``: the part that is not the shared, memory-mapped object store), both sampled
every 0.5 s during that run, and the bytes Ray spilled from the object store to disk
(``ray._private.internal_api.memory_summary``). Flat memory means: peak RSS per process
does not grow with the rows. Check ``uptime`` first: load changes the times, not the memory.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.bench_embed import SMALL_CLIP_CFG, Sampler, _process_kind, make_images  # noqa: E402

MB = 1024 * 1024


def _status_kb(pid: int, keys: tuple[str, ...]) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                name = line.split(":", 1)[0]
                if name in keys:
                    out[name] = int(line.split()[1])
    except OSError:
        pass
    return out


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(name))
    out, frontier = [root], [root]
    while frontier:
        for c in children.get(frontier.pop(), []):
            out.append(c)
            frontier.append(c)
    return out


@dataclass
class Peak:
    rss_kb: int = 0  # largest sampled VmRSS
    anon_kb: int = 0  # largest sampled RssAnon (private memory, no shared object store)
    pids: set[int] = field(default_factory=set)


def _kind(pid: int) -> str:
    kind = _process_kind(pid)
    if kind.startswith("ray::"):  # ray::_StatsActor.update_... -> ray::_StatsActor
        kind = kind.split(".")[0]
    return kind


class RssMeter(Sampler):
    """Peak RSS of this process and every descendant (the local Ray it started), by kind,
    sampled while inside the ``with`` block (one Ray session serves several runs: the
    peaks are those of this run's window, not of each process's lifetime)."""

    def __init__(self, every_s: float = 0.5) -> None:
        super().__init__(every_s)
        self.peaks: dict[str, Peak] = {}
        self.kind_of: dict[int, str] = {}

    def sample(self) -> None:
        for pid in _descendants(os.getpid()):
            kb = _status_kb(pid, ("VmRSS", "RssAnon"))
            if not kb:
                continue
            kind = _kind(pid)
            if kind == "ray::IDLE" and pid in self.kind_of:
                kind = self.kind_of[pid]  # a worker between tasks keeps what it last ran
            self.kind_of[pid] = kind
            p = self.peaks.setdefault(kind, Peak())
            p.rss_kb = max(p.rss_kb, kb.get("VmRSS", 0))
            p.anon_kb = max(p.anon_kb, kb.get("RssAnon", 0))
            p.pids.add(pid)


def spilled_mib() -> float:
    """MiB spilled from the object store to disk in this Ray session so far."""
    from ray._private.internal_api import memory_summary

    text = memory_summary(stats_only=True)
    m = re.search(r"Spilled (\d+) MiB", text)
    return float(m.group(1)) if m else 0.0


def start_ray(store_mb: int) -> None:
    import ray

    from infra import local_ray

    for attempt in range(3):  # Ray waits 30 s for its raylet: a busy machine can miss that
        try:
            local_ray.init(
                num_cpus=2,
                object_store_memory=store_mb * MB,
                include_dashboard=False,
                log_to_driver=False,
                configure_logging=False,
                runtime_env={"env_vars": {"PYTHONPATH": os.getcwd()}},
            )
            break
        except Exception as e:  # noqa: BLE001 - "The current node timed out during startup"
            print(f"ray.init failed ({e}); retrying", flush=True)
            ray.shutdown()
            if attempt == 2:
                raise
    ray.data.DataContext.get_current().enable_progress_bars = False


def report(label: str, meter: RssMeter, spill: float, extra: str) -> None:
    print(f"\n{label}: {extra}; spilled {spill:.0f} MiB", flush=True)
    print(f"  {'process kind':<34}{'procs':>6}{'peak RSS MiB':>14}{'peak anon MiB':>15}")
    for kind, p in sorted(meter.peaks.items(), key=lambda kv: -kv[1].rss_kb):
        if p.rss_kb < 20 * 1024:  # shells, tail, ... below 20 MiB
            continue
        print(f"  {kind:<34}{len(p.pids):>6}{p.rss_kb / 1024:>14.0f}{p.anon_kb / 1024:>15.0f}")


def etl(work: str, clip_uri: str, n: int) -> tuple[str, dict]:
    from pipelines.embed import EmbedOptions, run_embed

    inp, out = os.path.join(work, f"in{n}"), os.path.join(work, f"table{n}")
    t0 = time.perf_counter()
    make_images(inp, n, size=32)
    made = time.perf_counter() - t0
    spilled_before = spilled_mib()
    opts = EmbedOptions(
        input=inp, output=out, clip=clip_uri, batch_size=128, image_size=32, progress=False
    )
    with RssMeter() as meter:
        s = run_embed(opts, log=lambda m: None)
    spill = spilled_mib() - spilled_before
    assert s.embedded == n, s
    shutil.rmtree(inp)
    report(
        f"ETL {n} rows",
        meter,
        spill,
        f"{s.elapsed_s:.0f} s ({n / s.elapsed_s:.0f} rows/s; images made in {made:.0f} s)",
    )
    return out, {k: v.rss_kb for k, v in meter.peaks.items()}


def train(work: str, table: str, stage: str, store_mb: int, steps: int, batch: int) -> None:
    from training.cli import execute, fit_cache, plan, split_bytes

    over = {
        "train": {
            "steps": steps,
            "batch_size": batch,
            "log_every": max(1, steps // 4),
            "eval_every": steps,
            "checkpoint_every": steps,
            "time_limit_minutes": 0,
            "threads": 2,
            "cpus_per_worker": 1.0,
        }
    }
    if stage == "decoder":  # a narrower UNet: the point is the data path, not the model
        over["net"] = {"base_channels": 16}
    job = plan(stage, table, os.path.join(work, stage), overrides=over, workers=1)
    need = split_bytes(job)
    if job.run.cache_data:  # the presets that cache: show the fallback, budget below the split
        job = fit_cache(job, budget=need // 2)
    spilled_before = spilled_mib()
    with RssMeter() as meter:
        t0 = time.perf_counter()
        out = execute(job)
        took = time.perf_counter() - t0
    spill = spilled_mib() - spilled_before
    rows = out.step * batch
    report(
        f"{stage} training, streamed",
        meter,
        spill,
        f"decoded training split {need / MB:.0f} MiB vs object store {store_mb} MiB; "
        f"{out.step} steps x {batch} = {rows} rows streamed "
        f"({rows * need / max(1, job.table.num_rows) / MB:.0f} MiB) in {took:.0f} s; "
        f"cache_data {job.run.cache_data}",
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="1000,10000,100000")
    p.add_argument("--store-mb", type=int, default=80, help="object_store_memory (MiB)")
    p.add_argument("--prior-steps", type=int, default=800)
    p.add_argument("--decoder-steps", type=int, default=300)
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--work", default="")
    args = p.parse_args()
    import open_clip
    import torch

    from unclip.clip import save_clip_checkpoint

    print(f"load average: {os.getloadavg()}", flush=True)
    work = args.work or tempfile.mkdtemp(prefix="bench_growth_")
    os.makedirs(work, exist_ok=True)
    clip_uri = os.path.join(work, "clip")
    torch.manual_seed(0)
    save_clip_checkpoint(clip_uri, open_clip.model.CLIP(**SMALL_CLIP_CFG), SMALL_CLIP_CFG)
    sizes = [int(s) for s in args.sizes.split(",")]
    peaks, table = {}, ""
    start_ray(args.store_mb)  # one session for all runs (a restart per run is slow here)
    for n in sizes:
        table, peaks[n] = etl(work, clip_uri, n)
    kinds = sorted({k for v in peaks.values() for k, kb in v.items() if kb > 20 * 1024})
    print(f"\nETL peak RSS (MiB) by process kind and rows (object store {args.store_mb} MiB):")
    print(f"  {'process kind':<34}" + "".join(f"{n:>10}" for n in sizes))
    for k in kinds:
        print(f"  {k:<34}" + "".join(f"{peaks[n].get(k, 0) / 1024:>10.0f}" for n in sizes))
    if not args.skip_train:
        train(work, table, "prior", args.store_mb, args.prior_steps, 128)
        train(work, table, "decoder", args.store_mb, args.decoder_steps, 128)
    print(f"\nload average: {os.getloadavg()}")
    import ray

    ray.shutdown()
    if not args.work:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
