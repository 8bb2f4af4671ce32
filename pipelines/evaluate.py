"""`unclip eval`: the paper's prior ablation on held-out captions, as a Ray Data job.

For each held-out caption of the embedding table, every method produces a CLIP image
embedding, the bundle's decoder and upsamplers turn it into an image, and the image is
scored:
    diffusion_prior  the bundle's prior (the full unCLIP stack)
    ar_prior         the autoregressive prior, when one is given
    no_prior         the caption's CLIP text embedding straight into the decoder
    ground_truth     the true CLIP image embedding (the decoder's ceiling)
    random           a random unit vector (a floor)
Metrics per method: the shapes oracle's attribute accuracy (colour, shape, size, position,
all), CLIP score (cosine of the generated image's CLIP embedding with the caption's text
embedding), caption retrieval top-1 among 10, and the Fréchet distance between generated and
real CLIP image embeddings. Output: eval.json, eval.md and a PNG grid (captions x methods).
"""

from __future__ import annotations

import argparse
import json
import os
import posixpath
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from training import priority
from unclip import fs
from unclip.conditioning import TextCond
from unclip.metrics import clip_score, frechet_distance, frechet_interval, retrieval_top1
from unclip.pipeline import needs_text_states
from unclip.schema import DataError, check_clip, read_table_info
from unclip.split import is_heldout
from unclip.table_ids import find_duplicates, first_occurrences, warn_duplicates

METHODS = ("diffusion_prior", "ar_prior", "no_prior", "ground_truth", "random")
ORACLE_KEYS = ("colour", "shape", "size", "position", "all")


@dataclass(frozen=True)
class EvalConfig:
    n: int = 64  # held-out captions
    methods: tuple[str, ...] = METHODS  # ar_prior only when a checkpoint is given
    batch_size: int = 16
    seed: int = 0
    grid_captions: int = 8
    prior_steps: int | None = None
    decoder_steps: int | None = None
    upsampler_steps: int | None = None
    decoder_guidance_scale: float | None = None
    ar_prior: str = ""  # stage checkpoint of an autoregressive prior (adds the ar_prior row)
    attributes: str = ""  # attributes.parquet of the shapes data (default: beside the images)
    manipulations: int = 16  # held-out shapes images for the manipulations section (0: none)
    num_cpus_per_worker: float = 2.0


@dataclass
class MethodResult:
    method: str
    oracle: dict[str, float] | None
    clip_score: float
    retrieval_top1: float
    fd: float
    n: int
    fd_interval: tuple[float, float] | None = None  # 90% jackknife interval of fd


@dataclass
class EvalReport:
    rows: list[MethodResult]
    preset: str = ""
    seconds: dict[str, float] = field(default_factory=dict)
    manipulations: dict[str, Any] | None = None  # pipelines.evaluate_manipulations

    def to_json(self) -> dict[str, Any]:
        return {
            "rows": [asdict(r) for r in self.rows],
            "preset": self.preset,
            "seconds": self.seconds,
            "manipulations": self.manipulations,
        }


# ---------------------------------------------------------------------- data
def load_heldout(data: str, n: int, attributes: str = "") -> pa.Table:
    """The first ``n`` held-out rows (by id order) with embeddings, joined to attributes;
    each id once (``unclip.table_ids``)."""
    info = read_table_info(data)
    warn_duplicates(data, find_duplicates(info.files))
    cols = ["id", "caption", "source", "text_emb", "image_emb", "text_tokens"]
    parts = []
    seen: set[str] = set()
    for f in info.files:
        pafs, path = fs.pyarrow_fs(f)
        t = pq.read_table(path, columns=cols, filesystem=pafs)
        ids = t.column("id").to_pylist()
        keep = np.array([is_heldout(i) for i in ids], dtype=bool)
        keep &= first_occurrences(ids, seen)  # copies share the id, so the split too
        parts.append(t.filter(pa.array(keep)))
    table = pa.concat_tables(parts).sort_by("id")
    if table.num_rows == 0:
        raise ValueError(f"no held-out rows in {data!r} (the table has {info.num_rows} rows)")
    table = table.slice(0, n)
    attr_uri = attributes or _attributes_beside(table.column("source")[0].as_py())
    if attr_uri and fs.exists(attr_uri):
        pafs, path = fs.pyarrow_fs(attr_uri)
        attrs = pq.read_table(path, filesystem=pafs).drop_columns(["caption"])
        where = {row_id: i for i, row_id in enumerate(attrs.column("id").to_pylist())}
        rows = pa.array([where.get(i) for i in table.column("id").to_pylist()], pa.int64())
        picked = attrs.take(rows)  # null index -> null row (ids the attributes lack)
        for name in picked.column_names:
            if name != "id":
                table = table.append_column(name, picked.column(name))
    return table


