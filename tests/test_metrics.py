"""Evaluation metrics against closed forms."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from unclip.metrics import clip_score, frechet_distance, frechet_interval, retrieval_top1


def test_frechet_distance_closed_forms() -> None:
    torch.manual_seed(0)
    n, d = 50_000, 4
    a = torch.randn(n, d, dtype=torch.float64)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    # shifted mean: ||shift||^2
    assert frechet_distance(a, a + 2.0) == pytest.approx(4 * d, rel=1e-6)
    # diagonal covariances sigma^2 vs tau^2: sum (sigma - tau)^2
    b = torch.randn(n, d, dtype=torch.float64) * 3.0
    assert frechet_distance(a, b) == pytest.approx(d * (3.0 - 1.0) ** 2, rel=0.03)
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-9)


def test_frechet_interval_covers_the_truth_and_shrinks_with_n() -> None:
    torch.manual_seed(0)
    d = 4
    real = torch.randn(20_000, d, dtype=torch.float64)
    truth = 4.0 * d  # a shifted by 2 in every dimension
    widths = []
    for n in (60, 600):
        gen = torch.randn(n, d, dtype=torch.float64) + 2.0
        lo, hi = frechet_interval(gen, real)
        assert lo <= frechet_distance(gen, real) <= hi
        assert lo <= truth <= hi
        widths.append(hi - lo)
    assert widths[1] < 0.5 * widths[0]  # ~1/sqrt(n): 10x the samples, ~3x narrower
    assert frechet_interval(gen, real) == frechet_interval(gen, real)  # no randomness


def test_clip_score_and_retrieval() -> None:
    torch.manual_seed(1)
    t = F.normalize(torch.randn(40, 16), dim=-1)
    assert torch.allclose(clip_score(t, t), torch.ones(40))
    assert retrieval_top1(t, t, k=10) == 1.0
    noise = F.normalize(torch.randn(40, 16), dim=-1)
    chance = retrieval_top1(noise, t, k=10, generator=torch.Generator().manual_seed(0))
    assert chance < 0.35
