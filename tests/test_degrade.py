"""The upsamplers' train-time corruptions (unclip.degrade)."""

from __future__ import annotations

import pytest
import torch

from unclip.config import ConfigError
from unclip.degrade import bsr_degrade, degrade, gaussian_blur


def _images(n: int = 4, size: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


def test_blur_keeps_constants_and_means() -> None:
    flat = torch.full((2, 3, 8, 8), 0.3)
    assert torch.allclose(gaussian_blur(flat, 0.6), flat, atol=1e-6)
    x = _images()
    out = gaussian_blur(x, 0.6)
    # reflect padding: the mean moves only by edge effects; the energy must drop
    assert torch.allclose(out.mean(dim=(2, 3)), x.mean(dim=(2, 3)), atol=0.05)
    assert out.var() < 0.8 * x.var()


def test_blur_is_identity_at_tiny_sigma_and_per_image() -> None:
    x = _images()
    assert torch.allclose(gaussian_blur(x, 1e-4), x, atol=1e-5)
    sigmas = torch.tensor([1e-4, 0.6, 1e-4, 1.5])
    out = gaussian_blur(x, sigmas)
    for i, s in enumerate(sigmas.tolist()):
        assert torch.allclose(out[i], gaussian_blur(x[i : i + 1], s)[0], atol=1e-6)
    assert torch.allclose(out[0], x[0], atol=1e-5)
    assert not torch.allclose(out[1], x[1], atol=1e-2)


def test_random_blur_spans_sharp_to_fixed_sigma() -> None:
    x = _images(n=256, size=8)
    fixed = degrade(x, "blur", 0.6, 3)
    rand = degrade(x, "blur", 0.6, 3, torch.Generator().manual_seed(1), blur_random=True)
    # per image: the change from the input lies between none and the fixed blur's
    change = (rand - x).pow(2).mean(dim=(1, 2, 3))
    full = (fixed - x).pow(2).mean(dim=(1, 2, 3))
    assert torch.all(change <= full + 1e-6)
    assert (change < 0.1 * full).float().mean() > 0.05  # some inputs stay (almost) sharp
    assert (change > 0.5 * full).float().mean() > 0.1  # others blurred almost like fixed 0.6
    again = degrade(x, "blur", 0.6, 3, torch.Generator().manual_seed(1), blur_random=True)
    assert torch.equal(rand, again)  # the generator decides


def test_bsr_and_none_and_unknown() -> None:
    x = _images(n=3, size=16)
    assert degrade(x, "none") is x
    out = bsr_degrade(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.min() >= -1 and out.max() <= 1
    assert not torch.allclose(out, x, atol=1e-2)
    with pytest.raises(ConfigError, match="blur"):
        degrade(x, "gauss")
