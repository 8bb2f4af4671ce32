"""The diffusion process, checked against closed forms.

For Gaussian data x0 ~ N(mu, s^2 I) the optimal denoiser is known exactly:
    x_t = a x0 + b eps,  a = sqrt(ab_t), b = sqrt(1 - ab_t)
    E[x0 | x_t] = mu + a s^2 / (a^2 s^2 + b^2) * (x_t - a mu)
so sampling with it must reproduce the data distribution, and losses have closed forms.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from unclip.config import ConfigError, DiffusionConfig
from unclip.diffusion import (
    GaussianDiffusion,
    cfg_model_fn,
    guidance,
    make_betas,
    space_timesteps,
)

MU, S = 0.3, 0.2


def gaussian_denoiser(base: GaussianDiffusion, prediction: str, mu: float = MU, s: float = S):
    """The exact model output for Gaussian data, for the given parameterisation.

    ``t`` arrives in the base process's timesteps (as the network would see it).
    """

    def fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ab = base.alphas_cumprod[t].reshape(-1, *([1] * (x_t.dim() - 1))).to(x_t.dtype)
        a, b = ab.sqrt(), (1 - ab).sqrt()
        x0 = mu + a * s**2 / (a**2 * s**2 + b**2) * (x_t - a * mu)
        eps = (x_t - a * x0) / b
        return {"x0": x0, "eps": eps, "v": a * eps - b * x0}[prediction]

    return fn


def make(prediction: str = "eps", schedule: str = "cosine", timesteps: int = 1000, **kw):
    return GaussianDiffusion(
        make_betas(schedule, timesteps), prediction=prediction, clip_denoised=False, **kw
    )


def test_constants_are_float64_and_schedules_sane() -> None:
    for schedule in ("cosine", "linear"):
        d = make(schedule=schedule)
        assert d.alphas_cumprod.dtype == torch.float64
        ac = d.alphas_cumprod.numpy()
        assert np.all(np.diff(ac) < 0) and ac[0] > 0.99 and ac[-1] < 0.01
        # q(x_{t-1} | x_t, x_0) by conditioning the joint Gaussian of (x_{t-1}, x_t) given x_0:
        # x_t = sqrt(alpha_t) x_{t-1} + sqrt(beta_t) e, Var(x_{t-1} | x0) = 1 - ab_prev
        alpha = 1 - d.betas.numpy()
        ab_prev = np.append(1.0, ac[:-1])
        var_prev, var_t = 1 - ab_prev, 1 - ac
        cov = np.sqrt(alpha) * var_prev
        np.testing.assert_allclose(
            d.posterior_variance.numpy()[1:], (var_prev - cov**2 / var_t)[1:], rtol=1e-9
        )
        # the mean's x_t coefficient: Cov / Var(x_t)
        np.testing.assert_allclose(
            d.posterior_mean_coef2.numpy(), cov / var_t, rtol=1e-9, atol=1e-12
        )
    # the closed forms of the schedules: cosine alpha_bar(t) = f(t) / f(0) (Nichol & Dhariwal
    # 2021) up to the 0.999 beta clip at the end; DDPM's linear schedule ends at ~4.04e-5
    T, s = 1000, 0.008
    f = lambda t: np.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    cos_ac = make(schedule="cosine").alphas_cumprod.numpy()
    steps = np.arange(1, T + 1)
    np.testing.assert_allclose(cos_ac[:990], (f(steps) / f(0))[:990], rtol=1e-9)
    lin = make(schedule="linear")
    np.testing.assert_allclose(lin.betas.numpy()[[0, -1]], [1e-4, 0.02])
    assert math.isclose(float(lin.alphas_cumprod[-1]), 4.036e-5, rel_tol=1e-3)


def test_q_sample_matches_closed_form_marginal() -> None:
    d = make()
    torch.manual_seed(0)
    n = 200_000
    for step in (0, 100, 500, 900, 999):
        x0 = torch.full((n,), 0.7, dtype=torch.float64)
        t = torch.full((n,), step, dtype=torch.long)
        xt = d.q_sample(x0, t)
        ab = d.alphas_cumprod[step].item()
        mean, var = math.sqrt(ab) * 0.7, 1 - ab
        # 5 standard errors of the sample mean / variance
        assert abs(xt.mean().item() - mean) < 5 * math.sqrt(var / n) + 1e-12
        assert abs(xt.var().item() - var) < 5 * var * math.sqrt(2 / n) + 1e-12
        m, v = d.q_mean_variance(x0[:1], t[:1])
        assert m.item() == pytest.approx(mean) and v.item() == pytest.approx(var)


def test_posterior_mean_is_consistent_with_bayes() -> None:
    """q(x_{t-1}|x_t, x0) mean: coef1 x0 + coef2 x_t, checked against the direct formula."""
    d = make(schedule="linear")
    t = torch.tensor([1, 10, 500, 999])
    x0, xt = torch.randn(4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    mean, var, _ = d.q_posterior_mean_variance(x0, xt, t)
    for i, ti in enumerate(t.tolist()):
        beta, ab, ab_prev = d.betas[ti], d.alphas_cumprod[ti], d.alphas_cumprod_prev[ti]
        alpha = 1 - beta
        expect = (ab_prev.sqrt() * beta * x0[i] + alpha.sqrt() * (1 - ab_prev) * xt[i]) / (1 - ab)
        assert mean[i].item() == pytest.approx(expect.item(), rel=1e-9)
        assert var[i].item() == pytest.approx((beta * (1 - ab_prev) / (1 - ab)).item(), rel=1e-9)


def test_respaced_alphas_cumprod_equal_original_at_kept_steps() -> None:
    base = make()
    for count in (1, 10, 50, 64, 250, 1000):
        kept = space_timesteps(1000, count)
        r = base.respace(count)
        assert r.num_timesteps == len(kept) and kept[-1] == 999
        np.testing.assert_allclose(
            r.alphas_cumprod.numpy(), base.alphas_cumprod.numpy()[kept], rtol=1e-12
        )
        assert r.timestep_map.tolist() == kept


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_sampling_with_exact_denoiser_reproduces_gaussian_data(prediction: str, sampler: str):
    base = make(prediction)
    fn = gaussian_denoiser(base, prediction)
    g = torch.Generator().manual_seed(1)
    n = 20_000
    if sampler == "ddpm":
        x = base.p_sample_loop(fn, (n, 1), generator=g)
    else:
        x = base.respace(100).ddim_sample_loop(fn, (n, 1), generator=g)
    assert abs(x.mean().item() - MU) < 0.01
    assert x.std().item() == pytest.approx(S, rel=0.04)


def test_respaced_ddpm_and_ddim_eta1_reproduce_data() -> None:
    base = make("eps")
    fn = gaussian_denoiser(base, "eps")
    for sample in (
        lambda r, g: r.p_sample_loop(fn, (20_000, 1), generator=g),
        lambda r, g: r.ddim_sample_loop(fn, (20_000, 1), eta=1.0, generator=g),
    ):
        x = sample(base.respace(250), torch.Generator().manual_seed(2))
        assert abs(x.mean().item() - MU) < 0.01
        assert x.std().item() == pytest.approx(S, rel=0.06)


def test_point_mass_data_is_reproduced_exactly() -> None:
    base = make("eps")
    fn = gaussian_denoiser(base, "eps", mu=-0.4, s=0.0)
    x = base.respace(20).ddim_sample_loop(fn, (64, 3), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(x, torch.full_like(x, -0.4), atol=1e-5)


def test_ddim_inversion_roundtrip_and_latent_is_standard_normal() -> None:
    base = make("eps")
    fn = gaussian_denoiser(base, "eps")
    d = base.respace(200)
    torch.manual_seed(3)
    x0 = MU + S * torch.randn(5_000, 4, dtype=torch.float64)
    xT = d.ddim_invert(fn, x0)
    # the exact denoiser's ODE maps the data distribution to N(0, I)
    assert abs(xT.mean().item()) < 0.02 and xT.std().item() == pytest.approx(1.0, rel=0.03)
    back = d.ddim_sample_loop(fn, x0.shape, eta=0.0, noise=xT)
    # the plain (one-step-lagged) inversion is first-order accurate ...
    assert (back - x0).abs().max().item() < 0.03
    assert (back - x0).abs().mean().item() < 0.01
    # ... and solving the implicit step by fixed-point iterations makes it near-exact (the
    # last cosine step, alpha_bar ~ 2e-9, contracts slowly, so the error plateaus ~5e-4)
    xT_exact = d.ddim_invert(fn, x0, fixed_point_iters=4)
    back = d.ddim_sample_loop(fn, x0.shape, eta=0.0, noise=xT_exact)
    assert (back - x0).abs().max().item() < 1e-3


def test_training_loss_equals_closed_form_posterior_variance() -> None:
    """With the exact denoiser, the eps-loss at t is Var[eps | x_t] = a^2 s^2 / (a^2 s^2 + b^2)."""
    torch.manual_seed(4)
    for prediction in ("eps", "x0", "v"):
        d = make(prediction)
        fn = gaussian_denoiser(d, prediction)
        for step in (50, 500, 950):
            n = 100_000
            x0 = MU + S * torch.randn(n, 1, dtype=torch.float64)
            t = torch.full((n,), step)
            loss = d.training_losses(fn, x0, t).mean().item()
            ab = d.alphas_cumprod[step].item()
            a2, b2 = ab, 1 - ab
            var_x0 = S**2 * b2 / (a2 * S**2 + b2)  # Var[x0 | x_t]
            expect = {"x0": var_x0, "eps": var_x0 * a2 / b2, "v": var_x0 / b2}[prediction]
            assert loss == pytest.approx(expect, rel=0.03), (prediction, step)


def test_min_snr_weighting_is_the_same_objective_in_every_parameterisation() -> None:
    torch.manual_seed(5)
    x0 = torch.randn(256, 8, dtype=torch.float64)
    noise = torch.randn_like(x0)
    t = torch.randint(0, 1000, (256,))
    losses = {}
    for prediction in ("eps", "x0", "v"):
        d = make(prediction, loss_weighting="min_snr", min_snr_gamma=5.0)

        # a deliberately imperfect model: the exact x0 estimate, shrunk by 10%
        def fn(x_t, ts, d=d, prediction=prediction):
            ab = d.alphas_cumprod[ts].reshape(-1, 1)
            a, b = ab.sqrt(), (1 - ab).sqrt()
            x0_hat = 0.9 * gaussian_denoiser(d, "x0", mu=0.0, s=1.0)(x_t, ts)
            eps_hat = (x_t - a * x0_hat) / b
            return {"x0": x0_hat, "eps": eps_hat, "v": a * eps_hat - b * x0_hat}[prediction]

        losses[prediction] = d.training_losses(fn, x0, t, noise)
    torch.testing.assert_close(losses["eps"], losses["x0"])
    torch.testing.assert_close(losses["v"], losses["x0"])
    snr = make().snr[t]
    # eps-prediction under min-SNR: the plain eps loss where SNR <= 5 (high noise), less
    # weight only where the signal dominates
    w_eps = make("eps", loss_weighting="min_snr").loss_weights(t)
    assert torch.all(w_eps[snr <= 5.0] == 1.0) and torch.all(w_eps[snr > 5.0] < 1.0)
    torch.testing.assert_close(
        make("eps", loss_weighting="min_snr").loss_weights(t), snr.clamp(max=5.0) / snr
    )


def test_classifier_free_guidance_combination_and_batched_wrapper() -> None:
    c, u = torch.randn(4, 3), torch.randn(4, 3)
    torch.testing.assert_close(guidance(c, u, 1.0), c)
    torch.testing.assert_close(guidance(c, u, 0.0), u)

    def net(x, t, cond, drop):  # conditional: x + cond; unconditional: x
        return x + torch.where(drop[:, None], torch.zeros_like(cond), cond)

    x, t, cond = torch.randn(5, 2), torch.zeros(5, dtype=torch.long), torch.randn(5, 2)
    fn = cfg_model_fn(net, 4.0, {"cond": cond}, drop_keys=("drop",))
    torch.testing.assert_close(fn(x, t), x + 4.0 * cond)
    fn1 = cfg_model_fn(net, 1.0, {"cond": cond}, drop_keys=("drop",))
    torch.testing.assert_close(fn1(x, t), x + cond)


def test_per_row_generators_make_samples_independent_of_batch() -> None:
    base = make("eps")
    fn = gaussian_denoiser(base, "eps")
    r = base.respace(10)
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    alone = r.ddim_sample_loop(fn, (1, 4), eta=1.0, generator=gens([7]))
    batched = r.ddim_sample_loop(fn, (3, 4), eta=1.0, generator=gens([1, 7, 2]))
    torch.testing.assert_close(batched[1:2], alone)


def test_unknown_names_raise_with_valid_choices() -> None:
    with pytest.raises(ConfigError, match="valid choices: cosine, linear"):
        make_betas("sigmoid", 10)
    with pytest.raises(ConfigError, match="valid choices: eps, x0, v"):
        GaussianDiffusion(make_betas("linear", 10), prediction="score")
    with pytest.raises(ConfigError, match="fixed_small, fixed_large"):
        DiffusionConfig(variance="learned")
    with pytest.raises(ConfigError, match="none, min_snr"):
        DiffusionConfig(loss_weighting="p2")
