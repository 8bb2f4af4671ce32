"""The Gaussian diffusion process shared by the prior, the decoder and the upsamplers.

One class, no weights (after openai/improved-diffusion ``gaussian_diffusion.py``): schedule
constants in float64, ``q_sample``, the posterior, training losses for eps / x0 / v
prediction, DDPM and DDIM sampling, DDIM inversion, and classifier-free guidance. The
network is passed in as ``model_fn(x_t, t) -> output``; ``t`` is always in the network's own
(training) timestep units, also when sampling on a respaced schedule (``respace``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from unclip.config import (
    LOSS_WEIGHTINGS,
    PREDICTIONS,
    SCHEDULES,
    VARIANCES,
    DiffusionConfig,
    check_choice,
)

ModelFn = Callable[[Tensor, Tensor], Tensor]  # (x_t (B, ...), t (B,) long) -> output (B, ...)
DenoisedFn = Callable[[Tensor], Tensor]  # post-processing of the predicted x0
Progress = Callable[[int, int], None]  # (steps done, total)


def make_betas(schedule: str, timesteps: int) -> np.ndarray:
    """Beta schedule in float64: ``linear`` (DDPM, scaled to ``timesteps``) or ``cosine``."""
    check_choice("schedule", schedule, SCHEDULES)
    if schedule == "linear":
        scale = 1000.0 / timesteps
        return np.linspace(scale * 1e-4, scale * 0.02, timesteps, dtype=np.float64)
    s = 0.008
    steps = np.arange(timesteps + 1, dtype=np.float64) / timesteps
    alpha_bar = np.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    betas = 1.0 - alpha_bar[1:] / alpha_bar[:-1]
    return np.clip(betas, 0.0, 0.999)


def space_timesteps(num_timesteps: int, count: int) -> list[int]:
    """``count`` evenly strided timesteps out of ``num_timesteps``, always keeping 0 and T-1."""
    if not 1 <= count <= num_timesteps:
        raise ValueError(f"steps must be in [1, {num_timesteps}], got {count}")
    if count == 1:
        return [num_timesteps - 1]
    kept = np.round(np.linspace(0, num_timesteps - 1, count)).astype(int)
    return sorted(set(kept.tolist()))


def _extract(arr: Tensor, t: Tensor, x: Tensor) -> Tensor:
    """Gather float64 constants at ``t`` (B,) and broadcast to ``x``'s shape and dtype."""
    out = arr.to(t.device)[t].to(x.dtype)
    return out.reshape(t.shape[0], *([1] * (x.dim() - 1)))


Generators = torch.Generator | Sequence[torch.Generator] | None


