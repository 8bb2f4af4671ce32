"""The autoregressive prior: PCA codebook, top-half dot sampling, and it learns."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from unclip.ar_prior import ARPrior, _keep_top_mass
from unclip.conditioning import TextCond
from unclip.config import ARPriorConfig, ARPriorNetConfig
from unclip.models import build_model


def low_rank_embeddings(n: int, d: int = 32, rank: int = 6, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(rank, d, generator=g)
    return F.normalize(torch.randn(n, rank, generator=g) @ basis + 0.3, dim=-1)


def test_pca_codebook_roundtrip() -> None:
    z = low_rank_embeddings(2000)
    prior = build_model(ARPriorConfig(net=ARPriorNetConfig(embed_dim=32, pca_dims=8, bins=256)))
    assert isinstance(prior, ARPrior)
    explained = prior.fit(z, z)
    assert explained > 0.99  # rank-6 data, 8 components kept
    back = prior.decode(prior.encode(z))
    assert (back * z).sum(-1).min().item() > 0.99
    # the 256 buckets are used: quantisation spreads over the range, not into a few bins
    codes = prior.encode(z)
    assert len(torch.unique(codes)) > 128


def test_keep_top_mass_keeps_the_highest_buckets() -> None:
    p = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.1, 0.1, 0.1, 0.7], [0.7, 0.1, 0.1, 0.1]])
    out = _keep_top_mass(p, 0.5)
    # row 0: bucket 3 (0.4) plus the boundary bucket 2 reach half the mass; row 1: bucket 3
    # alone holds it; row 2: the top three hold only 0.3, so the boundary bucket 0 joins
    assert torch.equal(out[0] > 0, torch.tensor([False, False, True, True]))
    assert torch.equal(out[1] > 0, torch.tensor([False, False, False, True]))
    assert torch.equal(out[2] > 0, torch.tensor([True, True, True, True]))
    torch.testing.assert_close(out.sum(-1), torch.ones(3))


def test_ar_prior_learns_text_to_image_mapping() -> None:
    torch.manual_seed(0)
    n, D = 6, 32
    image = low_rank_embeddings(n, D, seed=1)
    text = F.normalize(torch.randn(n, D), dim=-1)
    cfg = ARPriorConfig(
        net=ARPriorNetConfig(embed_dim=D, pca_dims=6, bins=32, width=96, layers=2, heads=4),
        text_drop_prob=0.0,
    )
    prior = build_model(cfg)
    prior.fit(low_rank_embeddings(500, D, seed=1), F.normalize(torch.randn(500, D), dim=-1))
    opt = torch.optim.AdamW(prior.parameters(), lr=2e-3)
    idx = torch.arange(48) % n
    for _ in range(300):
        loss = prior(image[idx], TextCond(text[idx]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    prior.eval()
    out = prior.sample(
        TextCond(text),
        temperature=0.05,
        generator=[torch.Generator().manual_seed(i) for i in range(n)],
    )
    target = prior.decode(prior.encode(image))  # best achievable after quantisation
    assert (out * target).sum(-1).min().item() > 0.98


def test_ar_prior_checkpoint_keeps_the_codebook(tmp_path) -> None:
    from unclip.checkpoint import load_stage, save_stage

    cfg = ARPriorConfig(
        net=ARPriorNetConfig(embed_dim=32, pca_dims=4, bins=16, width=32, layers=1, heads=2)
    )
    prior = build_model(cfg)
    z = low_rank_embeddings(200)
    prior.fit(z, z)
    save_stage(str(tmp_path / "ar"), cfg, prior.state_dict())
    loaded = load_stage(str(tmp_path / "ar"))
    assert bool(loaded.fitted) and torch.equal(loaded.pca_components, prior.pca_components)
    text = TextCond(z[:3])
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    assert torch.equal(prior.eval().sample(text, generator=g()), loaded.sample(text, generator=g()))
