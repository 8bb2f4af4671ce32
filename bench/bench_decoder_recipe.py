"""How fast a decoder recipe learns: oracle accuracy against training steps and CPU seconds.

    PYTHONPATH=. python bench/bench_decoder_recipe.py --data work/demo/embeddings \
        [--config recipe.yaml] [--eval-at 300,600,900] [--n 64] [--tag NAME]

Trains the decoder of the quick preset (with a config file's overrides, the same format as
``unclip train --config``) in a plain loop, the same ``Stepper`` the Ray loop uses, on the
table's training rows held in memory. At each ``--eval-at`` step it samples the held-out
rows from their ground-truth CLIP image embeddings with the EMA weights (the decoder's
ceiling: the ``ground_truth`` row of ``unclip eval``), resizes them bicubically to 64 px and
scores them with the shapes oracle. Prints one JSON line per evaluation with the step, the
seconds spent training so far (evaluation excluded) and the oracle's accuracies, so recipes
can be compared per step and per CPU second on the same machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipelines.evaluate import load_heldout  # noqa: E402
from training.cli import plan  # noqa: E402
from training.data import prepare_batch  # noqa: E402
from training.harness import Stepper, lr_at, new_state  # noqa: E402
from training.presets import load_config_file  # noqa: E402
from training.stages import stage_for  # noqa: E402
from unclip.ema import EMA  # noqa: E402
from unclip.models import build_model  # noqa: E402
from unclip.numerics import Numerics  # noqa: E402
from unclip.pipeline import to_uint8  # noqa: E402
from unclip.schema import read_table_info  # noqa: E402
from unclip.shapes.attributes import ROW_COLUMNS, Attributes  # noqa: E402
from unclip.shapes.oracle import score  # noqa: E402

KEYS = ("colour", "shape", "size", "position", "all")


def load_train(data: str, job) -> dict[str, torch.Tensor]:
    spec = stage_for(job.stage).columns()
    arrays = [
        prepare_batch(pq.read_table(f), spec, "train", job.run.heldout_fraction)
        for f in read_table_info(data).files
    ]
    return {k: torch.cat([torch.from_numpy(a[k].copy()) for a in arrays]) for k in arrays[0]}


def load_column(data: str, job, name: str) -> torch.Tensor:
    """One embedding column of the training rows, in ``load_train``'s row order."""
    from training.data import StageColumns

    spec = StageColumns((name,))
    arrays = [
        prepare_batch(pq.read_table(f), spec, "train", job.run.heldout_fraction)[name]
        for f in read_table_info(data).files
    ]
    return torch.from_numpy(np.concatenate(arrays))


def train_attributes(data: str, job) -> list[dict]:
    """Attribute rows of the training split, in ``load_train``'s row order."""
    from training.data import heldout_mask
    from unclip import fs

    ids = []
    for f in read_table_info(data).files:
        col = pq.read_table(f, columns=["id"]).column("id").to_pylist()
        keep = ~heldout_mask(col, job.run.heldout_fraction)
        ids += [i for i, k in zip(col, keep, strict=True) if k]
    source = pq.read_table(read_table_info(data).files[0], columns=["source"])
    folder = os.path.dirname(source.column("source")[0].as_py())
    attrs = pq.read_table(fs.join(folder, "attributes.parquet")).to_pylist()
    by_id = {r["id"]: r for r in attrs}
    return [by_id[i] for i in ids]


def attribute_codes(rows: list[dict], dim: int = 128) -> torch.Tensor:
    """(N, dim): per row the normalised sum of a fixed random unit vector per attribute
    value (colour, shape, size, position, background): perfect, compositional conditioning."""
    import zlib

    def code(name: str) -> torch.Tensor:  # the same vector for a value in every call
        g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        return F.normalize(torch.randn(dim, generator=g), dim=0)

    keys = ("colour", "shape", "size", "position", "background")
    out = torch.zeros(len(rows), dim)
    for i, row in enumerate(rows):
        for k in keys:
            out[i] += code(f"{k}={row[k]}")
    return F.normalize(out, dim=-1)


