"""Stage models: they learn (overfit), save/load bit-identically, and compose in a bundle."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.tiny import make_tiny_bundle, save_tiny_clip, tiny_configs
from unclip.checkpoint import (
    CheckpointError,
    load_stage,
    load_train_state,
    make_bundle,
    save_stage,
)
from unclip.conditioning import TextCond
from unclip.config import (
    ConfigError,
    DecoderConfig,
    DiffusionConfig,
    OptimConfig,
    PriorConfig,
    PriorNetConfig,
    UNetConfig,
    UpsamplerConfig,
    from_dict,
    merge,
    stage_config_from_dict,
    to_dict,
)
from unclip.models import build_model
from unclip.pipeline import UnclipPipeline


def train(model: torch.nn.Module, loss_fn, steps: int, lr: float) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    for _ in range(steps):
        loss = loss_fn()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    return loss.item()


def test_prior_overfits_a_handful_of_pairs() -> None:
    torch.manual_seed(0)
    D, n = 32, 6
    text = F.normalize(torch.randn(n, D), dim=-1)
    image = F.normalize(torch.randn(n, D), dim=-1)  # unrelated: must be memorised
    cfg = PriorConfig(
        net=PriorNetConfig(embed_dim=D, width=128, layers=2, heads=4), text_drop_prob=0.0
    )
    prior = build_model(cfg)
    batch = 64
    idx = torch.arange(batch) % n

    train(prior, lambda: prior(image[idx], TextCond(text[idx])), steps=700, lr=1e-3)
    out = prior.sample(
        TextCond(text), steps=32, candidates=2, eta=0.0, generator=torch.Generator().manual_seed(0)
    )
    cos = (out * image).sum(-1)
    assert cos.min().item() > 0.99, cos


def test_decoder_overfits_one_image() -> None:
    torch.manual_seed(0)
    S = 16
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, S), torch.linspace(-1, 1, S), indexing="ij")
    disc = ((xx - 0.2) ** 2 + (yy + 0.1) ** 2 < 0.3).float()
    image = torch.stack([disc * 1.6 - 0.8, -0.6 * torch.ones(S, S), 0.8 - disc * 1.6])[None]
    emb = F.normalize(torch.randn(1, 16), dim=-1)
    cfg = DecoderConfig(
        net=UNetConfig(
            image_size=S,
            base_channels=32,
            channel_mult=(1, 2),
            attention_resolutions=(8,),
            clip_dim=16,
        ),
        diffusion=DiffusionConfig(prediction="v", timesteps=1000),
        clip_drop_prob=0.0,
        text_drop_prob=0.0,
    )
    dec = build_model(cfg)
    B = 16
    train(dec, lambda: dec(image.expand(B, -1, -1, -1), emb.expand(B, -1)), steps=400, lr=2e-3)
    out = dec.sample(
        emb.expand(4, -1), steps=25, guidance_scale=1.0, generator=torch.Generator().manual_seed(0)
    )
    mse = (out - image).pow(2).mean().item()
    assert mse < 0.01, mse


@pytest.mark.parametrize("stage", ["prior", "decoder", "upsampler"])
def test_checkpoint_roundtrip_is_bit_identical(tmp_path, stage: str) -> None:
    clip = save_tiny_clip(str(tmp_path / "clip"))
    cfg = {c.stage: c for c in tiny_configs(clip)}[stage]
    torch.manual_seed(1)
    model = build_model(cfg).eval()
    for p in model.parameters():  # zero-initialised output layers would hide bugs
        p.data.add_(0.01 * torch.randn_like(p))
    save_stage(
        str(tmp_path / "ck"),
        cfg,
        model.state_dict(),
        train_state={"step": 7, "optimizer": {"lr": torch.tensor(0.1)}},
    )
    loaded = load_stage(str(tmp_path / "ck"))
    assert loaded.config == cfg
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    if stage == "prior":
        text = TextCond(F.normalize(torch.randn(2, 32), dim=-1))
        a, b = model.sample(text, generator=g()), loaded.sample(text, generator=g())
    elif stage == "decoder":
        emb = F.normalize(torch.randn(2, 32), dim=-1)
        a, b = model.sample(emb, generator=g()), loaded.sample(emb, generator=g())
    else:
        low = torch.rand(2, 3, 16, 16) * 2 - 1
        a, b = model.sample(low, generator=g()), loaded.sample(low, generator=g())
    assert torch.equal(a, b)
    state = load_train_state(str(tmp_path / "ck"))
    assert state["step"] == 7 and torch.equal(state["optimizer"]["lr"], torch.tensor(0.1))


def test_train_state_refuses_pickled_code(tmp_path) -> None:
    clip = save_tiny_clip(str(tmp_path / "clip"))
    cfg = tiny_configs(clip)[0]
    save_stage(str(tmp_path / "ck"), cfg, build_model(cfg).state_dict())

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, tmp_path / "ck" / "train_state.pt")
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        load_train_state(str(tmp_path / "ck"))


def test_config_roundtrip_and_strict_errors() -> None:
    cfg = PriorConfig(net=PriorNetConfig(width=64, heads=2), optim=OptimConfig(lr=1e-4))
    assert stage_config_from_dict(to_dict(cfg)) == cfg
    assert merge(cfg, {"net": {"layers": 3}}).net.layers == 3
    with pytest.raises(ConfigError, match="unknown key.*widht.*known keys"):
        from_dict(PriorConfig, {"net": {"widht": 3}})
    with pytest.raises(ConfigError, match="net.layers: expected an integer"):
        from_dict(PriorConfig, {"net": {"layers": "six"}})
    with pytest.raises(ConfigError, match="valid choices: eps, x0, v"):
        from_dict(DecoderConfig, {"diffusion": {"prediction": "score"}})
    with pytest.raises(ConfigError, match="valid stages"):
        stage_config_from_dict({"stage": "vae"})
    with pytest.raises(ConfigError, match="divisible"):
        UNetConfig(base_channels=20, groups=8)


def test_bundle_pipeline_is_deterministic_and_checks_compatibility(tmp_path) -> None:
    uri = make_tiny_bundle(str(tmp_path))
    pipe = UnclipPipeline.from_bundle(uri)
    a = pipe.generate("a small red circle", num_images=3, seed=5)
    b = pipe.generate("a small red circle", num_images=3, seed=5)
    c = pipe.generate("a small red circle", num_images=3, seed=6)
    assert a.images.shape == (3, 32, 32, 3) and a.images.dtype == np.uint8
    assert np.array_equal(a.images, b.images)
    assert not np.array_equal(a.images, c.images)
    # image j does not depend on how many images were asked for (batch independence)
    one = pipe.generate("a small red circle", num_images=1, seed=5)
    assert np.abs(one.images[0].astype(int) - a.images[0].astype(int)).max() <= 1
    assert set(a.timings) == {"text_encoder", "prior", "decoder", "upsampler1"}
    assert a.warnings == []
    # a prompt beyond the CLIP context (16 tokens here) still generates, and says so
    long = pipe.generate("a small red circle " * 8, num_images=1, seed=5)
    assert long.images.shape == (1, 32, 32, 3)
    assert len(long.warnings) == 1 and "CLIP context of 16 tokens" in long.warnings[0]
    from PIL import Image

    from unclip.manipulations import variations

    var = variations(pipe, Image.fromarray(a.images[0]), 2, seed=1)
    assert var.images.shape == (2, 32, 32, 3)

    # a prior trained for another CLIP is refused with a clear message
    other = save_tiny_clip(str(tmp_path / "other_clip"), seed=9)
    with pytest.raises(CheckpointError, match="trained with CLIP"):
        make_bundle(
            str(tmp_path / "b2"),
            other.identity.model,
            f"{tmp_path}/prior_ckpt",
            f"{tmp_path}/decoder_ckpt",
        )
    with pytest.raises(CheckpointError, match="not a bundle"):
        UnclipPipeline.from_bundle(str(tmp_path / "nothing"))


def test_whitened_conditioning_equalises_the_embedding_directions() -> None:
    """``clip_whiten``: after fitting on training embeddings, the high-variance directions
    reach the network at unit scale and low-variance ones are amplified, not zeroed."""
    torch.manual_seed(0)
    D = 16
    scales = torch.tensor([3.0, 1.0, 0.3] + [0.01] * (D - 3))
    emb = F.normalize(torch.randn(4000, D) * scales + 5 * F.one_hot(torch.tensor(0), D), dim=-1)
    net = build_model(
        DecoderConfig(net=UNetConfig(image_size=8, channel_mult=(1,), clip_dim=D, clip_whiten=True))
    ).net
    net.fit_whitening(emb)
    z = (emb - net.clip_mean) @ net.clip_whitening
    cov = torch.cov(z.T)
    evals = torch.linalg.eigvalsh(cov)
    assert torch.allclose(z.mean(0), torch.zeros(D), atol=1e-4)
    assert (evals[-3:] > 0.9).all()  # the informative directions: about unit variance
    assert evals.min() > 0.01 and evals.max() < 1.01  # nearly empty ones floored, not inf
    # the whitening is part of the model's state: saved and restored with the weights
    assert {"clip_mean", "clip_whitening"} <= set(net.state_dict())


def test_upsampler_clamps_the_image_it_makes_not_the_residual() -> None:
    """A residual upsampler's x0 is image - bicubic(low_res): its valid range is
    [-1 - cond, 1 - cond], so sampling clamps cond + x0 to [-1, 1], not x0."""
    cfg = UpsamplerConfig(
        net=UNetConfig(
            image_size=16,
            base_channels=16,
            channel_mult=(1, 2),
            attention_resolutions=(),
            low_res_channels=3,
        ),
        low_res_size=8,
        diffusion=DiffusionConfig(prediction="x0"),
        sample_steps=3,
    )
    up = build_model(cfg)
    with torch.no_grad():  # zero output weights: the network predicts the residual x0 = bias
        up.net.out[-1].bias.fill_(1.8)
    dark = torch.full((1, 3, 8, 8), -0.9)
    # -0.9 + 1.8 = 0.9 is a valid image and is kept (a clamped residual would give 0.1)
    torch.testing.assert_close(up.sample(dark), torch.full((1, 3, 16, 16), 0.9), atol=1e-4, rtol=0)
    # 0.9 + 1.8 leaves the range: the image is clamped at 1
    bright = torch.full((1, 3, 8, 8), 0.9)
    torch.testing.assert_close(up.sample(bright), torch.ones(1, 3, 16, 16), atol=1e-4, rtol=0)


def test_best_of_n_keeps_the_candidate_most_aligned_with_the_text(tmp_path) -> None:
    """The prior draws ``candidates`` embeddings and keeps the one with the highest dot
    product with the caption's text embedding (the paper's sampling trick)."""
    clip = save_tiny_clip(str(tmp_path / "clip"))
    prior_cfg, _, _ = tiny_configs(clip, text_states=False)
    torch.manual_seed(0)
    prior = build_model(prior_cfg)
    text = F.normalize(torch.randn(1, prior_cfg.net.embed_dim), dim=-1)
    # per-row generators: the 4 candidates of one caption are 4 draws from its generator,
    # the same draws as 4 one-candidate rows sharing a generator seeded alike
    picked = prior.sample(
        TextCond(text), steps=4, candidates=4, eta=0.0, generator=[torch.Generator().manual_seed(3)]
    )
    shared = torch.Generator().manual_seed(3)
    each = prior.sample(
        TextCond(text.repeat(4, 1)), steps=4, candidates=1, eta=0.0, generator=[shared] * 4
    )
    dots = (each @ text.T).squeeze(1)
    assert dots.max() - dots.min() > 1e-3  # the candidates differ
    torch.testing.assert_close(picked, each[dots.argmax()][None])


def test_conditioning_noise_changes_training_only_not_sampling() -> None:
    """``DecoderConfig.clip_noise`` perturbs the conditioning the decoder trains on; sampling
    with the same weights gives the same images with it on or off, and a negative value is
    refused with the field's name."""
    torch.manual_seed(0)
    net = UNetConfig(image_size=8, channel_mult=(1,), clip_dim=16, clip_whiten=True)
    plain_cfg = DecoderConfig(net=net, clip_drop_prob=0.0, text_drop_prob=0.0)
    plain = build_model(plain_cfg)
    noisy = build_model(replace(plain_cfg, clip_noise=0.5))
    for p in plain.parameters():  # out of its zero init: the conditioning reaches the output
        p.data.normal_(0, 0.2)
    noisy.load_state_dict(plain.state_dict())
    emb = F.normalize(torch.randn(4, 16), dim=-1)
    images = torch.rand(4, 3, 8, 8) * 2 - 1

    def sample(model: torch.nn.Module) -> torch.Tensor:
        return model.sample(emb, steps=3, generator=torch.Generator().manual_seed(1))

    assert torch.equal(sample(plain), sample(noisy))

    seen: list[torch.Tensor] = []  # what the UNet's conditioning projection receives
    for model in (plain, noisy):
        hook = model.net.clip_to_emb.register_forward_hook(lambda m, i, o: seen.append(i[0]))
        model(images, emb)
        hook.remove()
    assert not torch.allclose(seen[0], seen[1], atol=1e-3)
    with pytest.raises(ConfigError, match="clip_noise"):
        replace(plain_cfg, clip_noise=-0.1)
