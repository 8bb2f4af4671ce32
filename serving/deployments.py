"""One Serve deployment per model stage; each loads its weights once, in ``__init__``.

CLIP text encoder, CLIP image encoder, prior, decoder (sampling and DDIM inversion) and one
deployment per upsampler. Each batched method is ``@serve.batch``: concurrent requests are
grouped (``serving.batching``) and run through the stage functions of ``unclip.pipeline``,
the same code ``unclip generate`` runs in-process. The model call runs in a worker thread
so the replica's event loop stays free while it computes: Serve's ``check_health`` calls
answer, and fail when a model call is stuck or the GPU is broken.

Batching is tuned per deployment by its ``user_config`` (``serving/config.yaml``):
``{max_batch_size: 8, batch_wait_timeout_s: 0.01}``; ``max_batch_size`` counts image rows
(``serving.batching.batch_rows``), not requests; ``max_batch_size: 1`` turns batching off.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable
from typing import Any

import torch
from ray import serve
from torch import Tensor

from infra.gpus import ray_device
from serving.batching import (
    DecodeJob,
    InvertJob,
    LatentJob,
    PriorJob,
    UpsampleJob,
    batch_rows,
    cat_text,
    group_deadline,
    run_grouped,
    split_rows,
    text_rows,
)
from unclip import fs
from unclip.checkpoint import bundle_clip_source, load_stage, load_stage_config, read_bundle_spec
from unclip.clip import Clip
from unclip.conditioning import TextCond
from unclip.decoder import Decoder as DecoderModel
from unclip.pipeline import (
    decode_latents,
    encode_prompts_noting,
    invert_decoder,
    needs_text_states,
    sample_decoder,
    sample_prior,
    sample_upsampler,
    stop_at,
)
from unclip.prior import DiffusionPrior
from unclip.upsampler import Upsampler as UpsamplerModel

DEFAULT_BATCH = {"max_batch_size": 8, "batch_wait_timeout_s": 0.01}
CPU_OPTIONS = {"num_cpus": 0.25}
STUCK_AFTER_S = 600.0  # a model call running longer than this fails the health check


@functools.cache
def device() -> str:
    """The replica's device: the GPU Ray assigned it (``ray_actor_options.num_gpus`` > 0),
    else the CPU, even where CUDA is visible. A replica granted a GPU on a node without
    usable CUDA fails to start with that message (``infra.gpus.ray_device``)."""
    return str(ray_device("a Serve replica"))


def load_clip(bundle: str) -> Clip:
    spec = read_bundle_spec(bundle)
    return Clip.load(*bundle_clip_source(bundle, spec), device=device())


class _Stage:
    """Shared by the model deployments: health check, batch settings from ``user_config``."""

    _batched: tuple[str, ...] = ()
    stuck_after_s: float = STUCK_AFTER_S

    def check_health(self) -> None:
        """Serve's periodic health check: a replica that fails it is replaced (and is not
        counted as running in the ingress's ``/v1/ready``)."""
        running = getattr(self, "_running", {})
        oldest = min(running.values(), default=None)
        if oldest is not None and time.monotonic() - oldest > self.stuck_after_s:
            raise RuntimeError(
                f"a model call has been running for {time.monotonic() - oldest:.0f} s "
                f"(limit {self.stuck_after_s:g} s): the replica is stuck"
            )
        if device().startswith("cuda"):
            torch.cuda.synchronize(device())  # raises if the CUDA context is broken

    async def _compute(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` without gradients in a worker thread, tracked for ``check_health``."""
        running: dict[int, float] = self.__dict__.setdefault("_running", {})
        key = id(fn)
        running[key] = time.monotonic()

        def call() -> Any:
            with torch.no_grad():
                return fn()

        try:
            return await asyncio.to_thread(call)
        finally:
            running.pop(key, None)

    def reconfigure(self, config: dict[str, Any]) -> None:
        unknown = set(config) - set(DEFAULT_BATCH)
        if unknown:
            raise ValueError(
                f"unknown user_config key(s) {sorted(unknown)}; known: {sorted(DEFAULT_BATCH)}"
            )
        size = int(config.get("max_batch_size", DEFAULT_BATCH["max_batch_size"]))
        wait = float(config.get("batch_wait_timeout_s", DEFAULT_BATCH["batch_wait_timeout_s"]))
        if size < 1 or wait < 0:
            raise ValueError(f"need max_batch_size >= 1 and batch_wait_timeout_s >= 0: {config}")
        for name in self._batched:
            method = getattr(self, name)
            method.set_max_batch_size(size)
            method.set_batch_wait_timeout_s(wait)


@serve.deployment(ray_actor_options=CPU_OPTIONS, max_ongoing_requests=16)
class TextEncoder(_Stage):
    """Prompts -> CLIP text conditioning (embedding, and token states if a stage reads them)."""

    _batched = ("encode",)

    def __init__(self, bundle: str) -> None:
        spec = read_bundle_spec(bundle)
        self.clip = load_clip(bundle)
        configs = [load_stage_config(fs.join(bundle, name)) for name in spec.stages[:2]]
        self.with_states = needs_text_states(*configs)

    @serve.batch(**DEFAULT_BATCH, batch_size_fn=batch_rows)
    async def encode(self, prompts: list[str]) -> list[tuple[TextCond, str | None]]:
        """Each prompt's conditioning and its warning (None, or why it was truncated)."""

        def run() -> list[tuple[TextCond, str | None]]:
            text, notes = encode_prompts_noting(self.clip, list(prompts), self.with_states)
            return list(zip(text_rows(text, [1] * len(prompts)), notes, strict=True))

        return await self._compute(run)


@serve.deployment(ray_actor_options=CPU_OPTIONS, max_ongoing_requests=16)
class ImageEncoder(_Stage):
    """Images (n, 3, S, S) in [-1, 1] at CLIP's input size -> CLIP image embeddings (n, D)."""

    _batched = ("encode",)

    def __init__(self, bundle: str) -> None:
        self.clip = load_clip(bundle)

    @serve.batch(**DEFAULT_BATCH, batch_size_fn=batch_rows)
    async def encode(self, images: list[Tensor]) -> list[Tensor]:
        def run(group: list[Tensor]) -> list[Tensor]:
            emb = self.clip.encode_images(torch.cat(group).to(device()))
            return split_rows(emb, [len(x) for x in group])

        return await self._compute(lambda: run_grouped(images, lambda x: tuple(x.shape[1:]), run))


@serve.deployment(ray_actor_options=CPU_OPTIONS, max_ongoing_requests=16)
class Prior(_Stage):
    """CLIP text conditioning -> CLIP image embeddings (best of ``candidates``)."""

    _batched = ("sample",)

    def __init__(self, bundle: str) -> None:
        spec = read_bundle_spec(bundle)
        prior = load_stage(fs.join(bundle, spec.stages[0]), device())
        assert isinstance(prior, DiffusionPrior)
        self.prior = prior

    @serve.batch(**DEFAULT_BATCH, batch_size_fn=batch_rows)
    async def sample(self, jobs: list[PriorJob]) -> list[Tensor]:
        def run(group: list[PriorJob]) -> list[Tensor]:
            text = cat_text([j.text for j in group])
            seeds = [s for j in group for s in j.seeds]
            stop = stop_at(group_deadline(group))
            emb = sample_prior(self.prior, text, seeds, group[0].settings, progress=stop)
            return split_rows(emb, [len(j.seeds) for j in group])

        return await self._compute(lambda: run_grouped(jobs, PriorJob.key, run))


@serve.deployment(ray_actor_options=CPU_OPTIONS, max_ongoing_requests=16)
class Decoder(_Stage):
    """CLIP image embeddings -> base-resolution images; DDIM inversion and decoding of
    inverted latents (the manipulations)."""

    _batched = ("sample", "invert", "decode_latents")

    def __init__(self, bundle: str) -> None:
        spec = read_bundle_spec(bundle)
        decoder = load_stage(fs.join(bundle, spec.stages[1]), device())
        assert isinstance(decoder, DecoderModel)
        self.decoder = decoder

    @serve.batch(**DEFAULT_BATCH, batch_size_fn=batch_rows)
    async def sample(self, jobs: list[DecodeJob]) -> list[Tensor]:
        def run(group: list[DecodeJob]) -> list[Tensor]:
            first = group[0]
            images = sample_decoder(
                self.decoder,
                torch.cat([j.image_emb for j in group]),
                None if first.text is None else cat_text([j.text for j in group]),  # type: ignore[misc]
                [s for j in group for s in j.seeds],
                first.settings,
                noise=None if first.noise is None else torch.cat([j.noise for j in group]),  # type: ignore[misc]
                progress=stop_at(group_deadline(group)),
            )
            return split_rows(images, [len(j.seeds) for j in group])

        return await self._compute(lambda: run_grouped(jobs, DecodeJob.key, run))

    @serve.batch(**DEFAULT_BATCH, batch_size_fn=batch_rows)
    async def decode_latents(self, jobs: list[LatentJob]) -> list[Tensor]:
        def run(group: list[LatentJob]) -> list[Tensor]:
            images = decode_latents(
                self.decoder,
                torch.cat([j.image_emb for j in group]),
                torch.cat([j.x_T for j in group]),
                [s for j in group for s in j.seeds],
                group[0].settings,
                progress=stop_at(group_deadline(group)),
            )
            return split_rows(images, [len(j.seeds) for j in group])

        return await self._compute(lambda: run_grouped(jobs, LatentJob.key, run))

    @serve.batch(**DEFAULT_BATCH, batch_size_fn=batch_rows)
    async def invert(self, jobs: list[InvertJob]) -> list[Tensor]:
        def run(group: list[InvertJob]) -> list[Tensor]:
            x_T = invert_decoder(
                self.decoder,
                torch.cat([j.images for j in group]),
                torch.cat([j.image_emb for j in group]),
                group[0].settings,
                progress=stop_at(group_deadline(group)),
            )
            return split_rows(x_T, [len(j.images) for j in group])

        return await self._compute(lambda: run_grouped(jobs, InvertJob.key, run))


@serve.deployment(ray_actor_options=CPU_OPTIONS, max_ongoing_requests=16)
class Upsampler(_Stage):
    """Images -> images ``factor`` times larger; bound once per upsampler of the bundle
    (deployment names ``Upsampler1``, ``Upsampler2``, ...)."""

    _batched = ("sample",)

    def __init__(self, bundle: str, index: int) -> None:
        spec = read_bundle_spec(bundle)
        upsampler = load_stage(fs.join(bundle, spec.stages[2 + index]), device())
        assert isinstance(upsampler, UpsamplerModel)
        self.upsampler = upsampler
        self.index = index

    @serve.batch(**DEFAULT_BATCH, batch_size_fn=batch_rows)
    async def sample(self, jobs: list[UpsampleJob]) -> list[Tensor]:
        def run(group: list[UpsampleJob]) -> list[Tensor]:
            images = sample_upsampler(
                self.upsampler,
                torch.cat([j.images for j in group]),
                [s for j in group for s in j.seeds],
                group[0].settings,
                self.index,
                progress=stop_at(group_deadline(group)),
            )
            return split_rows(images, [len(j.seeds) for j in group])

        return await self._compute(lambda: run_grouped(jobs, UpsampleJob.key, run))
