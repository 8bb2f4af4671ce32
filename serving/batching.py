"""What the stage deployments receive, and how a dynamic batch of them is run.

A request for ``n`` images sends each stage one job of ``n`` rows. ``@serve.batch`` hands a
stage several jobs at once, up to ``max_batch_size`` rows (``batch_rows``); jobs whose settings agree (same steps, guidance, ...) are
concatenated into one call of the stage function from ``unclip.pipeline``, and the rows are
split back per job. A job carries its request's deadline (``time.time()`` seconds): a group
stops at the next sampling step once the last of its jobs' deadlines has passed, as nobody
waits for its rows any more. Every row carries its own seed (``unclip.pipeline.image_seeds``), so an
image does not depend on which other requests shared its batch.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import Tensor

from unclip.conditioning import TextCond
from unclip.config import SamplingSettings

J = TypeVar("J")
R = TypeVar("R")


@dataclass(frozen=True)
class PriorJob:
    text: TextCond  # (n, ...) one row per image
    seeds: list[int]  # (n,) per-image seeds
    settings: SamplingSettings
    deadline: float | None = None

    def key(self) -> Hashable:
        s = self.settings
        return (s.prior_steps, s.prior_guidance_scale, s.prior_eta, s.candidates)


@dataclass(frozen=True)
class DecodeJob:
    image_emb: Tensor  # (n, D)
    text: TextCond | None  # (n, ...) or None (variations decode without text)
    seeds: list[int]
    settings: SamplingSettings
    noise: Tensor | None = None  # (n, 3, S, S) fixed x_T (variations), else drawn per seed
    deadline: float | None = None

    def key(self) -> Hashable:
        s = self.settings
        return (
            s.decoder_steps,
            s.decoder_guidance_scale,
            s.decoder_eta,
            self.text is None,
            self.noise is None,
        )


@dataclass(frozen=True)
class LatentJob:
    """Decode bipartite latents (``unclip.pipeline.decode_latents``): manipulations."""

    image_emb: Tensor  # (n, D) z_i
    x_T: Tensor  # (n, 3, S, S) from the inversion, with the same settings
    seeds: list[int]
    settings: SamplingSettings
    deadline: float | None = None

    def key(self) -> Hashable:
        s = self.settings
        return (s.latent_steps, s.latent_guidance_scale, s.decoder_eta)


@dataclass(frozen=True)
class InvertJob:
    images: Tensor  # (n, 3, S, S) in [-1, 1] at the decoder's resolution
    image_emb: Tensor  # (n, D)
    settings: SamplingSettings
    deadline: float | None = None

    def key(self) -> Hashable:
        return (self.settings.latent_steps, self.settings.latent_guidance_scale)


@dataclass(frozen=True)
class UpsampleJob:
    images: Tensor  # (n, 3, s, s) in [-1, 1]
    seeds: list[int]
    settings: SamplingSettings
    deadline: float | None = None

    def key(self) -> Hashable:
        return (self.settings.upsampler_steps, tuple(self.images.shape[1:]))


def batch_rows(items: Sequence[object]) -> int:
    """``@serve.batch(batch_size_fn=...)``: a batch's size in image rows, not in jobs, so
    ``max_batch_size`` bounds the rows one model call holds. A single job always fits (its
    rows are bounded by the request limits): it runs alone if it is larger."""
    if len(items) <= 1:
        return len(items)
    return sum(_rows(item) for item in items)


def _rows(item: object) -> int:
    if isinstance(item, PriorJob | DecodeJob | LatentJob | UpsampleJob):
        return len(item.seeds)
    if isinstance(item, InvertJob):
        return len(item.images)
    if isinstance(item, Tensor):  # a batch of images for the CLIP image encoder
        return int(item.shape[0])
    return 1  # a prompt


def group_deadline(
    jobs: Sequence[PriorJob | DecodeJob | LatentJob | InvertJob | UpsampleJob],
) -> float | None:
    """When a group's work is no longer wanted: the latest of its jobs' deadlines."""
    deadlines = [j.deadline for j in jobs]
    return None if None in deadlines else max(deadlines)  # type: ignore[type-var]


def run_grouped(
    jobs: Sequence[J], key: Callable[[J], Hashable], run: Callable[[list[J]], list[R]]
) -> list[R]:
    """Run ``run`` once per group of jobs with equal ``key``; results in the jobs' order."""
    groups: dict[Hashable, list[int]] = {}
    for i, job in enumerate(jobs):
        groups.setdefault(key(job), []).append(i)
    out: list[R | None] = [None] * len(jobs)
    for idx in groups.values():
        results = run([jobs[i] for i in idx])
        assert len(results) == len(idx), f"{len(results)} results for {len(idx)} jobs"
        for i, r in zip(idx, results, strict=True):
            out[i] = r
    return out  # type: ignore[return-value]


def cat_text(conds: Sequence[TextCond]) -> TextCond:
    """Concatenate text conditioning along the batch (all with states, or all without)."""

    def cat(xs: list[Tensor | None]) -> Tensor | None:
        if any(x is None for x in xs):
            assert all(x is None for x in xs), "mixed text conditioning in one batch"
            return None
        return torch.cat(xs)  # type: ignore[arg-type]

    return TextCond(
        cat([c.emb for c in conds]), cat([c.states for c in conds]), cat([c.mask for c in conds])
    )


def split_rows(x: Tensor, counts: Sequence[int]) -> list[Tensor]:
    """(sum(counts), ...) -> one CPU tensor per job (contiguous, for cheap serialisation)."""
    return [t.detach().cpu().contiguous() for t in torch.split(x, list(counts))]


def text_rows(text: TextCond, counts: Sequence[int]) -> list[TextCond]:
    """Split batched text conditioning back into one ``TextCond`` per job, on the CPU."""
    out, start = [], 0
    for n in counts:
        out.append(text.index(slice(start, start + n)).to("cpu"))
        start += n
    return out
