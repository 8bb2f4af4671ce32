"""The ingress deployment: HTTP in (``serving.api``), stage deployments called in order.

``generate`` reads like ``UnclipPipeline.generate``, one block per stage, except that each
stage is a ``DeploymentHandle`` call (batched on the other side) with a timeout. The
manipulations (variations, interpolations, text diffs) are not written here: the ingress runs
the coroutines of ``unclip.manipulations`` with stages that call the deployments
(``_ServeStages``), the same code as the library and the CLI. A stage that is down answers
503, one that is too slow 504; a call whose replica died is sent once more; a request over
the cost budget (``serving.cost``) or otherwise bad never reaches a stage, nor one that could
not finish before its deadline at the measured rate (``serving.admission``: 503 with
``Retry-After`` at once). Each request has one deadline (``limits.request_timeout_s``) shared
by its stage calls: a call answers 504 when it passes, and the stage stops sampling at its
next step.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import secrets
import time
from dataclasses import dataclass, field, replace
from typing import Any

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
from serving.batching import DecodeJob, InvertJob, LatentJob, PriorJob, UpsampleJob
from serving.cost import check_cost, request_cost
from serving.guards import read_api_keys
from serving.images import decode_image, encode_png_b64
from serving.limits import Limits
from unclip import fs, manipulations
from unclip.checkpoint import load_stage_config, read_bundle_spec
from unclip.config import SamplingSettings, from_dict, to_dict
from unclip.manipulations import ImageInput, prepare_image
from unclip.pipeline import image_seeds, to_uint8

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
        self.clip_size = int(spec.clip["image_size"])  # the CLIP's input side in pixels
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

    # The manipulations: the coroutines of unclip.manipulations (the library's and the
    # CLI's code), with stages that call the deployments (``_ServeStages``).
    @_admitted
    async def variations(self, req: Any, work: Work) -> GenerateResponse:
        start = time.perf_counter()
        n = req.num_images
        eta = manipulations.VARIATIONS_ETA if req.eta is None else req.eta
        s = self._resolve(decoder_eta=eta, latent_steps=req.latent_steps)
        cost = request_cost(n, s, len(self.upsamplers), inverted=1)
        self._admit(work, cost, ["num_images", "latent_steps"])
        (x,), stages = await self._inputs([req.image], ["image"], work)
        seed = self._seed(req.seed)
        out = await manipulations.compute_variations(stages, x, n, seed, s)
        return await self._respond(out.images, seed, work, start, out.warnings)

    @_admitted
    async def interpolate(self, req: Any, work: Work) -> GenerateResponse:
        start = time.perf_counter()
        s = self._resolve(latent_steps=req.latent_steps)
        cost = request_cost(req.frames, s, len(self.upsamplers), inverted=2)
        self._admit(work, cost, ["frames", "latent_steps"])
        (a, b), stages = await self._inputs(
            [req.image_a, req.image_b], ["image_a", "image_b"], work
        )
        seed = self._seed(req.seed)
        out = await manipulations.compute_interpolation(
            stages, a, b, req.frames, seed, s, fixed_noise=req.fixed_noise
        )
        return await self._respond(out.images, seed, work, start, out.warnings)

    @_admitted
    async def text_diff(self, req: Any, work: Work) -> GenerateResponse:
        start = time.perf_counter()
        s = self._resolve(latent_steps=req.latent_steps)
        cost = request_cost(req.frames, s, len(self.upsamplers), inverted=1)
        self._admit(work, cost, ["frames", "latent_steps"])
        (x,), stages = await self._inputs([req.image], ["image"], work)
        seed = self._seed(req.seed)
        out = await manipulations.compute_text_diff(
            stages,
            x,
            req.to_text,
            manipulations.TEXT_DIFF_FROM if req.from_text is None else req.from_text,
            req.frames,
            manipulations.TEXT_DIFF_STRENGTH if req.max_strength is None else req.max_strength,
            seed,
            s,
        )
        return await self._respond(out.images, seed, work, start, out.warnings)

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
        seed = self._seed(seed)
        return seed, image_seeds(seed, n)

    def _seed(self, seed: int | None) -> int:
        """The request's seed, or a random one (returned in the response)."""
        return secrets.randbelow(MAX_SEED + 1) if seed is None else seed

    async def _inputs(
        self, texts: list[str], fields: list[str], work: Work
    ) -> tuple[list[ImageInput], _ServeStages]:
        """Base64 images -> each at CLIP's size and the decoder's (``prepare_image``)."""
        t0 = time.perf_counter()

        def run() -> list[ImageInput]:
            images = [decode_image(t, self.limits, f) for t, f in zip(texts, fields, strict=True)]
            return [prepare_image(img, self.clip_size, self.decoder_size) for img in images]

        inputs = await asyncio.to_thread(run)
        work.timings["decode_image"] = time.perf_counter() - t0
        return inputs, _ServeStages(self, work)

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


class _ServeStages:
    """``unclip.manipulations.Stages`` over the ingress's deployment handles, within one
    request's ``Work`` (its deadline and timings)."""

    def __init__(self, ingress: Ingress, work: Work) -> None:
        self.ingress = ingress
        self.work = work
        self.timings = work.timings

    async def _call(self, stage: str, method: Any, arg: Any) -> Any:
        before = self.timings.pop(stage, 0.0)
        out = await self.ingress._call(stage, method, arg, self.work)
        self.timings[stage] += before
        return out

    async def encode_images(self, images: Tensor) -> Tensor:
        return await self._call("image_encoder", self.ingress.image_encoder.encode, images)

    async def encode_text(self, text: str) -> tuple[Tensor, str | None]:
        cond, note = await self._call("text_encoder", self.ingress.text_encoder.encode, text)
        return cond.emb, note

    async def invert(self, images: Tensor, z: Tensor, s: SamplingSettings) -> Tensor:
        job = InvertJob(images, z, s, deadline=self.work.deadline)
        return await self._call("inversion", self.ingress.decoder.invert, job)

    async def decode(self, z: Tensor, x_T: Tensor, seeds: list[int], s: SamplingSettings) -> Tensor:
        job = LatentJob(z, x_T, seeds, s, deadline=self.work.deadline)
        return await self._call("decoder", self.ingress.decoder.decode_latents, job)

    async def upsample(self, images: Tensor, seeds: list[int], s: SamplingSettings) -> Tensor:
        return await self.ingress._upsample(images, seeds, s, self.work)
