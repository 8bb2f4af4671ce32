"""Manipulations with the bipartite latent: slerp, inversion round trip, interpolation, text diffs."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from tests.tiny import make_tiny_bundle
from unclip.manipulations import bipartite_latent, interpolate, slerp, text_diff
from unclip.pipeline import UnclipPipeline, to_uint8


def test_slerp_endpoints_angles_and_norms() -> None:
    torch.manual_seed(0)
    a, b = torch.randn(3, 8), torch.randn(3, 8)
    torch.testing.assert_close(slerp(a, b, 0.0), a)
    torch.testing.assert_close(slerp(a, b, 1.0), b)
    ua, ub = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    mid = F.normalize(slerp(ua, ub, 0.5), dim=-1)
    # the midpoint is at equal angles from both ends, half the total angle
    total = torch.arccos((ua * ub).sum(-1))
    torch.testing.assert_close(torch.arccos((mid * ua).sum(-1)), total / 2)
    torch.testing.assert_close(torch.arccos((mid * ub).sum(-1)), total / 2)
    # unit vectors stay unit vectors; parallel rows fall back to lerp without NaNs
    assert torch.allclose(slerp(ua, ub, 0.3).norm(dim=-1), torch.ones(3))
    assert torch.isfinite(slerp(ua, ua, 0.5)).all()
    # per-row t
    out = slerp(ua, ub, torch.tensor([0.0, 0.5, 1.0]))
    torch.testing.assert_close(out[0], ua[0])
    torch.testing.assert_close(out[2], ub[2])
    assert math.isclose(float(total[0]), float(torch.arccos((ua[0] * ub[0]).sum())))


def test_inversion_reconstructs_image_and_manipulations_run(tmp_path) -> None:
    pipe = UnclipPipeline.from_bundle(make_tiny_bundle(str(tmp_path)))
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    x, z, x_T = bipartite_latent(pipe, img)
    back = pipe.decoder.sample(
        z,
        noise=x_T,
        eta=0.0,
        steps=pipe.settings.decoder_steps,
        guidance_scale=pipe.settings.decoder_guidance_scale,
        clip_denoised=False,
    )
    # even an untrained decoder's DDIM ODE inverts: (z_i, x_T) -> the image again
    assert (back - x).abs().max().item() < 0.05
    assert np.abs(to_uint8(back).astype(int) - to_uint8(x).astype(int)).mean() < 2

    img_b = Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    out = interpolate(pipe, img, img_b, frames=3)
    assert out.images.shape == (3, 32, 32, 3)
    diff = text_diff(pipe, img, "a large blue square", frames=3, max_strength=0.5)
    assert diff.images.shape == (3, 32, 32, 3)
    # theta = 0 keeps the image's own embedding
    torch.testing.assert_close(diff.image_embeddings[0:1], z.cpu(), atol=1e-5, rtol=0)
