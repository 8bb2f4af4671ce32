"""Why the ETL's embedding actor slices batches across threads instead of using intra-op threads.

    python bench/bench_embed_threads.py [--threads 2] [--repeats 15]

The same decoded batch of 128 rows (64 px PNGs, the small CLIP of bench_embed.py) embedded by
``pipelines.embedder.Embedder`` three ways: one torch thread; ``--threads`` torch intra-op
threads; ``--threads`` slices of the batch in parallel threads of one torch thread each (what
the ETL does). First on an idle machine, then with one other process busy on a core, as the
decode tasks are beside the actor in the pipeline. Prints median ms/row of each.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import tempfile
import time
from collections.abc import Callable

import open_clip
import torch

from bench.bench_embed import SMALL_CLIP_CFG, make_images
from pipelines import sources
from pipelines.decode import decode_rows
from pipelines.embedder import Embedder
from unclip.clip import save_clip_checkpoint


def _burn(stop: mp.synchronize.Event) -> None:
    x = 0
    while not stop.is_set():
        for _ in range(100_000):
            x += 1


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=15)
    args = p.parse_args()
    work = tempfile.mkdtemp(prefix="bench_threads_")
    torch.manual_seed(0)
    clip = os.path.join(work, "clip")
    save_clip_checkpoint(clip, open_clip.model.CLIP(**SMALL_CLIP_CFG), SMALL_CLIP_CFG)
    make_images(os.path.join(work, "in"), 128)
    _, files = sources.detect(os.path.join(work, "in"))
    entries = sources.index_folder(os.path.join(work, "in"), files).entries
    batch = decode_rows(sources.read_unit(sources.make_units(entries, 128)[0]), 64, 64)
    one, sliced = Embedder(clip, threads=1), Embedder(clip, threads=args.threads)

    def timed(embedder: Embedder, torch_threads: int) -> Callable[[], float]:
        def run() -> float:
            torch.set_num_threads(torch_threads)
            t0 = time.perf_counter()
            embedder(batch)
            return (time.perf_counter() - t0) / batch.num_rows * 1e3

        return run

    ways = {
        "1 thread": timed(one, 1),
        f"{args.threads} intra-op threads": timed(one, args.threads),
        f"{args.threads} slices (the ETL)": timed(sliced, 1),
    }
    print(f"load: {os.getloadavg()[0]:.2f}; {os.cpu_count()} CPUs; batch of {batch.num_rows}")
    for label, busy in (("idle machine", False), ("one core busy", True)):
        stop = mp.Event()
        burner = mp.Process(target=_burn, args=(stop,)) if busy else None
        if burner:
            burner.start()
            time.sleep(0.5)
        times: dict[str, list[float]] = {k: [] for k in ways}
        for i in range(args.repeats + 3):  # interleaved; the first 3 are warm-up
            for k, f in ways.items():
                t = f()
                if i >= 3:
                    times[k].append(t)
        if burner:
            stop.set()
            burner.join()
        cells = ", ".join(f"{k} {statistics.median(v):.2f}" for k, v in times.items())
        print(f"{label}: ms/row (median of {args.repeats}): {cells}")


if __name__ == "__main__":
    main()
