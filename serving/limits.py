"""Request limits of the HTTP API: what one request may ask for.

Sources, highest priority first: the application args of the Serve config
(``applications[].args.limits`` in ``serving/config.yaml``), environment variables of the
process that builds the application (``UNCLIP_MAX_NUM_IMAGES=4`` etc., the upper-cased
field name with the ``UNCLIP_`` prefix), then the defaults below.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from unclip.config import ConfigError, from_dict

ENV_PREFIX = "UNCLIP_"


@dataclass(frozen=True)
class Limits:
    max_prompt_chars: int = 500  # characters of a prompt (CLIP truncates tokens beyond its context)
    max_num_images: int = 8  # images per request
    max_frames: int = 8  # frames of an interpolation or a text diff
    max_steps: int = 250  # prior / decoder / upsampler sampling steps
    max_candidates: int = 8  # prior best-of-N candidates
    max_guidance_scale: float = 30.0  # classifier-free guidance scales are in [0, this]
    max_image_bytes: int = 4 * 1024 * 1024  # decoded size of an uploaded image
    max_image_pixels: int = 4096 * 4096  # width * height of an uploaded image (from its header)
    stage_timeout_s: float = 60.0  # one stage call; a stage that takes longer answers 504
    request_timeout_s: float = 90.0  # a whole request (all its stages); then 504, work stops
    # network evaluations of one image row a request may ask for, over all its stages
    # (serving.cost): 8 images at default settings cost about 2,000
    max_request_cost: int = 10_000

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if getattr(self, f.name) <= 0:
                raise ConfigError(f"limits.{f.name} must be > 0, got {getattr(self, f.name)}")

    @property
    def max_body_bytes(self) -> int:
        """Largest request body: a base64 image at the byte limit plus room for the JSON."""
        return (self.max_image_bytes + 2) // 3 * 4 + 64 * 1024

    @classmethod
    def from_sources(
        cls, args: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None
    ) -> Limits:
        """Defaults <- ``UNCLIP_<FIELD>`` env variables <- ``args`` (a mapping of field names).

        Unknown keys and wrong types raise ``ConfigError`` naming the field.
        """
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = env.get(ENV_PREFIX + f.name.upper())
            if raw is None or raw == "":
                continue
            try:
                values[f.name] = float(raw) if f.type == "float" else int(raw)
            except ValueError:
                raise ConfigError(
                    f"{ENV_PREFIX}{f.name.upper()}={raw!r}: expected a {f.type}"
                ) from None
        values.update(dict(args or {}))
        return from_dict(cls, values, "limits")
