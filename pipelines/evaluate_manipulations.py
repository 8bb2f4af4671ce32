"""The manipulations section of ``unclip eval``: measured properties of unCLIP paper §3.

On held-out shapes images (the original files the table was made from), with the bundle's
settings, through the building blocks of ``unclip.manipulations`` (the code the library, the
CLI and Serve run), each image inverted once, every eta-0 row decoded in one call (the first
and last frames of a text diff or an interpolation are the reconstructions themselves):
    reconstruction  eta 0, theta 0: decode (z_i, x_T) and upsample; PSNR against the image
                    at the bundle's output size (mean and worst), and whether the oracle
                    reads the same colour, shape, size, position and background
    variations      eta ``variation_eta`` on the first ``variation_images``: the oracle keeps
                    colour and shape; pairwise PSNR between two variations of an image (low
                    = they differ)
    text_diff       "a red ..." -> "a blue ..." on red images: the oracle reads blue at the
                    strongest frame, and the same shape
    interpolation   pairs of images: the frames' CLIP embeddings move monotonically from a
                    to b (cosine to a falls, to b rises)
Output: a ``manipulations`` dict for eval.json and one strip per manipulation (PNG).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from unclip import fs
from unclip.manipulations import (
    LocalStages,
    bipartite_latents,
    image_input,
    interpolation_latents,
    run_sync,
    text_diff_latents,
)
from unclip.pipeline import UnclipPipeline, grid, image_seeds, to_uint8
from unclip.shapes.attributes import SYNONYMS
from unclip.shapes.oracle import analyse

RECON_KEYS = ("colour", "shape", "size", "position", "background")
# every word a shapes caption may use for red ("crimson", "scarlet", ...), as whole words
RED_WORDS = re.compile(r"\b(" + "|".join(re.escape(w) for w in SYNONYMS["colour"]["red"]) + r")\b")


def red_to_blue(caption: str) -> str:
    """The caption with its red object made blue, whichever word it used for red."""
    return RED_WORDS.sub("blue", caption)


@dataclass(frozen=True)
class ManipulationEvalConfig:
    n: int = 16  # held-out images inverted and reconstructed
    variation_images: int = 8  # the first images, two variations each
    variation_eta: float = 0.5
    text_diff_images: int = 4  # red images edited towards blue (at most n)
    text_diff_frames: int = 3
    text_diff_strength: float = 0.5
    interpolation_pairs: int = 2
    interpolation_frames: int = 5
    strip_images: int = 8
    seed: int = 0


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of uint8 images."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 10 * float(np.log10(255.0**2 / max(mse, 1e-10)))


def pick_images(
    table: pa.Table, n: int, red: int = 0
) -> tuple[list[Image.Image], list[str], list[str]]:
    """``n`` held-out one-object rows (``red`` of them with a red object, for the text
    diff, when the table has enough): original images, captions, ids."""
    from io import BytesIO

    cols = table.column_names
    one_object = [
        i
        for i in range(table.num_rows)
        if "colour2" not in cols or table.column("colour2")[i].as_py() is None
    ]
    reds = [
        i for i in one_object if "colour" in cols and table.column("colour")[i].as_py() == "red"
    ]
    picked = set(reds[: min(red, n)])
    for i in one_object:  # the rest (or all, when the table has too few red rows) in order
        if len(picked) >= n:
            break
        picked.add(i)
    images, captions, ids = [], [], []
    for i in sorted(picked):
        src = table.column("source")[i].as_py()
        images.append(Image.open(BytesIO(fs.read_bytes(src))).convert("RGB"))
        captions.append(table.column("caption")[i].as_py())
        ids.append(table.column("id")[i].as_py())
    return images, captions, ids


def evaluate_manipulations(
    pipe: UnclipPipeline,
    images: list[Image.Image],
    captions: list[str],
    cfg: ManipulationEvalConfig,
    out: str = "",
) -> dict[str, Any]:
    """The measured properties (a JSON-ready dict); strips written to ``out`` if given."""
    stages = LocalStages(pipe)
    s = replace(pipe.settings, decoder_eta=0.0)
    t0 = time.perf_counter()
    n = len(images)
    size = pipe.upsamplers[-1].config.net.image_size if pipe.upsamplers else None
    size = size or pipe.decoder.config.net.image_size
    originals = np.stack(
        [np.asarray(im.resize((size, size), Image.Resampling.BICUBIC)) for im in images]
    )
    inputs = [image_input(pipe, im) for im in images]
    truth = [analyse(im) for im in originals]

    async def decode(z: torch.Tensor, x_T: torch.Tensor, seed: int, eta: float) -> np.ndarray:
        seeds = image_seeds(seed, z.shape[0])
        st = replace(s, decoder_eta=eta)
        return to_uint8(await stages.upsample(await stages.decode(z, x_T, seeds, st), seeds, st))

    async def run_all() -> dict[str, Any]:
        # 1-2. every image's bipartite latent, once
        z, x_T = await bipartite_latents(stages, inputs, s)

        # The eta-0 rows in one decoder call: the reconstructions (eta 0, theta 0), and only
        # the inner frames of the text diffs and interpolations, whose first (and last)
        # frames are reconstructions of their images.
        red = [i for i, t in enumerate(truth) if t.colour == "red"][: cfg.text_diff_images]
        rows_z, rows_x = [z], [x_T]
        for i in red:  # text diff "a red ..." -> "a blue ..." on the red images
            to_emb, _ = await stages.encode_text(red_to_blue(captions[i]))
            from_emb, _ = await stages.encode_text(captions[i])
            zd, xd = text_diff_latents(
                z[i : i + 1],
                x_T[i : i + 1],
                to_emb,
                from_emb,
                cfg.text_diff_frames,
                cfg.text_diff_strength,
            )
            rows_z.append(zd[1:])
            rows_x.append(xd[1:])
        pairs = [(p, n - 1 - p) for p in range(min(cfg.interpolation_pairs, n // 2))]
        for a, b in pairs:  # interpolation between pairs of images (i, n - 1 - i)
            zi, xi = interpolation_latents(
                z[a : a + 1], x_T[a : a + 1], z[b : b + 1], x_T[b : b + 1], cfg.interpolation_frames
            )
            rows_z.append(zi[1:-1])
            rows_x.append(xi[1:-1])
        eta0 = await decode(torch.cat(rows_z), torch.cat(rows_x), cfg.seed, 0.0)
        recon, inner = eta0[:n], eta0[n:]
        diffs, lerps = [], []
        for i in red:
            k = cfg.text_diff_frames - 1
            diffs.append(np.concatenate([recon[i : i + 1], inner[:k]]))
            inner = inner[k:]
        for a, b in pairs:
            k = cfg.interpolation_frames - 2
            lerps.append(np.concatenate([recon[a : a + 1], inner[:k], recon[b : b + 1]]))
            inner = inner[k:]

        # variations: two per image at eta > 0, on the first ``variation_images``
        v = min(cfg.variation_images, n)
        var = await decode(
            z[:v].repeat_interleave(2, 0),
            x_T[:v].repeat_interleave(2, 0),
            cfg.seed + 1,
            cfg.variation_eta,
        )

        # interpolation: per consecutive pair of frames, cosine to a falls and to b rises
        mono = []
        for (a, b), frames in zip(pairs, lerps, strict=True):
            emb = pipe.clip.encode_images(
                torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 127.5 - 1
            )
            to_a, to_b = (emb @ z[a]).tolist(), (emb @ z[b]).tolist()
            steps = zip(to_a, to_a[1:], to_b, to_b[1:], strict=False)
            mono.append([x1 <= x0 and y1 >= y0 for x0, x1, y0, y1 in steps])
        return {
            "recon": recon,
            "var": var,
            "red": red,
            "diffs": diffs,
            "lerps": lerps,
            "mono": mono,
        }

    r = run_sync(run_all())
    recon_psnr = [psnr(a, b) for a, b in zip(r["recon"], originals, strict=True)]
    recon_read = [analyse(x) for x in r["recon"]]
    kept = [
        all(getattr(g, k) == getattr(t, k) for k in RECON_KEYS)
        for g, t in zip(recon_read, truth, strict=True)
    ]
    var_read = [analyse(x) for x in r["var"]]
    var_kept = [
        g.colour == truth[i // 2].colour and g.shape == truth[i // 2].shape
        for i, g in enumerate(var_read)
    ]
    var_psnr = [psnr(r["var"][2 * i], r["var"][2 * i + 1]) for i in range(len(r["var"]) // 2)]
    last = [analyse(d[-1]) for d in r["diffs"]]
    result: dict[str, Any] = {
        "images": n,
        "output_size": size,
        "latent_steps": s.latent_steps,
        "latent_guidance_scale": s.latent_guidance_scale,
        "reconstruction": {
            "psnr_mean": round(float(np.mean(recon_psnr)), 2),
            "psnr_worst": round(float(np.min(recon_psnr)), 2),
            "oracle_same": round(float(np.mean(kept)), 3),
        },
        "variations": {
            "images": len(r["var"]) // 2,
            "eta": cfg.variation_eta,
            "oracle_keeps_colour_and_shape": round(float(np.mean(var_kept)), 3),
            "pairwise_psnr_mean": round(float(np.mean(var_psnr)), 2),
        },
        "text_diff": {
            "images": len(r["red"]),
            "max_strength": cfg.text_diff_strength,
            "oracle_blue": round(float(np.mean([g.colour == "blue" for g in last])), 3)
            if last
            else None,
            "oracle_same_shape": round(
                float(
                    np.mean(
                        [g.shape == truth[i].shape for g, i in zip(last, r["red"], strict=True)]
                    )
                ),
                3,
            )
            if last
            else None,
        },
        "interpolation": {
            "pairs": len(r["mono"]),
            "frames": cfg.interpolation_frames,
            "monotone_pairs": round(float(np.mean([all(m) for m in r["mono"]])), 3)
            if r["mono"]
            else None,
            "monotone_steps": round(float(np.mean(r["mono"])), 3) if r["mono"] else None,
        },
        "seconds": round(time.perf_counter() - t0, 1),
        "stage_seconds": {k: round(v, 1) for k, v in stages.timings.items()},
    }
    if out:
        from unclip.pipeline import png_bytes

        k = min(cfg.strip_images, n)
        kv = min(k, len(r["var"]) // 2)
        strips = {
            # rows: originals, reconstructions
            "reconstruction": grid(np.concatenate([originals[:k], r["recon"][:k]]), k),
            # rows: originals, first variation, second variation
            "variations": grid(
                np.concatenate(
                    [originals[:kv], r["var"][0 : 2 * kv : 2], r["var"][1 : 2 * kv : 2]]
                ),
                kv,
            ),
        }
        if r["diffs"]:
            strips["text_diff"] = grid(np.concatenate(r["diffs"]), cfg.text_diff_frames)
        if r["lerps"]:
            strips["interpolation"] = grid(np.concatenate(r["lerps"]), cfg.interpolation_frames)
        for name, img in strips.items():
            fs.write_bytes(fs.join(out, f"manipulations_{name}.png"), png_bytes(img))
        result["strips"] = {name: f"manipulations_{name}.png" for name in strips}
    return result


def markdown(result: dict[str, Any], prefix: str = "") -> str:
    """The manipulations section of a report (numbers, and the strips under ``prefix``)."""
    r, v, t, i = (result[k] for k in ("reconstruction", "variations", "text_diff", "interpolation"))
    lines = [
        f"Held-out shapes images: {result['images']}; inversion and decoding of the latents "
        f"{result['latent_steps']} steps, guidance {result['latent_guidance_scale']:g}; "
        f"{result['seconds']:.0f} s.",
        "",
        "| manipulation | measured |",
        "|---|---|",
        f"| reconstruction (eta 0), {result['output_size']} px | PSNR mean {r['psnr_mean']:.1f} dB, "
        f"worst {r['psnr_worst']:.1f} dB; oracle reads the same attributes on "
        f"{r['oracle_same']:.0%} |",
        f"| variations (eta {v['eta']:g}) | oracle keeps colour and shape on "
        f"{v['oracle_keeps_colour_and_shape']:.0%}; PSNR between two variations "
        f"{v['pairwise_psnr_mean']:.1f} dB |",
    ]
    if t["images"]:
        lines.append(
            f"| text diff red -> blue (theta up to {t['max_strength']:g}, {t['images']} images) "
            f"| blue at the strongest frame {t['oracle_blue']:.0%}; same shape "
            f"{t['oracle_same_shape']:.0%} |"
        )
    if i["pairs"]:
        lines.append(
            f"| interpolation ({i['pairs']} pairs, {i['frames']} frames) | CLIP embeddings of "
            f"the frames move monotonically from a to b (cosine to a falls, to b rises) in "
            f"{i['monotone_pairs']:.0%} of pairs, {i['monotone_steps']:.0%} of frame steps |"
        )
    captions = {
        "reconstruction": "originals (top), eta-0 reconstructions (bottom)",
        "variations": f"originals, then two variations at eta {v['eta']:g}",
        "text_diff": "red -> blue, theta from 0 (left) to the strongest",
        "interpolation": "from image a (left) to image b (right)",
    }
    for name, path in result.get("strips", {}).items():
        lines += ["", f"![{name}: {captions[name]}]({prefix}{path})"]
    return "\n".join(lines)