def _attributes_beside(source: str) -> str:
    if not source:
        return ""
    parent = posixpath.dirname(source) if "://" in source else os.path.dirname(source)
    return fs.join(parent, "attributes.parquet")


# ---------------------------------------------------------------------- generation (per actor)
class EvalWorker:
    """Loads the bundle once; turns a batch of held-out rows into scored images, all methods."""

    def __init__(self, bundle: str, config: EvalConfig) -> None:
        from unclip.checkpoint import load_stage
        from unclip.pipeline import UnclipPipeline

        torch.set_num_threads(max(1, int(config.num_cpus_per_worker)))
        self.pipe = UnclipPipeline.from_bundle(bundle)
        self.cfg = config
        self.settings = self.pipe.resolve(
            prior_steps=config.prior_steps,
            decoder_steps=config.decoder_steps,
            upsampler_steps=config.upsampler_steps,
            decoder_guidance_scale=config.decoder_guidance_scale,
        )
        self.ar = load_stage(config.ar_prior) if config.ar_prior else None
        priority.quiet_session()  # a local Ray of ours: its other processes yield to this one
        self.with_states = self.pipe.with_states or (
            self.ar is not None and needs_text_states(self.ar)
        )
        if self.ar is not None:
            _check_same_clip(self.ar.config.clip.fingerprint, self.pipe.clip, config.ar_prior)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        from unclip.pipeline import (
            encode_prompts,
            png_bytes,
            sample_decoder,
            sample_upsampler,
            to_uint8,
        )

        ids = [str(i) for i in batch["id"]]
        seeds = [
            self.cfg.seed * 1_000_003 + int(i.encode().hex()[-12:], 16) % 1_000_003 for i in ids
        ]
        text = encode_prompts(self.pipe.clip, [str(c) for c in batch["caption"]], self.with_states)
        out: dict[str, list[Any]] = {
            k: [] for k in ("id", "method", "png", "gen_emb", "text_emb", "real_emb", "scores")
        }
        for method in self.cfg.methods:
            emb = self._embeddings(method, batch, text, seeds)
            images = sample_decoder(self.pipe.decoder, emb, text, seeds, self.settings)
            for i, up in enumerate(self.pipe.upsamplers):
                images = sample_upsampler(up, images, seeds, self.settings, i)
            gen_emb = self.pipe.clip.encode_images(images)
            pixels = to_uint8(images)
            for j, row_id in enumerate(ids):
                out["id"].append(row_id)
                out["method"].append(method)
                out["png"].append(png_bytes(pixels[j]))
                out["gen_emb"].append(gen_emb[j].numpy())
                out["text_emb"].append(text.emb[j].numpy())
                out["real_emb"].append(np.asarray(batch["image_emb"][j], dtype=np.float32))
                out["scores"].append(json.dumps(_oracle(pixels[j], batch, j)))
        return {
            k: np.array(v, dtype=object) if k in ("png", "scores", "id", "method") else np.stack(v)
            for k, v in out.items()
        }

    def _embeddings(
        self, method: str, batch: dict[str, np.ndarray], text: TextCond, seeds: list[int]
    ) -> torch.Tensor:
        from unclip.pipeline import sample_prior, stage_generators

        if method == "diffusion_prior":
            return sample_prior(self.pipe.prior, text, seeds, self.settings)
        if method == "ar_prior":
            if self.ar is None:
                raise ValueError("method ar_prior needs EvalConfig.ar_prior (a checkpoint)")
            return self.ar.sample(text, generator=stage_generators(seeds, 1))
        if method == "no_prior":
            return text.emb
        if method == "ground_truth":
            return torch.from_numpy(np.stack(batch["image_emb"]).astype(np.float32))
        if method == "random":
            gens = stage_generators(seeds, 99)
            z = torch.cat([torch.randn(1, text.emb.shape[1], generator=g) for g in gens])
            return torch.nn.functional.normalize(z, dim=-1)
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")