def oracle_accuracy(images: torch.Tensor, table) -> dict[str, float]:
    """images (B, 3, S, S) in [-1, 1] -> mean oracle accuracy per attribute at 64 px."""
    big = F.interpolate(images.float(), size=64, mode="bicubic", align_corners=False)
    pixels = to_uint8(big.clamp(-1, 1))
    rows = table.select(list(ROW_COLUMNS)).to_pylist()
    scores = [score(pixels[j], Attributes.from_row(rows[j])) for j in range(len(rows))]
    return {k: float(np.mean([s[k] for s in scores])) for k in KEYS}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="embedding table of the shapes data")
    p.add_argument("--config", default=None, help="decoder config overrides (YAML/JSON)")
    p.add_argument("--eval-at", default="300,600,900")
    p.add_argument("--n", type=int, default=64, help="held-out rows scored")
    p.add_argument("--sample-steps", type=int, default=25)
    p.add_argument("--guidance", default="", help="comma list of scales (default: config)")
    p.add_argument("--eta", default="", help="comma list of DDIM eta values (default: config)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--amp", default="none", choices=("none", "bf16"))
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--condition",
        default="image_emb",
        choices=("image_emb", "text_emb", "attributes"),
        help="what the decoder is conditioned on in training and evaluation (text_emb, or "
        "attributes: one fixed random vector per attribute value, summed: tests of how much "
        "the CLIP image embedding's content limits what is learnt)",
    )
    p.add_argument(
        "--ema",
        default="",
        help="comma list of extra EMA decays also scored at every evaluation (0 = the raw "
        "weights), e.g. 0.99,0.995,0: how much the averaging window lags a short run",
    )
    p.add_argument("--tag", default="")
    p.add_argument("--save", default="", help="directory for sample grids (and EMA weights)")
    p.add_argument("--load", default="", help="EMA weights (.safetensors) to evaluate only")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    overrides = load_config_file(args.config) if args.config else {}
    evals = sorted(int(s) for s in args.eval_at.split(","))
    overrides.setdefault("train", {})["steps"] = evals[-1]
    job = plan("decoder", args.data, f"/tmp/recipe-{os.getpid()}/decoder", overrides=overrides)
    cfg, run = job.stage, job.run
    spec = stage_for(cfg)
    data = load_train(args.data, job)
    heldout = load_heldout(args.data, args.n)
    if args.condition == "attributes":
        emb = attribute_codes(heldout.select(list(ROW_COLUMNS)).to_pylist())
        data = {**data, "image_emb": attribute_codes(train_attributes(args.data, job))}
    else:
        column = heldout.column(args.condition).to_numpy(zero_copy_only=False)
        emb = torch.from_numpy(np.stack(column).astype(np.float32))
    if args.condition == "text_emb":  # train on it in place of the image embedding
        data = {**data, "image_emb": load_column(args.data, job, args.condition)}
    n = len(data["image"])
    settings = Numerics(
        args.amp, "channels_last" if args.channels_last else "contiguous", args.threads
    )
    state = new_state(cfg, "cpu", settings.amp)
    settings.apply(state.model)
    files = tuple(read_table_info(args.data).files)
    if spec.prepare(state.model, files, run.heldout_fraction):  # as the Ray loop does
        state.ema = EMA(state.model, cfg.optim.ema_decay, cfg.optim.ema_warmup)
    stepper = Stepper(spec, state.model, state, None, settings)
    tracks = {"config": state.ema}  # scored weights: the config's EMA, then --ema extras
    for d in (float(x) for x in args.ema.split(",") if x):
        tracks[f"ema{d:g}"] = EMA(state.model, d, cfg.optim.ema_warmup) if d else None
    ema_model = build_model(cfg).eval()
    params = sum(p.numel() for p in state.model.parameters())
    print(
        json.dumps({"tag": args.tag, "params": params, "rows": n, "config": args.config}),
        flush=True,
    )
    g = torch.Generator().manual_seed(args.seed)
    trained, losses = 0.0, []
    state.model.train()
    if args.load:  # evaluation only: the sweeps below on saved weights
        from safetensors.torch import load_file

        state.ema.load_state_dict(load_file(args.load), 0)
        evals = [0]
        losses = [float("nan")]
    for step in range(0 if args.load else 1, evals[-1] + 1):
        idx = torch.randint(0, n, (run.batch_size,), generator=g)
        batch = {k: v[idx] for k, v in data.items()}
        if step:
            t = time.perf_counter()
            out = stepper(batch, lr_at(step, cfg.optim, run.steps))
            trained += time.perf_counter() - t
            losses.append(float(out.loss))
            for ema in tracks.values():
                if ema is not None and ema is not state.ema:
                    ema.update(state.model)
        for weights, ema in tracks.items() if step in evals else ():
            if ema is None:
                ema_model.load_state_dict(state.model.state_dict())
            else:
                ema.copy_to(ema_model)
            scales = [float(g) for g in args.guidance.split(",")] if args.guidance else [None]
            etas = [float(e) for e in args.eta.split(",")] if args.eta else [None]
            for scale, eta in ((g, e) for g in scales for e in etas):
                t = time.perf_counter()
                with torch.no_grad():
                    images = ema_model.sample(
                        emb,
                        steps=args.sample_steps,
                        guidance_scale=scale,
                        eta=eta,
                        generator=torch.Generator().manual_seed(0),
                    )
                acc = oracle_accuracy(images, heldout)
                record = {
                    "tag": args.tag,
                    "weights": weights if ema is not None else "raw",
                    "step": step,
                    "guidance": scale if scale is not None else cfg.guidance_scale,
                    "eta": eta if eta is not None else cfg.sample_eta,
                    "train_s": round(trained, 1),
                    "s_per_step": round(trained / max(step, 1), 3),
                    "loss": round(float(np.mean(losses[-100:])), 4),
                    **{k: round(v, 3) for k, v in acc.items()},
                    "eval_s": round(time.perf_counter() - t, 1),
                }
                print(json.dumps(record), flush=True)
                if args.save:
                    from unclip.pipeline import grid, png_bytes

                    os.makedirs(args.save, exist_ok=True)
                    big = F.interpolate(images[:16].float(), size=64, mode="bicubic")
                    name = f"{args.tag or 'run'}_{step}" + (f"_g{scale:g}" if scale else "")
                    name += f"_e{eta:g}" if eta is not None else ""
                    with open(f"{args.save}/{name}.png", "wb") as f:
                        f.write(png_bytes(grid(to_uint8(big.clamp(-1, 1)), 8)))
            if args.save and step and ema is state.ema:
                from safetensors.torch import save_file

                saved = {k: v.contiguous() for k, v in state.ema.state_dict().items()}
                save_file(saved, f"{args.save}/{args.tag or 'run'}_{step}.safetensors")


if __name__ == "__main__":
    main()
