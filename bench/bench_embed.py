"""Embedding ETL throughput: the Ray Data pipeline vs a plain single-process PyTorch loop.

    python bench/bench_embed.py [--n 20000] [--batch-size 128] [--repeats 3] [--cpus 2] [--cold]
    python bench/bench_embed.py --compare-workers [--n 4000]   # 1 vs 2 embedding actors

Both sides do the same work on the same generated folder of 64 px PNGs + captions with
the same CLIP (the small CLIP of docs/benchmarks.md: embed 128, ViT 128 x 3 layers, patch 8 on 64 px,
text 128 x 3 layers, context 32; random weights) and the same batch size:
read, decode, centre crop, re-encode the image column (PNG, 64 px), tokenize, embed text
and images, write Parquet. The plain loop runs in this process with ``--cpus`` torch
threads; the pipeline runs on a local Ray with ``--cpus`` CPUs (``run_embed``, fresh output
each time). Prints the median rows/s of each, end to end (the pipeline includes its
start-up: worker processes and the actor loading the CLIP) and after the first committed
part (steady state), and their ratios. Run it on a quiet machine (check ``uptime``): on a
busy one the wall-clock ratio means little, so it also prints the CPU milliseconds per row
each side spends (all processes of the local Ray included), which do not depend on load.

In that in-process comparison the plain loop has torch and open_clip imported already,
while the pipeline's actor is a new process that imports them (about 4.5 s here) and loads
the CLIP. ``--cold`` adds the comparison a user sees: each side as a fresh process from
the command line to its exit, both paying their imports: ``python -c "...plain_loop(...)"``
against ``unclip embed`` connected to the running Ray (as a scheduled job on a long-lived
cluster is; its driver, its actor and its tasks all start anew).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Self

import numpy as np
import open_clip
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image, ImageDraw

from pipelines import sources, table
from pipelines.decode import decode_image, read_caption
from unclip.clip import Clip, save_clip_checkpoint
from unclip.schema import parquet_files, table_schema

SMALL_CLIP_CFG = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 64, "layers": 3, "width": 128, "patch_size": 8, "head_width": 64},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 3},
}
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 180, 60),
    "blue": (40, 60, 220),
    "yellow": (230, 210, 40),
}
SHAPES = ("circle", "square", "triangle")


def make_images(root: str, n: int, size: int = 64, seed: int = 0) -> None:
    """``n`` PNGs of one coloured shape on a noisy background, with template captions."""
    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        colour = list(COLOURS)[rng.integers(len(COLOURS))]
        shape = SHAPES[rng.integers(len(SHAPES))]
        bg = rng.integers(0, 60, (size, size, 3), dtype=np.uint8) + 150
        img = Image.fromarray(bg)
        d = ImageDraw.Draw(img)
        r = int(rng.integers(size // 8, size // 3))
        cx, cy = rng.integers(r, size - r, 2)
        box = (cx - r, cy - r, cx + r, cy + r)
        if shape == "circle":
            d.ellipse(box, fill=COLOURS[colour])
        elif shape == "square":
            d.rectangle(box, fill=COLOURS[colour])
        else:
            d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=COLOURS[colour])
        img.save(os.path.join(root, f"{i:06d}.png"))
        with open(os.path.join(root, f"{i:06d}.txt"), "w") as f:
            f.write(f"a {'small' if r < size // 5 else 'large'} {colour} {shape}")


def plain_loop(inp: str, out: str, clip_uri: str, batch_size: int, threads: int) -> float:
    """The same work without Ray: one process, ``threads`` torch threads. Returns seconds."""
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    clip = Clip.load(clip_uri)
    ident = clip.identity
    _, files = sources.detect(inp)
    entries = sources.index_folder(inp, files).entries
    schema = table_schema(ident.embed_dim, ident)
    os.makedirs(out, exist_ok=True)
    for start in range(0, len(entries), batch_size):
        batch = entries[start : start + batch_size]
        captions, pngs, pixels = [], [], []
        for e in batch:
            with open(e.loc[1], "rb") as f:
                img = decode_image(f.read(), ident.image_size, 64)
            with open(e.loc[2], "rb") as f:
                captions.append(read_caption(f.read()))
            pngs.append(img.png)
            pixels.append(img.pixels)
        tokens, _ = clip.tokenize(captions)
        text_emb = clip.encode_text(tokens).numpy()
        x = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float() / 127.5 - 1
        image_emb = clip.encode_images(x).numpy()
        t = pa.table(
            {
                "id": [e.id for e in batch],
                "caption": captions,
                "source": [e.source for e in batch],
                "image": pngs,
                "text_emb": table.embedding_array(text_emb),
                "image_emb": table.embedding_array(image_emb),
                "text_tokens": table.tokens_array(clip.strip_tokens(tokens)),
            }
        ).cast(schema)
        pq.write_table(t, os.path.join(out, f"part-{start:08d}.parquet"), compression="zstd")
    return time.perf_counter() - t0


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _timed(cmd: list[str], env: dict[str, str]) -> float:
    """Seconds from spawning ``cmd`` to its exit; fails loudly if it fails."""
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    if r.returncode:
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed:\n{r.stderr[-2000:]}")
    return elapsed


def cold_jobs(inp: str, work: str, clip_uri: str, args: argparse.Namespace) -> tuple[float, float]:
    """Rows/s of each side run as a fresh process (imports included); see the docstring."""
    import ray

    env = dict(os.environ, PYTHONPATH=ROOT, RAY_ADDRESS=ray.get_runtime_context().gcs_address)
    out = os.path.join(work, "cold_plain")
    code = (
        "from bench.bench_embed import plain_loop; "
        f"plain_loop({inp!r}, {out!r}, {clip_uri!r}, {args.batch_size}, {args.cpus})"
    )
    plain = args.n / _timed([sys.executable, "-c", code], env)
    shutil.rmtree(out)
    out = os.path.join(work, "cold_ray")
    cmd = [sys.executable, "-m", "unclip.cli", "embed", "--input", inp, "--output", out]
    cmd += ["--clip", clip_uri, "--batch-size", str(args.batch_size), "--image-size", "64"]
    cmd += ["--workers", str(args.workers), "--cpus-per-worker", str(args.cpus_per_worker)]
    cmd += ["--threads-per-worker", str(args.threads_per_worker)]
    cmd += ["--rows-per-read", str(args.rows_per_read)]
    pipeline = args.n / _timed(cmd, env)
    rows = sum(pq.read_metadata(f).num_rows for f in parquet_files(out))
    assert rows == args.n, f"the cold pipeline job wrote {rows} rows, not {args.n}"
    shutil.rmtree(out)
    return plain, pipeline


def _descendant_cpu(root: int) -> dict[tuple[int, int], float]:
    """{(pid, start time): CPU seconds} of ``root`` and its descendants, from /proc (Linux)."""
    tick = os.sysconf("SC_CLK_TCK")
    procs = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # after "pid (comm)": state ppid ... utime(14) stime(15) ... starttime(22), 1-based
        ppid, utime, stime, start = (
            int(fields[1]),
            int(fields[11]),
            int(fields[12]),
            int(fields[19]),
        )
        procs[int(name)] = (ppid, start, (utime + stime) / tick)
    keep, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, _, _) in procs.items():
            if ppid == parent and pid not in keep:
                keep.add(pid)
                frontier.append(pid)
    return {(pid, procs[pid][1]): procs[pid][2] for pid in keep if pid in procs}


def _process_kind(pid: int) -> str:
    """A short name for a process: Ray's process title (ray::Embedder...) or the program."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return "?"
    first = argv[0].decode(errors="replace")
    if first.startswith("ray::"):
        for k in ("Embedder", "decode_units", "_commit", "IDLE"):
            if k in first:
                return f"ray::{k}"
        return first.split("(")[0][:40]
    if pid == os.getpid():
        return "driver"
    prog = next((a.decode() for a in argv[1:] if a.endswith(b".py")), first)
    return os.path.basename(prog.split()[0]) if prog else "?"


