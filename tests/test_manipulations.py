"""Manipulations with the bipartite latent: slerp, the inversion round trip through the
manipulations' own decode path, z_i as the ETL computes it, interpolation, text diffs."""

from __future__ import annotations

import io
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from pipelines.decode import decode_image
from tests.tiny import make_invertible_bundle, make_tiny_bundle
from unclip import manipulations
from unclip.images import uint8_to_tensor
from unclip.manipulations import slerp
from unclip.pipeline import UnclipPipeline, from_pil, to_uint8


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / max(mse, 1e-12)))


def shape_image(fill: tuple[int, int, int], box: tuple[int, int, int, int]) -> Image.Image:
    """A saturated 64 px image like the shapes data (pixels at the ends of the range)."""
    img = Image.new("RGB", (64, 64), (255, 255, 255))
    ImageDraw.Draw(img).ellipse(box, fill=fill)
    return img


@pytest.fixture(scope="module")
def invertible(tmp_path_factory: pytest.TempPathFactory) -> UnclipPipeline:
    return UnclipPipeline.from_bundle(make_invertible_bundle(str(tmp_path_factory.mktemp("inv"))))


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


def test_eta0_manipulations_give_the_image_back_with_an_overshooting_decoder(
    invertible: UnclipPipeline,
) -> None:
    """Inversion and decoding agree on clamping: with a decoder whose x0 leaves [-1, 1],
    the eta-0 variation, both ends of an interpolation and theta 0 of a text diff are the
    input images (at the decoder's size; this bundle has no upsampler)."""
    pipe = invertible
    a = shape_image((255, 0, 0), (8, 8, 40, 40))
    b = shape_image((0, 0, 255), (24, 20, 60, 56))
    size = pipe.decoder.config.net.image_size
    want_a, want_b = (to_uint8(from_pil(x, size))[0] for x in (a, b))

    var = manipulations.variations(pipe, a, num_images=1, eta=0.0, seed=3)
    assert psnr(var.images[0], want_a) >= 40, psnr(var.images[0], want_a)
    lerp = manipulations.interpolate(pipe, a, b, frames=3, seed=3)
    assert psnr(lerp.images[0], want_a) >= 40 and psnr(lerp.images[-1], want_b) >= 40
    diff = manipulations.text_diff(pipe, a, "a blue circle", frames=2, seed=3)
    assert psnr(diff.images[0], want_a) >= 40
    # and the manipulation moved something: the middle frame is neither end
    assert psnr(lerp.images[1], want_a) < 40 and psnr(lerp.images[1], want_b) < 40


def test_z_i_is_the_etl_embedding_of_the_original_image(tmp_path) -> None:
    """z_i comes from the full image at CLIP's size prepared as the ETL prepares it (not
    from the decoder-size copy): the same embedding as the table row of that image."""
    pipe = UnclipPipeline.from_bundle(make_tiny_bundle(str(tmp_path)))
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    etl = decode_image(buf.getvalue(), pipe.clip.identity.image_size)
    want = pipe.clip.encode_images(uint8_to_tensor(etl.pixels))
    out = manipulations.variations(pipe, img, num_images=2, eta=0.5, seed=1)
    torch.testing.assert_close(out.image_embeddings, want.repeat(2, 1), atol=1e-5, rtol=0)
    text = manipulations.text_diff(pipe, img, "a large blue square", frames=3)
    torch.testing.assert_close(text.image_embeddings[0:1], want, atol=1e-5, rtol=0)
    # the text diff moves z_i away from the image's own embedding, frame by frame
    cos = (text.image_embeddings @ want.T).squeeze(1)
    assert cos[0] > cos[1] > cos[2]
    assert text.images.shape == (3, 32, 32, 3)


def test_variations_at_eta_above_zero_differ_per_seed_and_repeat_per_seed(
    invertible: UnclipPipeline,
) -> None:
    a = shape_image((0, 160, 0), (8, 8, 56, 56))
    one = manipulations.variations(invertible, a, num_images=2, eta=1.0, seed=5)
    again = manipulations.variations(invertible, a, num_images=2, eta=1.0, seed=5)
    assert np.array_equal(one.images, again.images)
    assert not np.array_equal(one.images[0], one.images[1])


def test_the_bipartite_latent_follows_the_latent_settings_not_the_generation_ones(
    invertible: UnclipPipeline,
) -> None:
    """Manipulations invert and decode at ``latent_steps`` / ``latent_guidance_scale``:
    changing the text-to-image settings (decoder steps, guidance) leaves their pixels as
    they were; changing the latent steps does not."""
    pipe = invertible
    a = shape_image((255, 0, 0), (8, 8, 40, 40))
    base = pipe.settings
    assert (base.latent_steps, base.latent_guidance_scale) == (6, 1.0)
    pipe.settings = replace(base, decoder_steps=2, decoder_guidance_scale=5.0)
    try:
        moved = manipulations.variations(pipe, a, num_images=2, eta=0.5, seed=7)
        pipe.settings = base
        want = manipulations.variations(pipe, a, num_images=2, eta=0.5, seed=7)
        pipe.settings = replace(base, latent_steps=3)
        fewer = manipulations.variations(pipe, a, num_images=2, eta=0.5, seed=7)
    finally:
        pipe.settings = base
    assert np.array_equal(moved.images, want.images)
    assert not np.array_equal(fewer.images, want.images)