def randn(
    shape: Sequence[int],
    generator: Generators,
    like: Tensor | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Standard normal noise. A list of generators draws row i from generator i, so a
    request's samples do not depend on what else shares its batch (Serve batching)."""
    if like is not None:
        device, dtype = like.device, like.dtype
    if isinstance(generator, Sequence):
        assert len(generator) == shape[0], f"{len(generator)} generators for batch {shape[0]}"
        rows = [randn((1, *shape[1:]), g, device=device, dtype=dtype) for g in generator]
        return torch.cat(rows)
    gen_device = generator.device if generator is not None else device
    noise = torch.randn(tuple(shape), generator=generator, device=gen_device, dtype=dtype)
    return noise.to(device)


class GaussianDiffusion:
    """A diffusion process over ``num_timesteps`` steps (possibly respaced).

    Args:
        betas: float64 noise schedule of this process, shape (T,).
        prediction: what the network outputs: ``eps`` (noise), ``x0`` (clean data) or ``v``.
        variance: reverse-process variance, ``fixed_small`` (posterior) or ``fixed_large`` (beta).
        loss_weighting: ``none`` (plain MSE on the prediction) or ``min_snr`` (Hang et al. 2023).
        timestep_map: for a respaced process, the original timestep of each step (fed to the net).
        alphas_cumprod: exact cumulative products (respacing), instead of cumprod(1 - betas).
    """

    def __init__(
        self,
        betas: np.ndarray,
        prediction: str = "eps",
        variance: str = "fixed_small",
        loss_weighting: str = "none",
        min_snr_gamma: float = 5.0,
        clip_denoised: bool = True,
        timestep_map: Sequence[int] | None = None,
        alphas_cumprod: np.ndarray | None = None,
    ) -> None:
        self.prediction = check_choice("prediction", prediction, PREDICTIONS)
        self.variance = check_choice("variance", variance, VARIANCES)
        self.loss_weighting = check_choice("loss_weighting", loss_weighting, LOSS_WEIGHTINGS)
        self.min_snr_gamma = float(min_snr_gamma)
        self.clip_denoised = clip_denoised
        betas = np.asarray(betas, dtype=np.float64)
        assert betas.ndim == 1 and (betas > 0).all() and (betas <= 1).all()
        if alphas_cumprod is not None:  # exact values (respacing), not a cumprod of 1 - beta
            ac = np.asarray(alphas_cumprod, dtype=np.float64)
            assert ac.shape == betas.shape
        self.num_timesteps = len(betas)
        self.timestep_map = torch.tensor(
            list(timestep_map) if timestep_map is not None else range(self.num_timesteps),
            dtype=torch.long,
        )

        alphas = 1.0 - betas
        if alphas_cumprod is None:
            ac = np.cumprod(alphas)
        ac_prev = np.append(1.0, ac[:-1])
        post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
        c = lambda a: torch.from_numpy(np.asarray(a, dtype=np.float64))  # noqa: E731
        self.betas = c(betas)
        self.alphas_cumprod = c(ac)
        self.alphas_cumprod_prev = c(ac_prev)
        self.sqrt_alphas_cumprod = c(np.sqrt(ac))
        self.sqrt_one_minus_alphas_cumprod = c(np.sqrt(1.0 - ac))
        self.sqrt_recip_alphas_cumprod = c(np.sqrt(1.0 / ac))
        self.sqrt_recipm1_alphas_cumprod = c(np.sqrt(1.0 / ac - 1.0))
        self.posterior_variance = c(post_var)
        # log of the posterior variance, with the t=0 entry (0) replaced by t=1's
        clipped = np.append(post_var[1], post_var[1:]) if len(betas) > 1 else betas
        self.posterior_log_variance_clipped = c(np.log(clipped))
        self.posterior_mean_coef1 = c(betas * np.sqrt(ac_prev) / (1.0 - ac))
        self.posterior_mean_coef2 = c((1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac))
        self.snr = c(ac / (1.0 - ac))

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, cfg: DiffusionConfig) -> GaussianDiffusion:
        return cls(
            make_betas(cfg.schedule, cfg.timesteps),
            prediction=cfg.prediction,
            variance=cfg.variance,
            loss_weighting=cfg.loss_weighting,
            min_snr_gamma=cfg.min_snr_gamma,
            clip_denoised=cfg.clip_denoised,
        )

    def respace(self, steps: int | Sequence[int]) -> GaussianDiffusion:
        """A process over a subset of this one's timesteps (fast sampling; same network).

        ``steps`` is a count (evenly strided) or an explicit sorted list of kept timesteps.
        The new betas make the kept steps' ``alphas_cumprod`` equal the original ones.
        """
        kept = space_timesteps(self.num_timesteps, steps) if isinstance(steps, int) else list(steps)
        ac = self.alphas_cumprod.numpy()
        new_betas, last = [], 1.0
        for k in kept:
            new_betas.append(1.0 - ac[k] / last)
            last = ac[k]
        return GaussianDiffusion(
            np.array(new_betas),
            prediction=self.prediction,
            variance=self.variance,
            loss_weighting=self.loss_weighting,
            min_snr_gamma=self.min_snr_gamma,
            clip_denoised=self.clip_denoised,
            timestep_map=self.timestep_map[kept].tolist(),
            alphas_cumprod=ac[kept],
        )

    def _model(self, model_fn: ModelFn, x: Tensor, t: Tensor) -> Tensor:
        return model_fn(x, self.timestep_map.to(t.device)[t])

    # ------------------------------------------------------------------ forward process
    def q_mean_variance(self, x0: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and variance of q(x_t | x_0)."""
        return _extract(self.sqrt_alphas_cumprod, t, x0) * x0, _extract(
            1.0 - self.alphas_cumprod, t, x0
        ).expand_as(x0)

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor | None = None) -> Tensor:
        """Sample x_t ~ q(x_t | x_0) = N(sqrt(ab_t) x_0, (1 - ab_t) I)."""
        if noise is None:
            noise = torch.randn_like(x0)
        return (
            _extract(self.sqrt_alphas_cumprod, t, x0) * x0
            + _extract(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise
        )

    def q_posterior_mean_variance(
        self, x0: Tensor, x_t: Tensor, t: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        mean = (
            _extract(self.posterior_mean_coef1, t, x_t) * x0
            + _extract(self.posterior_mean_coef2, t, x_t) * x_t
        )
        return (
            mean,
            _extract(self.posterior_variance, t, x_t),
            _extract(self.posterior_log_variance_clipped, t, x_t),
        )

    # ------------------------------------------------------------------ parameterisations
    def predict_x0_from_eps(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        return (
            _extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t
            - _extract(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps
        )

    def predict_eps_from_x0(self, x_t: Tensor, t: Tensor, x0: Tensor) -> Tensor:
        return (_extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - x0) / _extract(
            self.sqrt_recipm1_alphas_cumprod, t, x_t
        )

    def v_target(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """v = sqrt(ab) eps - sqrt(1 - ab) x0 (Salimans & Ho 2022)."""
        return (
            _extract(self.sqrt_alphas_cumprod, t, x0) * noise
            - _extract(self.sqrt_one_minus_alphas_cumprod, t, x0) * x0
        )

    def x0_from_output(self, out: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """The network's output, whatever it predicts, as a prediction of x_0."""
        if self.prediction == "x0":
            return out
        if self.prediction == "eps":
            return self.predict_x0_from_eps(x_t, t, out)
        return (
            _extract(self.sqrt_alphas_cumprod, t, x_t) * x_t
            - _extract(self.sqrt_one_minus_alphas_cumprod, t, x_t) * out
        )

    def predictions(
        self,
        model_fn: ModelFn,
        x_t: Tensor,
        t: Tensor,
        denoised_fn: DenoisedFn | None = None,
        clip_denoised: bool | None = None,
    ) -> tuple[Tensor, Tensor]:
        """(x0, eps) predicted at (x_t, t), x0 clamped / post-processed and eps made consistent.

        ``clip_denoised`` overrides the process default (clamping x0 to [-1, 1]).
        """
        clip = self.clip_denoised if clip_denoised is None else clip_denoised
        out = self._model(model_fn, x_t, t)
        assert out.shape == x_t.shape, f"model output {tuple(out.shape)} != x {tuple(x_t.shape)}"
        x0 = self.x0_from_output(out, x_t, t)
        if denoised_fn is not None:
            x0 = denoised_fn(x0)
        if clip:
            x0 = x0.clamp(-1.0, 1.0)
        if self.prediction == "eps" and denoised_fn is None and not clip:
            return x0, out
        return x0, self.predict_eps_from_x0(x_t, t, x0)

    # ------------------------------------------------------------------ training
    def training_losses(
        self,
        model_fn: ModelFn,
        x0: Tensor,
        t: Tensor,
        noise: Tensor | None = None,
    ) -> Tensor:
        """Per-example loss (B,): weighted MSE between the output and its target."""
        if noise is None:  # drawn in logical order: the same noise whatever x0's memory format
            noise = torch.randn(x0.shape, dtype=x0.dtype, device=x0.device)
        x_t = self.q_sample(x0, t, noise)
        out = self._model(model_fn, x_t, t)
        assert out.shape == x0.shape, f"model output {tuple(out.shape)} != x0 {tuple(x0.shape)}"
        target = {"eps": noise, "x0": x0, "v": None}[self.prediction]
        if target is None:
            target = self.v_target(x0, t, noise)
        mse = (out.float() - target.float()).pow(2).flatten(1).mean(dim=1)
        return mse * self.loss_weights(t).to(mse.dtype)

    def loss_weights(self, t: Tensor) -> Tensor:
        """Per-timestep loss weights (B,) for the configured weighting and prediction."""
        if self.loss_weighting == "none":
            return torch.ones(t.shape, dtype=torch.float64, device=t.device)
        snr = self.snr.to(t.device)[t]
        clipped = snr.clamp(max=self.min_snr_gamma)
        # min-SNR-gamma expressed for each parameterisation (equal weights in x0 space)
        return {"x0": clipped, "eps": clipped / snr, "v": clipped / (snr + 1.0)}[self.prediction]

    def sample_timesteps(
        self,
        batch: int,
        device: torch.device | str = "cpu",
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Training timesteps (B,), uniform over the schedule."""
        return torch.randint(0, self.num_timesteps, (batch,), generator=generator).to(device)

    # ------------------------------------------------------------------ DDPM
    def p_mean_variance(
        self, model_fn: ModelFn, x_t: Tensor, t: Tensor, denoised_fn: DenoisedFn | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, log-variance and predicted x0 of p(x_{t-1} | x_t)."""
        x0, _ = self.predictions(model_fn, x_t, t, denoised_fn)
        mean, _, _ = self.q_posterior_mean_variance(x0, x_t, t)
        if self.variance == "fixed_small":
            log_var = _extract(self.posterior_log_variance_clipped, t, x_t)
        else:
            large = torch.cat([self.posterior_variance[1:2], self.betas[1:]])
            log_var = _extract(torch.log(large), t, x_t)
        return mean, log_var, x0

    @torch.no_grad()
    def p_sample_loop(
        self,
        model_fn: ModelFn,
        shape: Sequence[int],
        noise: Tensor | None = None,
        generator: Generators = None,
        device: torch.device | str = "cpu",
        denoised_fn: DenoisedFn | None = None,
        progress: Progress | None = None,
    ) -> Tensor:
        """Ancestral (DDPM) sampling from x_T ~ N(0, I) down to x_0."""
        x = noise if noise is not None else randn(shape, generator, device=device)
        B = x.shape[0]
        for n, i in enumerate(reversed(range(self.num_timesteps))):
            t = torch.full((B,), i, dtype=torch.long, device=x.device)
            mean, log_var, _ = self.p_mean_variance(model_fn, x, t, denoised_fn)
            if i > 0:
                x = mean + torch.exp(0.5 * log_var) * randn(x.shape, generator, like=x)
            else:
                x = mean
            if progress:
                progress(n + 1, self.num_timesteps)
        return x

    # ------------------------------------------------------------------ DDIM
    def ddim_step(
        self,
        model_fn: ModelFn,
        x_t: Tensor,
        t: Tensor,
        eta: float = 0.0,
        generator: Generators = None,
        denoised_fn: DenoisedFn | None = None,
        clip_denoised: bool | None = None,
    ) -> tuple[Tensor, Tensor]:
        """One DDIM update x_t → x_{t-1} (Song et al. 2021, eq. 12). Returns (x_prev, x0)."""
        x0, eps = self.predictions(model_fn, x_t, t, denoised_fn, clip_denoised)
        ab = _extract(self.alphas_cumprod, t, x_t)
        ab_prev = _extract(self.alphas_cumprod_prev, t, x_t)
        sigma = eta * torch.sqrt((1 - ab_prev) / (1 - ab)) * torch.sqrt(1 - ab / ab_prev)
        mean = x0 * torch.sqrt(ab_prev) + torch.sqrt((1 - ab_prev - sigma**2).clamp(min=0)) * eps
        if eta > 0:
            nonzero = (t > 0).to(x_t.dtype).reshape(-1, *([1] * (x_t.dim() - 1)))
            mean = mean + nonzero * sigma * randn(x_t.shape, generator, like=x_t)
        return mean, x0

    @torch.no_grad()
    def ddim_sample_loop(
        self,
        model_fn: ModelFn,
        shape: Sequence[int],
        eta: float = 0.0,
        noise: Tensor | None = None,
        generator: Generators = None,
        device: torch.device | str = "cpu",
        denoised_fn: DenoisedFn | None = None,
        progress: Progress | None = None,
        clip_denoised: bool | None = None,
    ) -> Tensor:
        """DDIM sampling; ``eta=0`` is deterministic given x_T, ``eta=1`` is DDPM-like."""
        x = noise if noise is not None else randn(shape, generator, device=device)
        B = x.shape[0]
        for n, i in enumerate(reversed(range(self.num_timesteps))):
            t = torch.full((B,), i, dtype=torch.long, device=x.device)
            x, _ = self.ddim_step(model_fn, x, t, eta, generator, denoised_fn, clip_denoised)
            if progress:
                progress(n + 1, self.num_timesteps)
        return x

    @torch.no_grad()
    def ddim_invert(
        self,
        model_fn: ModelFn,
        x0: Tensor,
        denoised_fn: DenoisedFn | None = None,
        fixed_point_iters: int = 0,
        progress: Progress | None = None,
        clip_denoised: bool = False,
    ) -> Tensor:
        """DDIM inversion (eta = 0): data x_0 -> latent x_T that DDIM sampling maps back.

        Runs the deterministic DDIM ODE forwards in time (variations, interpolation and text
        diffs, the unCLIP paper, section 3). Sample back with the same ``clip_denoised`` (x0 clamped
        to [-1, 1] or not) for a faithful round trip. The plain update evaluates the network
        one step behind (at x_{i-1} instead of x_i): with large strides (few steps) that alone
        loses most of the reconstruction. Each of the ``fixed_point_iters`` refinements runs
        the sampling step from the current x_i and moves x_i by the miss, divided by the
        step's gain with the network output held fixed (``_step_gain``): a Newton step that
        ignores only the network's own Jacobian, exact in one iteration for a network whose
        output does not depend on x, and converging quickly for a smooth one.
        """
        x = x0
        B = x.shape[0]
        for i in range(self.num_timesteps):
            t = torch.full((B,), i, dtype=torch.long, device=x.device)
            ab_prev = _extract(self.alphas_cumprod_prev, t, x)
            ab = _extract(self.alphas_cumprod, t, x)
            # split x into (x0, eps) at its own level (step i-1), re-noise to step i
            _, eps = self.predictions(model_fn, x, t, denoised_fn, clip_denoised)
            clean = (x - torch.sqrt(1 - ab_prev) * eps) / torch.sqrt(ab_prev)
            x_next = clean * torch.sqrt(ab) + torch.sqrt(1 - ab) * eps
            gain = self._step_gain(ab, ab_prev)
            # (x0 prediction's first step has gain 0: x_0 is the output alone, nothing to solve)
            for _ in range(fixed_point_iters if float(gain.min()) > 1e-6 else 0):
                back, _ = self.ddim_step(model_fn, x_next, t, 0.0, None, denoised_fn, clip_denoised)
                x_next = x_next + (x - back) / gain
            x = x_next
            if progress:
                progress(i + 1, self.num_timesteps)
        return x

    def _step_gain(self, ab: Tensor, ab_prev: Tensor) -> Tensor:
        """d x_{t-1} / d x_t of a DDIM step (eta 0) with the network output held fixed."""
        if self.prediction == "eps":  # x0 = (x - sqrt(1-ab) eps) / sqrt(ab)
            return torch.sqrt(ab_prev / ab)
        if self.prediction == "x0":  # eps = (x - sqrt(ab) x0) / sqrt(1-ab)
            return torch.sqrt((1 - ab_prev) / (1 - ab))
        # v: x0 = sqrt(ab) x - sqrt(1-ab) v, eps = sqrt(1-ab) x + sqrt(ab) v
        return torch.sqrt(ab_prev * ab) + torch.sqrt((1 - ab_prev) * (1 - ab))


# ---------------------------------------------------------------------- guidance
def guidance(cond: Tensor, uncond: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance: uncond + scale * (cond - uncond) (Ho & Salimans 2021).

    Linear in the output, so it is the same rule for eps, x0 and v predictions.
    """
    return uncond + scale * (cond - uncond)


def cfg_model_fn(
    net: Callable[..., Tensor],
    scale: float,
    cond: dict[str, Tensor | None],
    drop_keys: Sequence[str],
) -> ModelFn:
    """Wrap ``net(x, t, **cond, **drops)`` into a guided ``model_fn``.

    For ``scale != 1`` the conditional and unconditional passes run as one batch of 2B; the
    unconditional half sets every mask in ``drop_keys`` (B,) bool to True (learned nulls).
    """

    def fn(x: Tensor, t: Tensor) -> Tensor:
        B = x.shape[0]
        keep = torch.zeros(B, dtype=torch.bool, device=x.device)
        if scale == 1.0:
            return net(x, t, **cond, **{k: keep for k in drop_keys})
        both = {k: None if v is None else torch.cat([v, v]) for k, v in cond.items()}
        drop = torch.cat([keep, torch.ones_like(keep)])
        out = net(torch.cat([x, x]), torch.cat([t, t]), **both, **{k: drop for k in drop_keys})
        c, u = out.chunk(2)
        return guidance(c, u, scale)

    return fn