class Sampler:
    """``sample()`` on entering a ``with`` block, every ``every_s`` seconds in a thread while
    inside it, and on leaving; ``own`` is the sampling thread's own CPU time."""

    def __init__(self, every_s: float) -> None:
        self.every_s, self.stop, self.own = every_s, threading.Event(), 0.0

    def sample(self) -> None:
        raise NotImplementedError

    def begin(self) -> None:
        self.sample()

    def run(self) -> None:
        t0 = time.thread_time()
        while not self.stop.wait(self.every_s):
            self.sample()
        self.own = time.thread_time() - t0

    def __enter__(self) -> Self:
        self.begin()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        self.sample()


class CpuMeter(Sampler):
    """CPU seconds (user + system) used by this process and all its descendants (the Ray it
    started: GCS, raylet, workers, actors) while inside the ``with`` block. Sampled every
    0.2 s so that processes which exit (the actor at the end) still count, less <0.2 s."""

    def __init__(self, every_s: float = 0.2) -> None:
        super().__init__(every_s)
        self.first: dict[tuple[int, int], float] = {}
        self.last: dict[tuple[int, int], float] = {}
        self.kind: dict[str, float] = {}
        self.started: set[tuple[int, int]] = set()

    def sample(self) -> None:
        for key, cpu in _descendant_cpu(os.getpid()).items():
            prev = self.last.get(key, self.first.get(key, 0.0 if self.started else cpu))
            self.first.setdefault(key, cpu)
            self.last[key] = cpu
            if cpu > prev:  # attribute the time to what the process is doing now
                kind = _process_kind(key[0])
                self.kind[kind] = self.kind.get(kind, 0.0) + cpu - prev

    def begin(self) -> None:
        self.sample()
        self.started = set(self.first)

    def by_kind(self) -> dict[str, float]:
        """CPU seconds per kind of process at the time it was used (sampled)."""
        out = dict(self.kind)
        out["driver"] = out.get("driver", 0.0) - self.own
        return {k: v for k, v in sorted(out.items(), key=lambda kv: -kv[1]) if v > 0.005}

    @property
    def seconds(self) -> float:
        used = sum(self.last[k] - (self.first[k] if k in self.started else 0.0) for k in self.last)
        return used - self.own


