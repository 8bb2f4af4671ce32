"""The ingress deployment: HTTP in (``serving.api``), stage deployments called in order.

``generate`` reads like ``UnclipPipeline.generate``, one block per stage, except that each
stage is a ``DeploymentHandle`` call (batched on the other side) with a timeout. The
manipulations (variations, interpolations, text diffs) are not written here: the ingress runs
the coroutines of ``unclip.manipulations`` with stages that call the deployments
(``_ServeStages``), the same code as the library and the CLI. A stage that is down answers
503, one that is too slow 504; a bad request never reaches a stage.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import replace
from typing import Any

from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError
from ray.serve.exceptions import (
    BackPressureError,
    DeploymentUnavailableError,
    ReplicaUnavailableError,
)
from ray.serve.handle import DeploymentHandle, DeploymentResponse
from torch import Tensor

from serving.api import MAX_SEED, GenerateResponse, StageError, make_api
from serving.batching import DecodeJob, InvertJob, LatentJob, PriorJob, UpsampleJob
from serving.images import decode_image, encode_png_b64
from serving.limits import Limits
from unclip import fs, manipulations
from unclip.checkpoint import load_stage_config, read_bundle_spec
from unclip.config import SamplingSettings, from_dict, to_dict
from unclip.manipulations import ImageInput, prepare_image
from unclip.pipeline import image_seeds, to_uint8

UNAVAILABLE = (
    RayActorError,
    ActorUnavailableError,
    BackPressureError,
    DeploymentUnavailableError,
    ReplicaUnavailableError,
)


@serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=64)
@serve.ingress()
class Ingress:
    def __init__(
        self,
        text_encoder: DeploymentHandle,
        image_encoder: DeploymentHandle,
        prior: DeploymentHandle,
        decoder: DeploymentHandle,
        upsamplers: list[DeploymentHandle],
        bundle: str,
        limits: dict[str, Any],
        api_key: str | None = None,
    ) -> None:
        self.text_encoder = text_encoder
        self.image_encoder = image_encoder
        self.prior = prior
        self.decoder = decoder
        self.upsamplers = upsamplers
        self.limits = from_dict(Limits, limits)
        self.api_key = api_key or None
        spec = read_bundle_spec(bundle)
        self.settings: SamplingSettings = spec.sampling
        decoder_cfg = load_stage_config(fs.join(bundle, spec.stages[1]))
        self.decoder_size: int = decoder_cfg.net.image_size  # type: ignore[union-attr]
        self.clip_size = int(spec.clip["image_size"])  # the CLIP's input side in pixels

    def __serve_build_asgi_app__(self) -> Any:
        return make_api(
            self,
            self.limits,
            self.api_key,
            page_config={"limits": to_dict(self.limits), "defaults": to_dict(self.settings)},
        )

    # ------------------------------------------------------------------ endpoints
    async def generate(self, req: Any) -> GenerateResponse:
        start = time.perf_counter()
        n = req.num_images
        seed, seeds = self._seeds(req.seed, n)
        s = self._resolve(
            prior_steps=req.prior_steps,
            decoder_steps=req.decoder_steps,
            upsampler_steps=req.upsampler_steps,
            prior_guidance_scale=req.prior_guidance_scale,
            decoder_guidance_scale=req.decoder_guidance_scale,
            candidates=req.candidates,
        )
        timings: dict[str, float] = {}

        # 1. CLIP text encoder: the caption's embedding (and token states), one row per image
        text, note = await self._call(
            "text_encoder", self.text_encoder.encode.remote(req.prompt), timings
        )
        text = text.repeat(n)

        # 2. prior: CLIP text embedding -> CLIP image embedding (best of `candidates`)
        image_emb = await self._call(
            "prior", self.prior.sample.remote(PriorJob(text, seeds, s)), timings
        )

        # 3. decoder: CLIP image embedding -> base-resolution image
        images = await self._call(
            "decoder", self.decoder.sample.remote(DecodeJob(image_emb, text, seeds, s)), timings
        )

        # 4. upsamplers: each multiplies the resolution
        images = await self._upsample(images, seeds, s, timings)
        return await self._respond(images, seed, timings, start, [note])

    # The manipulations: the coroutines of unclip.manipulations (the library's and the
    # CLI's code), with stages that call the deployments (``_ServeStages``).
    async def variations(self, req: Any) -> GenerateResponse:
        start = time.perf_counter()
        (x,), stages = await self._inputs([req.image], ["image"])
        seed = self._seed(req.seed)
        eta = manipulations.VARIATIONS_ETA if req.eta is None else req.eta
        s = self._resolve(decoder_eta=eta)
        out = await manipulations.compute_variations(stages, x, req.num_images, seed, s)
        return await self._respond(out.images, seed, stages.timings, start, out.warnings)

    async def interpolate(self, req: Any) -> GenerateResponse:
        start = time.perf_counter()
        (a, b), stages = await self._inputs([req.image_a, req.image_b], ["image_a", "image_b"])
        seed = self._seed(req.seed)
        out = await manipulations.compute_interpolation(
            stages, a, b, req.frames, seed, self.settings, fixed_noise=req.fixed_noise
        )
        return await self._respond(out.images, seed, stages.timings, start, out.warnings)

    async def text_diff(self, req: Any) -> GenerateResponse:
        start = time.perf_counter()
        (x,), stages = await self._inputs([req.image], ["image"])
        seed = self._seed(req.seed)
        out = await manipulations.compute_text_diff(
            stages,
            x,
            req.to_text,
            manipulations.TEXT_DIFF_FROM if req.from_text is None else req.from_text,
            req.frames,
            manipulations.TEXT_DIFF_STRENGTH if req.max_strength is None else req.max_strength,
            seed,
            self.settings,
        )
        return await self._respond(out.images, seed, stages.timings, start, out.warnings)

    async def health(self) -> tuple[bool, dict[str, str]]:
        """Ask every stage deployment for ``ready()`` (a cheap, unbatched call)."""
        handles = self._stages()

        async def ping(h: DeploymentHandle) -> str:
            try:
                return await asyncio.wait_for(_awaitable(h.ready.remote()), timeout=5.0)
            except TimeoutError:
                return "timeout"
            except Exception as e:  # noqa: BLE001 - any failure means "not ready"
                return f"unavailable ({type(e).__name__})"

        answers = await asyncio.gather(*(ping(h) for h in handles.values()))
        stages = dict(zip(handles, answers, strict=True))
        return all(a == "ok" for a in answers), stages

    # ------------------------------------------------------------------ helpers
    def _seeds(self, seed: int | None, n: int) -> tuple[int, list[int]]:
        """The request's seed (a random one if unset) and its per-image seeds."""
        seed = self._seed(seed)
        return seed, image_seeds(seed, n)

    def _seed(self, seed: int | None) -> int:
        """The request's seed, or a random one (returned in the response)."""
        return secrets.randbelow(MAX_SEED + 1) if seed is None else seed

    async def _inputs(
        self, texts: list[str], fields: list[str]
    ) -> tuple[list[ImageInput], _ServeStages]:
        """Base64 images -> each at CLIP's size and the decoder's (``prepare_image``)."""
        t0 = time.perf_counter()

        def run() -> list[ImageInput]:
            images = [decode_image(t, self.limits, f) for t, f in zip(texts, fields, strict=True)]
            return [prepare_image(img, self.clip_size, self.decoder_size) for img in images]

        inputs = await asyncio.to_thread(run)
        stages = _ServeStages(self)
        stages.timings["decode_image"] = time.perf_counter() - t0
        return inputs, stages

    def _stages(self) -> dict[str, DeploymentHandle]:
        stages = {
            "text_encoder": self.text_encoder,
            "image_encoder": self.image_encoder,
            "prior": self.prior,
            "decoder": self.decoder,
        }
        stages.update({f"upsampler{i + 1}": h for i, h in enumerate(self.upsamplers)})
        return stages

    def _resolve(self, **overrides: Any) -> SamplingSettings:
        """Bundle defaults with the request's non-None settings."""
        return replace(self.settings, **{k: v for k, v in overrides.items() if v is not None})

    async def _upsample(
        self, images: Any, seeds: list[int], s: SamplingSettings, timings: dict[str, float]
    ) -> Any:
        for i, up in enumerate(self.upsamplers):
            job = UpsampleJob(images, seeds, s)
            images = await self._call(f"upsampler{i + 1}", up.sample.remote(job), timings)
        return images

    async def _call(
        self, stage: str, response: DeploymentResponse, timings: dict[str, float]
    ) -> Any:
        """Await one stage call with the stage timeout; map failures to 503/504."""
        t0 = time.perf_counter()
        try:
            out = await asyncio.wait_for(_awaitable(response), timeout=self.limits.stage_timeout_s)
        except TimeoutError:
            response.cancel()
            raise StageError(
                stage, f"took longer than {self.limits.stage_timeout_s:g} s", 504
            ) from None
        except UNAVAILABLE as e:
            raise StageError(stage, f"unavailable ({type(e).__name__}); retry shortly") from None
        except RayTaskError as e:
            if isinstance(e.cause, UNAVAILABLE):
                raise StageError(stage, f"unavailable ({type(e.cause).__name__})") from None
            raise
        timings[stage] = time.perf_counter() - t0
        return out

    async def _respond(
        self,
        images: Any,
        seed: int,
        timings: dict[str, float],
        start: float,
        notes: list[str | None] | None = None,
    ) -> GenerateResponse:
        t0 = time.perf_counter()
        pngs = await asyncio.to_thread(lambda: [encode_png_b64(a) for a in to_uint8(images)])
        timings["encode_png"] = time.perf_counter() - t0
        timings["total"] = time.perf_counter() - start
        warnings = [n for n in notes or [] if n]
        return GenerateResponse(images=pngs, seed=seed, timings=timings, warnings=warnings)


