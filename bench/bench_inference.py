"""Sampling speed of a bundle's stages under each numerics setting: is inference worth probing?

    PYTHONPATH=. python bench/bench_inference.py --bundle work/demo/bundle [--batch 16]

For the prior, the decoder and each upsampler: one ``sample`` call at the bundle's default
steps (batch ``--batch``, the eval stage's batch) under fp32 / bf16 autocast x contiguous /
channels-last at the process's threads, timed in interleaved rounds (median of
``--repeats``), plus the largest pixel difference of each setting's output from fp32's (same
seed). Prints seconds per call and the speed-up against fp32/contiguous. Check ``uptime``
first: other processes on the machine distort the numbers.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from unclip import numerics  # noqa: E402
from unclip.pipeline import (  # noqa: E402
    UnclipPipeline,
    encode_prompts,
    image_seeds,
    sample_decoder,
    sample_prior,
    sample_upsampler,
)


def timed(
    options: list[numerics.Numerics], run: Callable[[numerics.Numerics], torch.Tensor], repeats: int
) -> tuple[dict[numerics.Numerics, float], dict[numerics.Numerics, float]]:
    """Median seconds per call and max |output - fp32 output| per option."""
    outs = {o: run(o) for o in options}  # warm-up, and the outputs compared
    ref = outs[numerics.default_of(options)].float()
    diff = {o: (outs[o].float() - ref).abs().max().item() for o in options}
    times: dict[numerics.Numerics, list[float]] = {o: [] for o in options}
    for _ in range(repeats):
        for o in options:
            t = time.perf_counter()
            run(o)
            times[o].append(time.perf_counter() - t)
    return {o: statistics.median(v) for o, v in times.items()}, diff


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bundle", required=True)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    threads = torch.get_num_threads()
    pipe = UnclipPipeline.from_bundle(args.bundle)
    s = pipe.settings
    seeds = image_seeds(0, args.batch)
    text = encode_prompts(pipe.clip, ["a red circle in the middle"] * args.batch, pipe.with_states)
    with torch.no_grad():
        emb = sample_prior(pipe.prior, text, seeds, s)
        base = sample_decoder(pipe.decoder, emb, text, seeds, s)
    device = torch.device("cpu")
    print(
        f"threads {threads}, batch {args.batch}, steps prior {s.prior_steps} decoder "
        f"{s.decoder_steps} upsampler {s.upsampler_steps}",
        flush=True,
    )

    stages: list[tuple[str, torch.nn.Module, bool, Callable[[torch.nn.Module], torch.Tensor]]] = [
        ("prior", pipe.prior, False, lambda m: sample_prior(m, text, seeds, s)),
        ("decoder", pipe.decoder, True, lambda m: sample_decoder(m, emb, text, seeds, s)),
    ]
    for i, up in enumerate(pipe.upsamplers):
        stages.append(
            (f"upsampler{i + 1}", up, True, lambda m, i=i: sample_upsampler(m, base, seeds, s, i))
        )
    for name, model, conv, call in stages:
        options = numerics.candidates(device, threads, convolutional=conv)
        copies = {o: o.apply(copy.deepcopy(model)) for o in options}

        def run(o: numerics.Numerics, copies=copies, call=call) -> torch.Tensor:
            with torch.no_grad(), o.autocast("cpu"):
                return call(copies[o])

        secs, diff = timed(options, run, args.repeats)
        ref = secs[numerics.default_of(options)]
        line = ", ".join(
            f"{o.label} {secs[o]:.2f}s ({ref / secs[o]:.2f}x, max diff {diff[o]:.3f})"
            for o in sorted(options, key=lambda o: secs[o])
        )
        print(f"{name}: {line}", flush=True)


if __name__ == "__main__":
    main()