def compare_workers(inp: str, work: str, opts: dict, args: argparse.Namespace) -> None:
    """Rows/s of the pipeline with 1 actor (1 CPU) and 2 actors (0.5 CPU each) on the same
    ``--cpus``: what a second embedding worker buys on this machine (issue 15, item 6)."""
    from pipelines.embed import EmbedOptions, run_embed

    layouts = {1: {"workers": 1, "cpus_per_worker": 1.0}, 2: {"workers": 2, "cpus_per_worker": 0.5}}
    rates: dict[int, list[float]] = {1: [], 2: []}
    steady: dict[int, list[float]] = {1: [], 2: []}
    cpu: dict[int, list[float]] = {1: [], 2: []}
    for r in range(args.repeats):
        for n, layout in layouts.items():
            out = os.path.join(work, f"w{n}_{r}")
            o = {**opts, **layout, "threads_per_worker": 0}  # threads: the node's CPUs / actors
            with CpuMeter() as meter:
                s = run_embed(EmbedOptions(input=inp, output=out, **o), log=lambda m: None)
            assert s.embedded == args.n, s
            rates[n].append(s.embedded / s.elapsed_s)
            steady[n].append(s.steady_rows_per_s)
            cpu[n].append(meter.seconds / args.n * 1e3)
            shutil.rmtree(out)
            print(
                f"repeat {r}, {n} actor(s): {rates[n][-1]:.0f} rows/s end to end, "
                f"{steady[n][-1]:.0f} steady, {cpu[n][-1]:.2f} CPU ms/row",
                flush=True,
            )
    med = statistics.median
    e2e = med(b / a for a, b in zip(rates[1], rates[2], strict=True))
    st = med(b / a for a, b in zip(steady[1], steady[2], strict=True))
    print(
        f"2 vs 1 embedding actors (same {args.cpus} CPUs): throughput ratio {e2e:.2f} end to "
        f"end, {st:.2f} steady (medians of per-repeat ratios); CPU ms/row "
        f"{med(cpu[1]):.2f} vs {med(cpu[2]):.2f}"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=20000, help="images (20000: the demo's table)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cpus", type=int, default=2)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--threads-per-worker", type=int, default=0)
    p.add_argument("--rows-per-read", type=int, default=256)
    p.add_argument("--cold", action="store_true", help="also time both sides as fresh processes")
    p.add_argument("--stats", action="store_true", help="print Ray Data's operator stats")
    p.add_argument(
        "--compare-workers",
        action="store_true",
        help="instead: the pipeline with 1 embedding actor (1 CPU) vs 2 (0.5 CPU each), "
        "same --cpus, back to back per repeat; prints the throughput ratio",
    )
    args = p.parse_args()

    import ray

    from pipelines.embed import EmbedOptions, run_embed

    work = tempfile.mkdtemp(prefix="bench_embed_")
    inp, clip_uri = os.path.join(work, "in"), os.path.join(work, "clip")
    torch.manual_seed(0)
    save_clip_checkpoint(clip_uri, open_clip.model.CLIP(**SMALL_CLIP_CFG), SMALL_CLIP_CFG)
    make_images(inp, args.n)
    print(f"load: {os.getloadavg()[0]:.2f}; {args.n} images of 64 px, batch {args.batch_size}")
    ray.init(
        num_cpus=args.cpus, include_dashboard=False, logging_level="warning", log_to_driver=False
    )
    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    opts = dict(
        clip=clip_uri,
        batch_size=args.batch_size,
        workers=args.workers,
        cpus_per_worker=args.cpus_per_worker,
        threads_per_worker=args.threads_per_worker,
        rows_per_read=args.rows_per_read,
        image_size=64,
        progress=False,
        stats=args.stats,
    )
    # warm-up: start Ray's worker processes once, as a long-running cluster would have
    run_embed(
        EmbedOptions(input=inp, output=os.path.join(work, "warm"), **opts), log=lambda m: None
    )
    if args.compare_workers:
        compare_workers(inp, work, opts, args)
        ray.shutdown()
        shutil.rmtree(work)
        return
    plain, e2e, steady, cpu_plain, cpu_ray, cold_plain, cold_ray = [], [], [], [], [], [], []
    for r in range(args.repeats):
        out = os.path.join(work, f"plain{r}")
        c0 = time.process_time()
        plain.append(args.n / plain_loop(inp, out, clip_uri, args.batch_size, args.cpus))
        cpu_plain.append((time.process_time() - c0) / args.n * 1e3)
        shutil.rmtree(out)
        out = os.path.join(work, f"ray{r}")
        with CpuMeter() as meter:
            s = run_embed(EmbedOptions(input=inp, output=out, **opts), log=lambda m: None)
        assert s.embedded == args.n, s
        e2e.append(s.embedded / s.elapsed_s)
        steady.append(s.steady_rows_per_s)
        cpu_ray.append(meter.seconds / args.n * 1e3)
        parts = ", ".join(f"{k} {v / args.n * 1e3:.2f}" for k, v in meter.by_kind().items())
        print(f"  pipeline CPU ms/row by process: {parts}")
        shutil.rmtree(out)
        print(
            f"repeat {r}: plain {plain[-1]:.0f} rows/s ({cpu_plain[-1]:.2f} CPU ms/row), "
            f"pipeline {e2e[-1]:.0f} rows/s end to end ({s.first_commit_s:.1f} s to the first "
            f"part, {steady[-1]:.0f} rows/s after; {cpu_ray[-1]:.2f} CPU ms/row)"
        )
        if args.cold:
            cp_, cr_ = cold_jobs(inp, work, clip_uri, args)
            cold_plain.append(cp_)
            cold_ray.append(cr_)
            print(f"  cold jobs: plain {cp_:.0f} rows/s, unclip embed {cr_:.0f} rows/s")
    mp, me, ms, cp, cr = (statistics.median(x) for x in (plain, e2e, steady, cpu_plain, cpu_ray))
    print(
        f"plain single-process loop: {mp:.0f} rows/s, {cp:.2f} CPU ms/row (medians of {args.repeats})"
    )
    print(
        f"Ray Data pipeline:         {me:.0f} rows/s end to end, {ms:.0f} rows/s steady, {cr:.2f} CPU ms/row"
    )
    # each repeat runs both sides back to back: the median of the paired ratios is less
    # sensitive to the machine drifting between repeats than the ratio of the medians
    pe = statistics.median(e / p_ for e, p_ in zip(e2e, plain, strict=True))
    ps = statistics.median(s_ / p_ for s_, p_ in zip(steady, plain, strict=True))
    print(
        f"ratio pipeline/plain:      {pe:.2f} end to end, {ps:.2f} steady "
        f"(median of per-repeat ratios; ratio of medians {me / mp:.2f} / {ms / mp:.2f})"
    )
    print(f"CPU cost ratio plain/pipeline: {cp / cr:.2f} (load-independent efficiency)")
    if args.cold:
        cp_, cr_ = statistics.median(cold_plain), statistics.median(cold_ray)
        pc_ = statistics.median(r / p_ for r, p_ in zip(cold_ray, cold_plain, strict=True))
        print(
            f"cold jobs (fresh processes, imports included): plain {cp_:.0f} rows/s, "
            f"unclip embed {cr_:.0f} rows/s, ratio {pc_:.2f} (ratio of medians {cr_ / cp_:.2f})"
        )
    print(f"load: {os.getloadavg()[0]:.2f}")
    ray.shutdown()
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
