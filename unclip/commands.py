"""CLI commands that need no Ray: ``unclip bundle``, ``unclip generate`` and the image
manipulations ``unclip vary``, ``unclip interpolate``, ``unclip text-diff`` (the functions of
``unclip.manipulations``, the same code the Serve endpoints run)."""

from __future__ import annotations

import argparse
import math
import sys
import time
from typing import Any

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


def _read_image(uri: str) -> Any:
    import io

    from PIL import Image, UnidentifiedImageError

    from unclip.errors import UserError

    data = fs.read_bytes(uri)
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise UserError(f"{uri}: not a readable image ({e})") from None
    return img


def _write_strip(args: argparse.Namespace, out: Any, what: str, t0: float) -> int:
    from unclip.pipeline import grid, png_bytes

    for note in out.warnings:
        print(f"warning: {note}", file=sys.stderr)
    fs.write_bytes(args.out, png_bytes(grid(out.images, len(out.images))))
    stages = ", ".join(f"{k} {v:.2f}s" for k, v in out.timings.items())
    print(
        f"wrote {args.out}: {what}, {len(out.images)} image(s) of {out.images.shape[1]} px, "
        f"seed {args.seed} ({time.perf_counter() - t0:.1f}s in all; {stages})"
    )
    return 0


def _check_count(name: str, n: int, low: int, high: int = 64) -> None:
    from unclip.errors import UserError

    if not low <= n <= high:
        raise UserError(f"{name} must be between {low} and {high}, got {n}")


def _manipulation_pipe(args: argparse.Namespace) -> Any:
    """The bundle's pipeline, with ``--latent-steps`` (the bipartite latent's DDIM steps)."""
    from unclip.pipeline import UnclipPipeline

    if args.latent_steps is not None:
        _check_count("--latent-steps", args.latent_steps, 1, 1000)
    pipe = UnclipPipeline.from_bundle(args.bundle, device=args.device)
    pipe.settings = pipe.resolve(latent_steps=args.latent_steps)
    return pipe


def vary(args: argparse.Namespace) -> int:
    from unclip import manipulations
    from unclip.errors import UserError

    _check_count("-n", args.num_images, 1)
    if args.eta is not None and not 0.0 <= args.eta <= 1.0:
        raise UserError(f"--eta must be between 0 and 1, got {args.eta}")
    t0 = time.perf_counter()
    image = _read_image(args.image)
    pipe = _manipulation_pipe(args)
    out = manipulations.variations(pipe, image, args.num_images, args.eta, args.seed)
    return _write_strip(args, out, "variations", t0)


def interpolate(args: argparse.Namespace) -> int:
    from unclip import manipulations

    _check_count("--frames", args.frames, 2)
    t0 = time.perf_counter()
    a, b = _read_image(args.image_a), _read_image(args.image_b)
    pipe = _manipulation_pipe(args)
    out = manipulations.interpolate(pipe, a, b, args.frames, args.seed, args.fixed_noise)
    return _write_strip(args, out, "interpolation", t0)


def text_diff(args: argparse.Namespace) -> int:
    from unclip import manipulations
    from unclip.errors import UserError

    _check_count("--frames", args.frames, 2)
    strength = manipulations.TEXT_DIFF_STRENGTH if args.max_strength is None else args.max_strength
    if not 0.0 < strength <= 1.0:
        raise UserError(f"--max-strength must be in (0, 1], got {strength}")
    from_text = manipulations.TEXT_DIFF_FROM if args.from_text is None else args.from_text
    if not args.to_text.strip() or not from_text.strip():
        raise UserError("--to and --from must not be empty")
    t0 = time.perf_counter()
    image = _read_image(args.image)
    pipe = _manipulation_pipe(args)
    out = manipulations.text_diff(
        pipe, image, args.to_text, from_text, args.frames, strength, args.seed
    )
    return _write_strip(args, out, f"text diff towards {args.to_text!r}", t0)