async def _awaitable(response: DeploymentResponse) -> Any:
    return await response


class _ServeStages:
    """``unclip.manipulations.Stages`` over the ingress's deployment handles."""

    def __init__(self, ingress: Ingress) -> None:
        self.ingress = ingress
        self.timings: dict[str, float] = {}

    async def _call(self, stage: str, response: DeploymentResponse) -> Any:
        before = self.timings.pop(stage, 0.0)
        out = await self.ingress._call(stage, response, self.timings)
        self.timings[stage] += before
        return out

    async def encode_images(self, images: Tensor) -> Tensor:
        return await self._call("image_encoder", self.ingress.image_encoder.encode.remote(images))

    async def encode_text(self, text: str) -> tuple[Tensor, str | None]:
        cond, note = await self._call("text_encoder", self.ingress.text_encoder.encode.remote(text))
        return cond.emb, note

    async def invert(self, images: Tensor, z: Tensor, s: SamplingSettings) -> Tensor:
        job = InvertJob(images, z, s)
        return await self._call("inversion", self.ingress.decoder.invert.remote(job))

    async def decode(self, z: Tensor, x_T: Tensor, seeds: list[int], s: SamplingSettings) -> Tensor:
        job = LatentJob(z, x_T, seeds, s)
        return await self._call("decoder", self.ingress.decoder.decode_latents.remote(job))

    async def upsample(self, images: Tensor, seeds: list[int], s: SamplingSettings) -> Tensor:
        return await self.ingress._upsample(images, seeds, s, self.timings)
