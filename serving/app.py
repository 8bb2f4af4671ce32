"""The Serve application: every deployment bound in one place (docs/architecture.md).

``import_path: serving.app:build_app`` in ``serving/config.yaml``; the application args are
``AppArgs`` (``bundle`` is required). ``serve deploy serving/config.yaml`` and
``unclip serve`` both build the graph here:

    Ingress (FastAPI) ─┬─ TextEncoder ── Prior ── Decoder ── Upsampler1 ── Upsampler2 ...
                       └─ ImageEncoder ───────────┘ (variations: invert + decode)
"""

from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from ray.serve import Application

from serving.deployments import Decoder, ImageEncoder, Prior, TextEncoder, Upsampler
from serving.guards import API_KEY_ENV, API_KEY_FILE_ENV
from serving.ingress import Ingress
from serving.limits import Limits
from unclip.checkpoint import read_bundle_spec
from unclip.config import to_dict


class AppArgs(BaseModel):
    """Application args (``applications[].args`` of the Serve config)."""

    model_config = ConfigDict(extra="forbid")
    bundle: str = Field(description="bundle URI (local path or s3://) from `unclip bundle`")
    limits: dict[str, Any] = Field(
        default_factory=dict, description="request limits (serving.limits.Limits fields)"
    )
    api_key: str | None = Field(
        default=None,
        description=f"a Bearer token the API accepts, beside ${API_KEY_ENV} and "
        f"${API_KEY_FILE_ENV} of the ingress replica; prefer those: args are shown in the "
        "Serve config and the dashboard",
    )


def upsampler_names(n: int) -> list[str]:
    return [f"Upsampler{i + 1}" for i in range(n)]


def build_app(args: AppArgs | dict[str, Any]) -> Application:
    """Bind the stage deployments of ``args.bundle`` behind the FastAPI ingress."""
    a = args if isinstance(args, AppArgs) else AppArgs.model_validate(args)
    spec = read_bundle_spec(a.bundle)  # fail here, with the bundle's message, if it is wrong
    limits = Limits.from_sources(a.limits)
    upsamplers = [
        Upsampler.options(name=name).bind(a.bundle, i)
        for i, name in enumerate(upsampler_names(len(spec.stages) - 2))
    ]
    return Ingress.bind(
        TextEncoder.bind(a.bundle),
        ImageEncoder.bind(a.bundle),
        Prior.bind(a.bundle),
        Decoder.bind(a.bundle),
        upsamplers,
        bundle=a.bundle,
        limits=to_dict(limits),
        api_key=a.api_key,
    )