def _check_same_clip(fingerprint: str, clip: Any, where: str) -> None:
    if fingerprint and fingerprint != clip.identity.fingerprint:
        raise DataError(
            f"{where} was trained on embeddings of another CLIP (fingerprint {fingerprint}) "
            f"than the bundle's ({clip.identity.fingerprint}); train it on the same table"
        )


def _oracle(pixels: np.ndarray, batch: dict[str, np.ndarray], j: int) -> dict[str, bool] | None:
    if "colour" not in batch or batch["colour"][j] is None:
        return None
    from unclip.shapes.attributes import ROW_COLUMNS, Attributes
    from unclip.shapes.oracle import score

    row = {k: batch[k][j] for k in ROW_COLUMNS if k in batch}
    return score(pixels, Attributes.from_row(row))


# ---------------------------------------------------------------------- metrics
def summarise(
    results: dict[str, np.ndarray], real_emb: torch.Tensor, methods: tuple[str, ...]
) -> list[MethodResult]:
    rows = []
    method_col = np.asarray(results["method"])
    for method in methods:
        sel = method_col == method
        gen = torch.from_numpy(np.stack(results["gen_emb"][sel]).astype(np.float32))
        txt = torch.from_numpy(np.stack(results["text_emb"][sel]).astype(np.float32))
        scores = [json.loads(s) for s in results["scores"][sel]]
        oracle = None
        if scores and all(s is not None for s in scores):
            oracle = {k: float(np.mean([s[k] for s in scores])) for k in ORACLE_KEYS}
        n = int(sel.sum())
        rows.append(
            MethodResult(
                method=method,
                oracle=oracle,
                clip_score=float(clip_score(gen, txt).mean()),
                retrieval_top1=retrieval_top1(
                    gen, txt, k=min(10, n), generator=torch.Generator().manual_seed(0)
                )
                if n >= 2
                else float("nan"),
                fd=frechet_distance(gen, real_emb) if n >= 2 else float("nan"),
                n=n,
                fd_interval=frechet_interval(gen, real_emb) if n >= 2 else None,
            )
        )
    return rows


