"""What a request costs, checked before any stage runs: a 422 instead of a certain timeout.

Each field has its own maximum (``serving.limits``), but their product does not. The cost of
a request is the number of network evaluations of one image row it asks for, summed over
its stages (classifier-free guidance evaluates every row twice):

    prior       images x candidates x prior_steps     (x2 with prior guidance)
    decoder     images x decoder_steps                (x2 with decoder guidance)
                (manipulations: images x latent_steps, x2 with latent guidance)
    inversion   input images x latent_steps           (x2 with latent guidance)
    upsamplers  images x upsampler_steps, per upsampler

and must stay within ``limits.max_request_cost``.
"""

from __future__ import annotations

from serving.images import RequestError
from unclip.config import SamplingSettings


def _guided(scale: float) -> int:
    return 1 if scale == 1.0 else 2


def request_cost(
    images: int,
    s: SamplingSettings,
    upsamplers: int,
    prior: bool = False,
    inverted: int = 0,
) -> dict[str, int]:
    """Network evaluations per stage for ``images`` output rows (``prior``: text-to-image;
    ``inverted``: input images DDIM-inverted through the decoder first, and the outputs
    decoded from their bipartite latents, both at the latent settings)."""
    latent = s.latent_steps * _guided(s.latent_guidance_scale)
    decoder = latent if inverted else s.decoder_steps * _guided(s.decoder_guidance_scale)
    cost = {
        "prior": images * s.candidates * s.prior_steps * _guided(s.prior_guidance_scale)
        if prior
        else 0,
        "inversion": inverted * latent,
        "decoder": images * decoder,
        "upsamplers": images * s.upsampler_steps * upsamplers,
    }
    return {k: v for k, v in cost.items() if v}


def check_cost(cost: dict[str, int], fields: list[str], budget: int) -> None:
    """Raise a 422 ``RequestError`` naming ``fields`` when the total cost passes ``budget``."""
    total = sum(cost.values())
    if total <= budget:
        return
    parts = ", ".join(f"{k} {v}" for k, v in cost.items())
    raise RequestError(
        ", ".join(fields),
        f"this request needs {total} network evaluations ({parts}), over the budget of "
        f"{budget} per request (limits.max_request_cost); ask for fewer images, candidates "
        "or steps",
    )
