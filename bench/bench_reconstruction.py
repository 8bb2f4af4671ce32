"""The eta-0 round trip of the bipartite latent, through ``unclip vary`` and /v1/variations.

    python bench/bench_reconstruction.py --bundle B --data EMB [--n 16] [--latent-steps S]

On ``n`` held-out one-object shapes images of the table (the images the evaluation's
manipulations section picks), each image goes once through the CLI (``unclip vary IMAGE
--eta 0 -n 1``, in this process) and once through a running Serve application
(``POST /v1/variations`` with eta 0, deployed from ``serving/config.yaml`` as ``unclip serve``
does). Prints per image and overall: PSNR against the original at the bundle's output size,
whether the shapes oracle reads the same colour, shape, size, position and background, and
whether the CLI and Serve gave the same pixels. Seconds are wall time per path.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import requests
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.local_serve import local_serve  # noqa: E402
from pipelines.evaluate import load_heldout  # noqa: E402
from pipelines.evaluate_manipulations import RECON_KEYS, pick_images, psnr  # noqa: E402
from unclip.checkpoint import read_bundle_spec  # noqa: E402
from unclip.cli import main as unclip_main  # noqa: E402
from unclip.shapes.oracle import analyse  # noqa: E402


def output_size(bundle: str) -> int:
    """The side of the bundle's final images (read from its last stage's config)."""
    from unclip.checkpoint import load_stage_config
    from unclip.fs import join

    spec = read_bundle_spec(bundle)
    return load_stage_config(join(bundle, spec.stages[-1])).net.image_size  # type: ignore[union-attr]


def via_cli(images: list[Image.Image], bundle: str, latent: int | None, tmp: str) -> np.ndarray:
    out = []
    for i, im in enumerate(images):
        src, dst = f"{tmp}/in{i}.png", f"{tmp}/cli{i}.png"
        im.save(src)
        args = ["vary", src, "--bundle", bundle, "--eta", "0", "-n", "1", "--seed", "0"]
        args += ["-o", dst] + (["--latent-steps", str(latent)] if latent else [])
        if unclip_main(args) != 0:
            raise SystemExit(f"unclip {' '.join(args)} failed")
        out.append(np.asarray(Image.open(dst).convert("RGB")))
    return np.stack(out)


def via_serve(images: list[Image.Image], url: str, latent: int | None) -> np.ndarray:
    out = []
    for im in images:
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        body: dict[str, Any] = {"image": base64.b64encode(buf.getvalue()).decode(), "eta": 0.0}
        body.update(num_images=1, seed=0, **({"latent_steps": latent} if latent else {}))
        r = requests.post(f"{url}/v1/variations", json=body, timeout=600)
        if r.status_code != 200:
            raise SystemExit(f"/v1/variations answered {r.status_code}: {r.text[:300]}")
        png = base64.b64decode(r.json()["images"][0])
        out.append(np.asarray(Image.open(io.BytesIO(png)).convert("RGB")))
    return np.stack(out)


def score(got: np.ndarray, originals: np.ndarray) -> dict[str, Any]:
    truth = [analyse(x) for x in originals]
    read = [analyse(x) for x in got]
    same = [
        all(getattr(g, k) == getattr(t, k) for k in RECON_KEYS)
        for g, t in zip(read, truth, strict=True)
    ]
    p = [psnr(a, b) for a, b in zip(got, originals, strict=True)]
    return {
        "psnr": [round(x, 2) for x in p],
        "psnr_mean": round(statistics.mean(p), 2),
        "psnr_worst": round(min(p), 2),
        "oracle_same": round(float(np.mean(same)), 3),
        "oracle_per_image": same,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", required=True)
    p.add_argument("--data", required=True, help="the embedding table (held-out rows)")
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--latent-steps", type=int, default=None, help="default: the bundle's")
    p.add_argument("--skip-serve", action="store_true")
    p.add_argument(
        "--cli-threads", type=int, default=None, help="torch threads of the CLI path (default: all)"
    )
    p.add_argument("--out", default=None, help="also write the results as JSON")
    args = p.parse_args()

    table = load_heldout(args.data, max(8 * args.n, 128))
    images, _, ids = pick_images(table, args.n)
    size = output_size(args.bundle)
    originals = np.stack(
        [np.asarray(im.resize((size, size), Image.Resampling.BICUBIC)) for im in images]
    )
    latent = args.latent_steps or read_bundle_spec(args.bundle).sampling.latent_steps
    results: dict[str, Any] = {"images": len(images), "ids": ids, "latent_steps": latent}
    if args.cli_threads:
        import torch

        torch.set_num_threads(args.cli_threads)
    results["cli_threads"] = args.cli_threads
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        cli = via_cli(images, args.bundle, args.latent_steps, tmp)
        results["cli"] = score(cli, originals) | {"seconds": round(time.perf_counter() - t0, 1)}
        print("cli", json.dumps(results["cli"]), flush=True)
    if not args.skip_serve:
        with local_serve(args.bundle) as (url, _):
            t0 = time.perf_counter()
            http = via_serve(images, url, args.latent_steps)
            seconds = round(time.perf_counter() - t0, 1)
        results["serve"] = score(http, originals) | {"seconds": seconds}
        results["serve_equals_cli"] = [
            bool(np.array_equal(a, b)) for a, b in zip(http, cli, strict=True)
        ]
        diff = np.abs(http.astype(np.int16) - cli.astype(np.int16))
        results["serve_cli_max_abs_diff"] = int(diff.max())
        results["serve_cli_pixels_differing"] = round(float((diff > 0).mean()), 5)
        print("serve", json.dumps(results["serve"]), flush=True)
    report(results)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


def report(r: dict[str, Any]) -> None:
    print(f"\n{r['images']} held-out images, eta 0, latent steps {r['latent_steps']}\n")
    paths = [k for k in ("cli", "serve") if k in r]
    print(f"{'id':>18} " + " ".join(f"{k + ' dB':>9} {k + ' same':>10}" for k in paths))
    for i, row_id in enumerate(r["ids"]):
        cells = [f"{r[k]['psnr'][i]:9.2f} {str(r[k]['oracle_per_image'][i]):>10}" for k in paths]
        print(f"{row_id[:18]:>18} " + " ".join(cells))
    for k in paths:
        s = r[k]
        print(
            f"{k}: PSNR mean {s['psnr_mean']:.2f} dB, worst {s['psnr_worst']:.2f} dB, oracle "
            f"same {s['oracle_same']:.0%}, {s['seconds']:.0f} s"
        )
    if "serve_equals_cli" in r:
        same = sum(r["serve_equals_cli"])
        print(
            f"Serve pixels == CLI pixels on {same} of {len(r['serve_equals_cli'])} images; "
            f"largest difference {r['serve_cli_max_abs_diff']} of 255 on "
            f"{r['serve_cli_pixels_differing']:.2%} of the pixel values"
        )


if __name__ == "__main__":
    main()
