"""CLI commands that need no Ray: ``unclip bundle`` and ``unclip generate``."""

from __future__ import annotations

import argparse
import math
import sys
import time

from unclip import fs
from unclip.checkpoint import make_bundle


def bundle(args: argparse.Namespace) -> int:
    spec = make_bundle(
        args.out,
        args.clip,
        args.prior,
        args.decoder,
        args.upsampler,
        clip_pretrained=args.pretrained,
    )
    print(
        f"bundle written to {args.out}: stages {', '.join(spec.stages)}; "
        f"CLIP {spec.clip['model']} (dim {spec.clip['embed_dim']})"
    )
    return 0


def generate(args: argparse.Namespace) -> int:
    from unclip.errors import UserError
    from unclip.pipeline import UnclipPipeline, grid, png_bytes

    if not args.prompt.strip():
        raise UserError('the prompt is empty; pass a caption, e.g. "a small red circle"')
    if not 1 <= args.num_images <= 64:
        raise UserError(f"-n must be between 1 and 64, got {args.num_images}")
    t0 = time.perf_counter()
    pipe = UnclipPipeline.from_bundle(args.bundle, device=args.device)
    settings = pipe.resolve(
        prior_steps=args.prior_steps,
        decoder_steps=args.decoder_steps,
        upsampler_steps=args.upsampler_steps,
        prior_guidance_scale=args.prior_guidance_scale,
        decoder_guidance_scale=args.decoder_guidance_scale,
        candidates=args.candidates,
    )
    load_s = time.perf_counter() - t0
    out = pipe.generate(args.prompt, args.num_images, args.seed, settings)
    for note in out.warnings:
        print(f"warning: {note}", file=sys.stderr)
    cols = math.ceil(math.sqrt(args.num_images))
    fs.write_bytes(args.out, png_bytes(grid(out.images, cols)))
    stages = ", ".join(f"{k} {v:.2f}s" for k, v in out.timings.items())
    print(
        f"wrote {args.out}: {args.num_images} image(s) of {out.images.shape[1]} px, "
        f"seed {args.seed} (load {load_s:.1f}s; {stages})"
    )
    return 0
