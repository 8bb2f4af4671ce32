"""The HTTP API (serving/README.md): FastAPI routes, request/response models, errors.

Only HTTP lives here; the work is done by a ``Service`` (the Serve ingress in
``serving.ingress``). Request models are built from the configured ``Limits`` so the
OpenAPI schema at ``/openapi.json`` shows the real bounds. Every error is JSON
``{"detail": "<field>: <what is wrong>", ...}``:

    400 malformed JSON / bad Content-Length    401 missing or wrong API key
    413 body or image too large                422 a field is invalid (named in ``detail``)
    500 a bug (logged; never plain text)       503 a stage is unavailable (retry)
    504 a stage took longer than ``stage_timeout_s``

With an API key, every route needs ``Authorization: Bearer <key>`` except the open ones
(``serving.guards.OPEN_PATHS``: the page, health for probes, and the API docs). The key and
the body size are checked by ``serving.guards.Guard`` before any parsing.
"""

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Protocol

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.security import HTTPBearer
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from serving.admission import Overloaded
from serving.docs import add_docs
from serving.guards import Guard, JsonErrors
from serving.images import RequestError
from serving.limits import Limits

logger = logging.getLogger("ray.serve")

MAX_SEED = 2**32 - 1
PAGE = Path(__file__).parent / "static" / "index.html"


class StageError(Exception):
    """A stage could not answer: unavailable (503) or too slow (504)."""

    def __init__(self, stage: str, message: str, status: int = 503, retry_after_s: int = 1) -> None:
        super().__init__(f"{stage}: {message}")
        self.status = status
        self.retry_after_s = retry_after_s


# ---------------------------------------------------------------------- models
class FieldError(BaseModel):
    field: str
    message: str


class ErrorResponse(BaseModel):
    detail: str
    errors: list[FieldError] | None = None


class GenerateResponse(BaseModel):
    images: list[str] = Field(description="base64-encoded PNG images, one per requested image")
    seed: int = Field(description="the seed used; send it back to get the same images")
    timings: dict[str, float] = Field(description="seconds per stage, and 'total'")
    warnings: list[str] = Field(
        default_factory=list,
        description="what the request did not get as asked, e.g. a prompt truncated to the "
        "CLIP context (the images were still made)",
    )


class LivenessResponse(BaseModel):
    status: str = Field(description="'ok': the ingress answers (no stage is asked)")


class ReadinessResponse(BaseModel):
    status: str = Field(
        description="'ready' when every stage has a running replica, else 'not ready'"
    )
    stages: dict[str, str] = Field(
        description="per stage: 'ok', or its Serve status and running replicas"
    )


