"""The ingress deployment: HTTP in (``serving.api``), stage deployments called in order.

``generate`` reads like ``UnclipPipeline.generate`` (and ``variations``, ``interpolate``,
``text_diff`` like their in-process versions in ``unclip.pipeline`` / ``unclip.manipulations``),
one block per stage, except that each stage is a ``DeploymentHandle`` call (batched on the
other side) with a timeout. A stage
that is down answers 503, one that is too slow 504; a call whose replica died is sent once
more; a request over the cost budget (``serving.cost``) or otherwise bad never reaches a stage,
nor one that could not finish before its deadline at the measured rate (``serving.admission``:
503 with ``Retry-After`` at once).
Each request has one deadline (``limits.request_timeout_s``) shared by its stage calls: a
call answers 504 when it passes, and the stage stops sampling at its next step.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import secrets
import time
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from ray import serve
from ray.exceptions import (
    ObjectLostError,
    RayActorError,
    RayTaskError,
    WorkerCrashedError,
)
from ray.serve.exceptions import (
    BackPressureError,
    DeploymentUnavailableError,
    ReplicaUnavailableError,
)
from ray.serve.handle import DeploymentHandle, DeploymentResponse
from torch import Tensor

from serving.admission import Admission
from serving.api import MAX_SEED, GenerateResponse, StageError, make_api
from serving.batching import DecodeJob, InvertJob, PriorJob, UpsampleJob
from serving.cost import check_cost, request_cost
from serving.guards import read_api_keys
from serving.images import decode_image, encode_png_b64
from serving.limits import Limits
from unclip import fs, manipulations
from unclip.checkpoint import load_stage_config, read_bundle_spec
from unclip.config import SamplingSettings, from_dict, to_dict
from unclip.manipulations import interpolation_latents, text_diff_latents
from unclip.pipeline import UnclipPipeline, from_pil, image_seeds, to_uint8


def _default(fn: Any, name: str) -> Any:
    return inspect.signature(fn).parameters[name].default


# the in-process functions' defaults, so that both paths agree
VARIATIONS_ETA: float = _default(UnclipPipeline.variations, "eta")
TEXT_DIFF_FROM: str = _default(manipulations.text_diff, "from_text")
TEXT_DIFF_STRENGTH: float = _default(manipulations.text_diff, "max_strength")
# a replica died under the call (a RayTaskError wrapping one of these is an instance of it too)
REPLICA_DIED = (
    RayActorError,  # ActorDiedError, ActorUnavailableError
    ReplicaUnavailableError,
    WorkerCrashedError,
    ObjectLostError,  # OwnerDiedError, ...
)
UNAVAILABLE = (*REPLICA_DIED, BackPressureError, DeploymentUnavailableError)
logger = logging.getLogger("ray.serve")
READINESS_TTL_S = 1.0  # readiness answers from a cache at most this old


@dataclass
class Work:
    """One request's deadline (``time.time()`` seconds), shared by all its stage calls (each
    stage stops sampling once it passes), and its timings per stage."""

    deadline: float
    timings: dict[str, float] = field(default_factory=dict)
    cost: int = 0  # admitted cost (serving.cost), released when the request ends


def _admitted(endpoint: Any) -> Any:
    """An endpoint called with its request's ``Work`` (deadline, timings, admitted cost);
    the cost is released when it returns, as a rate sample if it succeeded."""

    @functools.wraps(endpoint)
    async def run(self: Ingress, req: Any) -> GenerateResponse:
        work = Work(deadline=time.time() + self.limits.request_timeout_s)
        try:
            out = await endpoint(self, req, work)
        except BaseException:
            self.admission.release(work.cost, completed=False)
            raise
        self.admission.release(work.cost, completed=True)
        return out

    return run


GENERATE_FIELDS = ["num_images", "candidates", "prior_steps", "decoder_steps"]
GENERATE_FIELDS += ["upsampler_steps", "prior_guidance_scale", "decoder_guidance_scale"]


@serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=256)
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
        # read here, in the replica: the keys stay out of the Serve config the dashboard shows
        self.api_keys = read_api_keys(api_key)
        spec = read_bundle_spec(bundle)
        self.settings: SamplingSettings = spec.sampling
        decoder_cfg = load_stage_config(fs.join(bundle, spec.stages[1]))
        self.decoder_size: int = decoder_cfg.net.image_size  # type: ignore[union-attr]
        self._readiness: tuple[bool, dict[str, str]] = (False, {})
        self._readiness_at = -float("inf")
        self._readiness_lock = asyncio.Lock()
        self.admission = Admission(
            deadline_s=self.limits.request_timeout_s, cold_cost=self.limits.max_request_cost
        )

    def __serve_build_asgi_app__(self) -> Any:
        return make_api(
            self,
            self.limits,
            self.api_keys,
            page_config={"limits": to_dict(self.limits), "defaults": to_dict(self.settings)},
        )

    # ------------------------------------------------------------------ endpoints
    @_admitted
    async def generate(self, req: Any, work: Work) -> GenerateResponse:
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
        self._admit(work, request_cost(n, s, len(self.upsamplers), prior=True), GENERATE_FIELDS)

        # 1. CLIP text encoder: the caption's embedding (and token states), one row per image
        text, note = await self._call("text_encoder", self.text_encoder.encode, req.prompt, work)
        text = text.repeat(n)

        # 2. prior: CLIP text embedding -> CLIP image embedding (best of `candidates`)
        job = PriorJob(text, seeds, s, deadline=work.deadline)
        image_emb = await self._call("prior", self.prior.sample, job, work)

        # 3. decoder: CLIP image embedding -> base-resolution image
        job = DecodeJob(image_emb, text, seeds, s, deadline=work.deadline)
        images = await self._call("decoder", self.decoder.sample, job, work)

        # 4. upsamplers: each multiplies the resolution
        images = await self._upsample(images, seeds, s, work)
        return await self._respond(images, seed, work, start, [note])

    @_admitted
    async def variations(self, req: Any, work: Work) -> GenerateResponse:
        start = time.perf_counter()
        n = req.num_images
        s = self._resolve(decoder_eta=VARIATIONS_ETA if req.eta is None else req.eta)
        self._admit(work, request_cost(n, s, len(self.upsamplers), inverted=1), ["num_images"])
        x = await self._decode_images([req.image], ["image"])
        work.timings["decode_image"] = time.perf_counter() - start
        seed, seeds = self._seeds(req.seed, n)

        # 1-2. CLIP image encoder (z_i) and DDIM inversion of the decoder: x_T such that
        # decoding (z_i, x_T) gives the input image back
        z, x_T = await self._bipartite_latents(x, s, work)

        # 3. decoder with eta > 0 from the shared x_T: variations keep semantics and layout
        noise = x_T.repeat(n, 1, 1, 1)
        job = DecodeJob(z.repeat(n, 1), None, seeds, s, noise=noise, deadline=work.deadline)
        images = await self._call("decoder", self.decoder.sample, job, work)

        # 4. upsamplers
        images = await self._upsample(images, seeds, s, work)
        return await self._respond(images, seed, work, start)

    @_admitted
    async def interpolate(self, req: Any, work: Work) -> GenerateResponse:
        start = time.perf_counter()
        s = self.settings
        self._admit(work, request_cost(req.frames, s, len(self.upsamplers), inverted=2), ["frames"])
        x = await self._decode_images([req.image_a, req.image_b], ["image_a", "image_b"])
        work.timings["decode_image"] = time.perf_counter() - start
        seed, seeds = self._seeds(req.seed, req.frames)

        # 1-2. bipartite latents of both images: CLIP image embeddings, decoder DDIM inversion
        z, x_T = await self._bipartite_latents(x, s, work)

        # 3. slerp from a to b, then decode deterministically from the latents and upsample
        z, x_T = interpolation_latents(z[0:1], x_T[0:1], z[1:2], x_T[1:2], req.frames)
        images = await self._decode_latents(z, x_T, seeds, s, work)
        return await self._respond(images, seed, work, start)

    @_admitted
    async def text_diff(self, req: Any, work: Work) -> GenerateResponse:
        start = time.perf_counter()
        s = self.settings
        self._admit(work, request_cost(req.frames, s, len(self.upsamplers), inverted=1), ["frames"])
        x = await self._decode_images([req.image], ["image"])
        work.timings["decode_image"] = time.perf_counter() - start
        seed, seeds = self._seeds(req.seed, req.frames)
        from_text = TEXT_DIFF_FROM if req.from_text is None else req.from_text
        strength = TEXT_DIFF_STRENGTH if req.max_strength is None else req.max_strength

        # 1. the two captions' CLIP text embeddings
        (to_text, note_to), (from_text, note_from) = await asyncio.gather(
            self._call("text_encoder", self.text_encoder.encode, req.to_text, work),
            self._call("text_encoder", self.text_encoder.encode, from_text, work),
        )

        # 2. the image's bipartite latent
        z, x_T = await self._bipartite_latents(x, s, work)

        # 3. move z along the text diff with x_T fixed, then decode deterministically
        z, x_T = text_diff_latents(z, x_T, to_text.emb, from_text.emb, req.frames, strength)
        images = await self._decode_latents(z, x_T.contiguous(), seeds, s, work)
        notes = [f"to_text: {note_to}" if note_to else None]
        notes.append(f"from_text: {note_from}" if note_from else None)
        return await self._respond(images, seed, work, start, notes)

    async def readiness(self) -> tuple[bool, dict[str, str]]:
        """Every stage's state from Serve's controller (its replicas pass ``check_health``),
        cached for ``READINESS_TTL_S``: a probe never waits in a stage's request queue."""
        async with self._readiness_lock:
            if time.monotonic() - self._readiness_at > READINESS_TTL_S:
                self._readiness = await asyncio.to_thread(self._stage_states)
                self._readiness_at = time.monotonic()
        return self._readiness

    def _stage_states(self) -> tuple[bool, dict[str, str]]:
        try:
            app = serve.status().applications[serve.get_replica_context().app_name]
        except Exception as e:  # noqa: BLE001 - the controller unreachable means "not ready"
            return False, dict.fromkeys(self._stages(), f"unknown ({type(e).__name__})")
        stages = {}
        for stage, handle in self._stages().items():
            d = app.deployments.get(handle.deployment_name)
            running = d.replica_states.get("RUNNING", 0) if d else 0
            healthy = d is not None and running > 0 and d.status != "UNHEALTHY"
            status = d.status.value.lower() if d else "missing"
            stages[stage] = "ok" if healthy else f"{status}, {running} replicas running"
        return all(v == "ok" for v in stages.values()), stages

    # ------------------------------------------------------------------ helpers
    def _seeds(self, seed: int | None, n: int) -> tuple[int, list[int]]:
        """The request's seed (a random one if unset) and its per-image seeds."""
        seed = secrets.randbelow(MAX_SEED + 1) if seed is None else seed
        return seed, image_seeds(seed, n)

    async def _decode_images(self, texts: list[str], fields: list[str]) -> Tensor:
        """Base64 images -> (N, 3, S, S) in [-1, 1] at the decoder's resolution."""

        def run() -> Tensor:
            images = [decode_image(t, self.limits, f) for t, f in zip(texts, fields, strict=True)]
            return torch.cat([from_pil(img, self.decoder_size) for img in images])

        return await asyncio.to_thread(run)

    async def _bipartite_latents(
        self, x: Tensor, s: SamplingSettings, work: Work
    ) -> tuple[Tensor, Tensor]:
        """Images (N, 3, S, S) -> (z_i (N, D) from the CLIP image encoder, x_T by inversion)."""
        z = await self._call("image_encoder", self.image_encoder.encode, x, work)
        job = InvertJob(x, z, s, deadline=work.deadline)
        x_T = await self._call("inversion", self.decoder.invert, job, work)
        return z, x_T

    async def _decode_latents(
        self,
        z: Tensor,
        x_T: Tensor,
        seeds: list[int],
        s: SamplingSettings,
        work: Work,
    ) -> Tensor:
        """Decode (z, x_T) rows with eta 0 (deterministic given the latent), then upsample."""
        s0 = replace(s, decoder_eta=0.0)
        job = DecodeJob(z, None, seeds, s0, noise=x_T, deadline=work.deadline)
        images = await self._call("decoder", self.decoder.sample, job, work)
        return await self._upsample(images, seeds, s, work)

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
        self, images: Any, seeds: list[int], s: SamplingSettings, work: Work
    ) -> Any:
        for i, up in enumerate(self.upsamplers):
            job = UpsampleJob(images, seeds, s, deadline=work.deadline)
            images = await self._call(f"upsampler{i + 1}", up.sample, job, work)
        return images

    def _admit(self, work: Work, cost: dict[str, int], fields: list[str]) -> None:
        """Check the request's cost against the budget (422) and the load (503), before any
        stage is called; the cost counts as in flight until the request ends."""
        check_cost(cost, fields, self.limits.max_request_cost)
        total = sum(cost.values())
        self.admission.admit(total)
        work.cost = total

    async def _call(self, stage: str, method: Any, arg: Any, work: Work) -> Any:
        """``method.remote(arg)`` on a stage's handle, within the stage timeout and the
        request's deadline; failures map to 503/504. A call whose replica died is sent once
        more (stage calls are deterministic given their seeds, so the answer is the same)."""
        t0 = time.perf_counter()
        stage_deadline = time.time() + self.limits.stage_timeout_s
        deadline = min(stage_deadline, work.deadline)
        for attempt in (1, 2):
            response: DeploymentResponse = method.remote(arg)
            try:
                left = max(0.0, deadline - time.time())
                out = await asyncio.wait_for(_awaitable(response), timeout=left)
                break
            except TimeoutError:
                response.cancel()
                why = (
                    f"took longer than {self.limits.stage_timeout_s:g} s"
                    if stage_deadline <= work.deadline
                    else f"the request's deadline ({self.limits.request_timeout_s:g} s) passed"
                )
                raise StageError(stage, why, 504) from None
            except Exception as e:
                if not isinstance(e, UNAVAILABLE):
                    raise
                name = type(e.cause if isinstance(e, RayTaskError) else e).__name__
                if attempt == 1 and isinstance(e, REPLICA_DIED):
                    logger.warning("%s: replica failed (%s); sending the call again", stage, name)
                    continue
                retry = self.admission.drain_s() if isinstance(e, BackPressureError) else 1
                raise StageError(stage, f"unavailable ({name})", retry_after_s=retry) from None
        work.timings[stage] = time.perf_counter() - t0
        return out

    async def _respond(
        self,
        images: Any,
        seed: int,
        work: Work,
        start: float,
        notes: list[str | None] | None = None,
    ) -> GenerateResponse:
        t0 = time.perf_counter()
        pngs = await asyncio.to_thread(lambda: [encode_png_b64(a) for a in to_uint8(images)])
        timings = work.timings
        timings["encode_png"] = time.perf_counter() - t0
        timings["total"] = time.perf_counter() - start
        warnings = [n for n in notes or [] if n]
        return GenerateResponse(images=pngs, seed=seed, timings=timings, warnings=warnings)


async def _awaitable(response: DeploymentResponse) -> Any:
    return await response
