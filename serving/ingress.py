"""The ingress deployment: HTTP in (``serving.api``), stage deployments called in order.

``generate`` reads like ``UnclipPipeline.generate``, one block per stage, except that each
stage is a ``DeploymentHandle`` call (batched on the other side) with a timeout. A stage
that is down answers 503, one that is too slow 504; a bad request never reaches a stage.
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

from serving.api import MAX_SEED, GenerateResponse, StageError, make_api
from serving.batching import DecodeJob, InvertJob, PriorJob, UpsampleJob
from serving.images import decode_image, encode_png_b64
from serving.limits import Limits
from unclip import fs
from unclip.checkpoint import load_stage_config, read_bundle_spec
from unclip.config import SamplingSettings, from_dict, to_dict
from unclip.pipeline import from_pil, image_seeds, to_uint8

DEFAULT_ETA = 0.8  # variations' DDIM eta, as in UnclipPipeline.variations
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

    def __serve_build_asgi_app__(self) -> Any:
        return make_api(
            self,
            self.limits,
            self.api_key,
            page_config={"limits": to_dict(self.limits), "defaults": to_dict(self.settings)},
        )

    # ------------------------------------------------------------------ endpoints
    async def generate(self, req: Any) -> GenerateResponse:
        n = req.num_images
        seed = req.seed if req.seed is not None else secrets.randbelow(MAX_SEED + 1)
        seeds = image_seeds(seed, n)
        s = self._resolve(
            prior_steps=req.prior_steps,
            decoder_steps=req.decoder_steps,
            upsampler_steps=req.upsampler_steps,
            prior_guidance_scale=req.prior_guidance_scale,
            decoder_guidance_scale=req.decoder_guidance_scale,
            candidates=req.candidates,
        )
        timings: dict[str, float] = {}
        start = time.perf_counter()

        # 1. CLIP text encoder: the caption's embedding (and token states), one row per image
        text = await self._call(
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
        return await self._respond(images, seed, timings, start)

    async def variations(self, req: Any) -> GenerateResponse:
        start = time.perf_counter()
        image = await asyncio.to_thread(decode_image, req.image, self.limits)
        x = from_pil(image, self.decoder_size)
        timings: dict[str, float] = {"decode_image": time.perf_counter() - start}
        n = req.num_images
        seed = req.seed if req.seed is not None else secrets.randbelow(MAX_SEED + 1)
        seeds = image_seeds(seed, n)
        s = self._resolve(decoder_eta=DEFAULT_ETA if req.eta is None else req.eta)

        # 1. CLIP image encoder: z_i
        z = await self._call("image_encoder", self.image_encoder.encode.remote(x), timings)

        # 2. DDIM inversion of the decoder: x_T with (z_i, x_T) -> the input image
        x_T = await self._call("inversion", self.decoder.invert.remote(InvertJob(x, z, s)), timings)

        # 3. decoder with eta > 0 from the shared x_T: variations keep semantics and layout
        job = DecodeJob(z.repeat(n, 1), None, seeds, s, noise=x_T.repeat(n, 1, 1, 1))
        images = await self._call("decoder", self.decoder.sample.remote(job), timings)

        # 4. upsamplers
        images = await self._upsample(images, seeds, s, timings)
        return await self._respond(images, seed, timings, start)

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
        self, images: Any, seed: int, timings: dict[str, float], start: float
    ) -> GenerateResponse:
        t0 = time.perf_counter()
        pngs = await asyncio.to_thread(lambda: [encode_png_b64(a) for a in to_uint8(images)])
        timings["encode_png"] = time.perf_counter() - t0
        timings["total"] = time.perf_counter() - start
        return GenerateResponse(images=pngs, seed=seed, timings=timings)


async def _awaitable(response: DeploymentResponse) -> Any:
    return await response