class RequestModels:
    """The request models for one set of limits."""

    def __init__(self, limits: Limits) -> None:
        strict = ConfigDict(extra="forbid", strict=True)
        Steps = Annotated[int | None, Field(ge=1, le=limits.max_steps)]
        Guidance = Annotated[
            float | None, Field(ge=0.0, le=limits.max_guidance_scale, allow_inf_nan=False)
        ]
        LatentSteps = Annotated[
            int | None,
            Field(
                ge=1,
                le=limits.max_steps,
                description="DDIM steps of the inversion and of decoding the latents (omit "
                "for the bundle's; fewer is faster and gives the image back less exactly)",
            ),
        ]
        Seed = Annotated[
            int | None,
            Field(ge=0, le=MAX_SEED, description="omit for a random seed (returned)"),
        ]
        NumImages = Annotated[int, Field(ge=1, le=limits.max_num_images)]
        Frames = Annotated[int, Field(ge=2, le=limits.max_frames)]
        Text = Annotated[
            str, Field(min_length=1, max_length=limits.max_prompt_chars), AfterValidator(_text)
        ]
        ImageB64 = Annotated[
            str,
            Field(
                min_length=1,
                description=f"base64 PNG/JPEG/WebP/GIF/BMP, at most {limits.max_image_bytes} "
                f"bytes and {limits.max_image_pixels} pixels",
            ),
        ]

        class GenerateRequest(BaseModel):
            """Text -> images. Unset sampling settings take the bundle's defaults."""

            model_config = strict
            prompt: Text
            num_images: NumImages = 1
            seed: Seed = None
            prior_guidance_scale: Guidance = None
            decoder_guidance_scale: Guidance = None
            prior_steps: Steps = None
            decoder_steps: Steps = None
            upsampler_steps: Steps = None
            candidates: Annotated[int | None, Field(ge=1, le=limits.max_candidates)] = None

        class VariationsRequest(BaseModel):
            """Image -> variations (CLIP image embedding, decoder DDIM inversion, eta > 0)."""

            model_config = strict
            image: ImageB64
            num_images: NumImages = 1
            eta: Annotated[float | None, Field(ge=0.0, le=1.0, allow_inf_nan=False)] = None
            latent_steps: LatentSteps = None
            seed: Seed = None

        class InterpolateRequest(BaseModel):
            """``frames`` images from image_a to image_b (slerp of both bipartite latents)."""

            model_config = strict
            image_a: ImageB64
            image_b: ImageB64
            frames: Frames
            fixed_noise: bool = Field(
                default=False,
                description="hold the decoder latent x_T at image_a's for every frame instead "
                "of slerping it between the two inversions",
            )
            latent_steps: LatentSteps = None
            seed: Seed = None

        class TextDiffRequest(BaseModel):
            """Edit an image towards ``to_text`` (away from ``from_text``, default
            "a photo"), in ``frames`` steps of strength 0 .. ``max_strength`` (default 0.5)."""

            model_config = strict
            image: ImageB64
            to_text: Text
            from_text: Text | None = None
            frames: Frames
            max_strength: Annotated[float | None, Field(gt=0.0, le=1.0, allow_inf_nan=False)] = None
            latent_steps: LatentSteps = None
            seed: Seed = None

        self.generate = GenerateRequest
        self.variations = VariationsRequest
        self.interpolate = InterpolateRequest
        self.text_diff = TextDiffRequest


def _text(v: str) -> str:
    if not v.strip():
        raise ValueError("must not be empty or only whitespace")
    return v


class Service(Protocol):
    async def generate(self, req: Any) -> GenerateResponse: ...
    async def variations(self, req: Any) -> GenerateResponse: ...
    async def interpolate(self, req: Any) -> GenerateResponse: ...
    async def text_diff(self, req: Any) -> GenerateResponse: ...
    async def readiness(self) -> tuple[bool, dict[str, str]]: ...


# ---------------------------------------------------------------------- app
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 413, 422, 500, 503, 504)
}


