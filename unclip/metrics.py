"""Evaluation metrics on CLIP embeddings (pure torch, float64 where it matters)."""

from __future__ import annotations

import torch
from torch import Tensor


def frechet_distance(a: Tensor, b: Tensor) -> float:
    """Fréchet distance between Gaussian fits of two sets of embeddings (N, D) and (M, D).

    ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^{1/2}), the FID formula on CLIP
    embeddings. Tr((S_a S_b)^{1/2}) is computed stably as the sum of square roots of the
    eigenvalues of S_b^{1/2} S_a S_b^{1/2} (symmetric PSD).
    """
    assert a.dim() == b.dim() == 2 and a.shape[1] == b.shape[1], (a.shape, b.shape)
    return _GaussianFit(b).distance(a)


class _GaussianFit:
    """Mean, covariance and covariance square root of one set, fitted once: the distance of
    many other sets to it (the jackknife below) costs one eigendecomposition each."""

    def __init__(self, x: Tensor) -> None:
        x = x.double()
        self.mu, self.cov = x.mean(0), torch.cov(x.T)
        w, v = torch.linalg.eigh(self.cov)
        self.sqrt = (v * w.clamp(min=0).sqrt()) @ v.T

    def distance(self, a: Tensor) -> float:
        a = a.double()
        mu_a, s_a = a.mean(0), torch.cov(a.T)
        m = self.sqrt @ s_a @ self.sqrt
        tr_sqrt = torch.linalg.eigvalsh((m + m.T) / 2).clamp(min=0).sqrt().sum()
        return float((mu_a - self.mu).pow(2).sum() + s_a.trace() + self.cov.trace() - 2 * tr_sqrt)


def frechet_interval(
    a: Tensor, b: Tensor, level: float = 0.9, groups: int = 40
) -> tuple[float, float]:
    """Delete-a-group jackknife interval of ``frechet_distance(a, b)`` over the rows of ``a``
    (the generated set, usually the small one), at ``level`` (normal approximation).

    FD from a few dozen samples in 128 dimensions is noisy; the interval says which
    differences between methods a small evaluation can resolve. (A percentile bootstrap does
    not work here: resampling with replacement duplicates rows, which shrinks the sample
    covariance and shifts every resampled FD upwards, often past the estimate itself.)
    """
    real = _GaussianFit(b)
    n = a.shape[0]
    g = max(2, min(groups, n))
    parts = torch.arange(n) % g
    theta = torch.tensor([real.distance(a[parts != j]) for j in range(g)], dtype=torch.float64)
    se = float(((g - 1) / g * (theta - theta.mean()).pow(2).sum()).sqrt())
    z = float(torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(0.5 + level / 2)))
    fd = real.distance(a)
    return max(0.0, fd - z * se), fd + z * se


def clip_score(image_emb: Tensor, text_emb: Tensor) -> Tensor:
    """Per-row cosine similarity of (N, D) image and text embeddings."""
    return torch.nn.functional.cosine_similarity(image_emb.float(), text_emb.float(), dim=-1)


def retrieval_top1(
    image_emb: Tensor, text_emb: Tensor, k: int = 10, generator: torch.Generator | None = None
) -> float:
    """Caption retrieval: fraction of images whose own caption scores highest among itself
    and ``k - 1`` other captions drawn at random from the set (chance = 1 / k)."""
    n = image_emb.shape[0]
    assert text_emb.shape[0] == n and n >= k >= 2
    hits = 0
    for i in range(n):
        others = torch.randperm(n - 1, generator=generator)[: k - 1]
        others = others + (others >= i).long()  # skip i itself
        cands = torch.cat([text_emb[i : i + 1], text_emb[others]])
        hits += int((cands @ image_emb[i]).argmax().item() == 0)
    return hits / n