def markdown_table(report: EvalReport) -> str:
    lines = [
        "| method | colour | shape | size | position | all | CLIP score | retrieval@10 | FD (90% CI) "
        "| n |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report.rows:
        o = r.oracle or {}
        cells = [f"{o[k]:.2f}" if k in o else "–" for k in ORACLE_KEYS]
        ci = f" ({r.fd_interval[0]:.3f}–{r.fd_interval[1]:.3f})" if r.fd_interval else ""
        lines.append(
            f"| {r.method} | "
            + " | ".join(cells)
            + f" | {r.clip_score:.3f} | {r.retrieval_top1:.2f} | {r.fd:.3f}{ci} | {r.n} |"
        )
    return "\n".join(lines)


def method_grid(
    results: dict[str, np.ndarray], methods: tuple[str, ...], captions: int
) -> np.ndarray:
    """Rows: methods; columns: the first ``captions`` held-out captions."""
    from io import BytesIO

    from PIL import Image

    from unclip.pipeline import grid

    ids = list(dict.fromkeys(results["id"]))[:captions]
    tiles = []
    for method in methods:
        for row_id in ids:
            k = np.flatnonzero((results["method"] == method) & (results["id"] == row_id))[0]
            tiles.append(np.asarray(Image.open(BytesIO(results["png"][k])).convert("RGB")))
    return grid(np.stack(tiles), cols=len(ids))


# ---------------------------------------------------------------------- the job
def evaluate(
    bundle: str, data: str, out: str, config: EvalConfig | None = None, preset: str = ""
) -> EvalReport:
    import ray

    from unclip.checkpoint import read_bundle_spec
    from unclip.pipeline import png_bytes

    cfg = config or EvalConfig()
    t0 = time.perf_counter()
    spec = read_bundle_spec(bundle)
    check_clip(
        read_table_info(data),
        embed_dim=spec.clip["embed_dim"],
        fingerprint=spec.clip.get("fingerprint", ""),
        what="the bundle",
    )
    methods = tuple(m for m in cfg.methods if m != "ar_prior" or cfg.ar_prior)
    cfg = EvalConfig(**{**asdict(cfg), "methods": methods})
    table = load_heldout(data, cfg.n, cfg.attributes)
    real = torch.from_numpy(
        np.stack(table.column("image_emb").to_numpy(zero_copy_only=False)).astype(np.float32)
    )

    ray.data.DataContext.get_current().enable_progress_bars = False  # our own lines instead
    ds = ray.data.from_arrow(table.drop_columns(["text_tokens"]))
    ds = ds.map_batches(
        EvalWorker,
        fn_constructor_args=(bundle, cfg),
        compute=ray.data.ActorPoolStrategy(size=1),
        batch_size=cfg.batch_size,
        batch_format="numpy",
        num_cpus=cfg.num_cpus_per_worker,
    )
    try:
        results = _collect(ds, table.num_rows, len(methods), t0)
    finally:
        priority.restore_session()  # the actor quieted the session (training.priority)
    gen_seconds = time.perf_counter() - t0

    report = EvalReport(
        summarise(results, real, methods), preset, {"eval_generate": round(gen_seconds, 1)}
    )
    fs.makedirs(out)
    if cfg.manipulations and "colour" in table.column_names:
        t1 = time.perf_counter()
        report.manipulations = _manipulations(bundle, data, out, cfg)
        report.seconds["eval_manipulations"] = round(time.perf_counter() - t1, 1)
    fs.write_text(fs.join(out, "eval.json"), json.dumps(report.to_json(), indent=2))
    md = markdown_table(report)
    if report.manipulations:
        from pipelines.evaluate_manipulations import markdown

        md += "\n\n## Manipulations\n\n" + markdown(report.manipulations)
    fs.write_text(fs.join(out, "eval.md"), md + "\n")
    fs.write_bytes(
        fs.join(out, "eval_grid.png"), png_bytes(method_grid(results, methods, cfg.grid_captions))
    )
    return report


def _manipulations(bundle: str, data: str, out: str, cfg: EvalConfig) -> dict[str, Any]:
    """The manipulations section, in this process (one inversion per image, batched)."""
    from pipelines.evaluate_manipulations import (
        ManipulationEvalConfig,
        evaluate_manipulations,
        pick_images,
    )
    from unclip.pipeline import UnclipPipeline

    mcfg = ManipulationEvalConfig(n=cfg.manipulations, seed=cfg.seed)
    pipe = UnclipPipeline.from_bundle(bundle)
    pipe.settings = pipe.resolve(
        decoder_steps=cfg.decoder_steps,
        upsampler_steps=cfg.upsampler_steps,
        decoder_guidance_scale=cfg.decoder_guidance_scale,
    )
    table = load_heldout(data, max(8 * cfg.manipulations, 128), cfg.attributes)
    images, captions, _ = pick_images(table, cfg.manipulations, red=mcfg.text_diff_images)
    print(f"[eval] manipulations on {len(images)} held-out images", flush=True)
    return evaluate_manipulations(pipe, images, captions, mcfg, out)


def _collect(ds: Any, captions: int, methods: int, t0: float) -> dict[str, np.ndarray]:
    """All generated rows of the job, printing progress as batches of captions finish."""
    columns: dict[str, list[Any]] = {}
    done, last = 0, 0.0
    print(f"[eval] generating {captions} held-out captions x {methods} methods", flush=True)
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for k, v in batch.items():
            columns.setdefault(k, []).extend(list(v))
        done = len(columns["id"]) // methods
        elapsed = time.perf_counter() - t0
        if done == captions or elapsed - last > 5:
            left = elapsed / done * (captions - done) if done else float("nan")
            print(
                f"[eval] {done}/{captions} captions in {elapsed:.0f} s (~{left:.0f} s left)",
                flush=True,
            )
            last = elapsed
    if not columns:
        raise ValueError("the evaluation generated nothing")
    return {k: np.array(v, dtype=object) for k, v in columns.items()}


def run(args: argparse.Namespace) -> int:
    import ray

    if not ray.is_initialized():
        from infra import local_ray

        local_ray.init(include_dashboard=False, log_to_driver=False)
    cfg = EvalConfig(n=args.n or EvalConfig.n, ar_prior=args.ar_prior or "")
    report = evaluate(args.bundle, args.data, args.out, cfg)
    print(markdown_table(report))
    print(f"wrote {fs.join(args.out, 'eval.json')}, eval.md, eval_grid.png")
    return 0