def make_api(
    service: Service,
    limits: Limits,
    api_keys: Sequence[str] = (),
    page_config: dict[str, Any] | None = None,
) -> FastAPI:
    """The FastAPI app of the ingress: routes call ``service``; checks happen here."""
    models = RequestModels(limits)
    GenerateRequest, VariationsRequest = models.generate, models.variations
    InterpolateRequest, TextDiffRequest = models.interpolate, models.text_diff
    app = FastAPI(
        title="unclip-ray",
        version="1",
        description="unCLIP text-to-image on Ray Serve. Images are base64 PNG."
        + (" Send `Authorization: Bearer <key>`." if api_keys else ""),
        docs_url=None,  # serving.docs: Swagger UI from local assets, no CDN
        redoc_url=None,
    )
    add_docs(app)
    _add_error_handlers(app)
    # the key is checked by Guard; this declares the bearer scheme in the OpenAPI document
    keyed = [Depends(HTTPBearer(auto_error=False, description="the API key"))] if api_keys else []
    app.add_middleware(
        Guard,  # type: ignore[arg-type]
        max_body_bytes=limits.max_body_bytes,
        api_keys=api_keys,
    )
    app.add_middleware(JsonErrors)  # type: ignore[arg-type]  # outermost: covers the guard too

    @app.post("/v1/generate", responses=ERRORS, dependencies=keyed)
    async def generate(req: GenerateRequest) -> GenerateResponse:  # type: ignore[valid-type]
        """Generate images from a prompt: text encoder -> prior -> decoder -> upsamplers."""
        return await service.generate(req)

    @app.post("/v1/variations", responses=ERRORS, dependencies=keyed)
    async def variations(req: VariationsRequest) -> GenerateResponse:  # type: ignore[valid-type]
        """Variations of an image that keep its semantics and style (docs/method.md)."""
        return await service.variations(req)

    @app.post("/v1/interpolate", responses=ERRORS, dependencies=keyed)
    async def interpolate(req: InterpolateRequest) -> GenerateResponse:  # type: ignore[valid-type]
        """Interpolate between two images through their bipartite latents (docs/method.md)."""
        return await service.interpolate(req)

    @app.post("/v1/text-diff", responses=ERRORS, dependencies=keyed)
    async def text_diff(req: TextDiffRequest) -> GenerateResponse:  # type: ignore[valid-type]
        """Language-guided edit: move the image's CLIP embedding along a text diff."""
        return await service.text_diff(req)

    @app.get("/v1/health")
    async def health() -> LivenessResponse:
        """Liveness (a Kubernetes ``livenessProbe``): 200 while the ingress answers HTTP.
        Asks no stage, so it stays fast however busy the stages are."""
        return LivenessResponse(status="ok")

    @app.get("/v1/ready", responses={503: {"model": ReadinessResponse}})
    async def ready() -> ReadinessResponse:
        """Readiness (a ``readinessProbe``, a load balancer's health check): 200 when every
        stage has a running replica, per Serve's own health checks, else 503."""
        ok, stages = await service.readiness()
        body = ReadinessResponse(status="ready" if ok else "not ready", stages=stages)
        if not ok:
            return JSONResponse(body.model_dump(), status_code=503)  # type: ignore[return-value]
        return body

    page = PAGE.read_text().replace(
        "/*PAGE_CONFIG*/{}", _json({**(page_config or {}), "auth": bool(api_keys)})
    )

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    return app


def _json(obj: Any) -> str:
    import json

    return json.dumps(obj).replace("<", "\\u003c")


# ---------------------------------------------------------------------- errors
def _field(loc: tuple[Any, ...]) -> str:
    """("body", "num_images") -> "num_images"; ("body",) -> "body"."""
    parts = [str(p) for p in loc]
    if parts[:1] == ["body"]:
        parts = parts[1:]
    return ".".join(parts) or "body"


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = []
        status = 422
        for e in exc.errors():
            msg = str(e.get("msg", "invalid")).removeprefix("Value error, ")
            field = _field(tuple(e.get("loc", ())))
            if e.get("type") == "json_invalid":
                status, field = 400, "body"
                msg = f"malformed JSON ({(e.get('ctx') or {}).get('error', msg)})"
            elif e.get("type") == "extra_forbidden":
                msg = "unknown field (not part of this request)"
            errors.append({"field": field, "message": msg})
        detail = "; ".join(f"{x['field']}: {x['message']}" for x in errors) or "invalid request"
        return JSONResponse({"detail": detail, "errors": errors}, status_code=status)

    @app.exception_handler(RequestError)
    async def bad_request(_: Request, exc: RequestError) -> JSONResponse:
        return JSONResponse(
            {"detail": str(exc), "errors": [{"field": exc.field, "message": exc.message}]},
            status_code=exc.status,
        )

    @app.exception_handler(Overloaded)
    async def overloaded(_: Request, exc: Overloaded) -> JSONResponse:
        headers = {"Retry-After": str(int(exc.retry_after_s))}
        return JSONResponse({"detail": str(exc)}, status_code=503, headers=headers)

    @app.exception_handler(StageError)
    async def stage_error(_: Request, exc: StageError) -> JSONResponse:
        headers = {"Retry-After": str(exc.retry_after_s)} if exc.status == 503 else None
        return JSONResponse({"detail": str(exc)}, status_code=exc.status, headers=headers)
