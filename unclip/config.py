"""Frozen dataclass configs for every stage, with strict JSON round-tripping.

A stage config is saved as ``config.json`` beside every checkpoint and is sufficient to
rebuild the model with no flags (docs/architecture.md, "Conventions"). Unknown keys and wrong types raise a
``ConfigError`` that names the field and what was expected.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, get_args, get_origin

Schedule = Literal["cosine", "linear"]
Prediction = Literal["eps", "x0", "v"]
Variance = Literal["fixed_small", "fixed_large"]
LossWeighting = Literal["none", "min_snr"]
Degradation = Literal["none", "blur", "bsr"]

SCHEDULES: tuple[str, ...] = get_args(Schedule)
PREDICTIONS: tuple[str, ...] = get_args(Prediction)
VARIANCES: tuple[str, ...] = get_args(Variance)
LOSS_WEIGHTINGS: tuple[str, ...] = get_args(LossWeighting)
DEGRADATIONS: tuple[str, ...] = get_args(Degradation)


class ConfigError(ValueError):
    """A config value is wrong; the message says which field and what is allowed."""


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> str:
    """Raise ``ConfigError`` unless ``value`` is one of ``choices`` (docs/architecture.md, "Conventions")."""
    if value not in choices:
        raise ConfigError(f"unknown {name} {value!r}; valid choices: {', '.join(choices)}")
    return value


@dataclass(frozen=True)
class DiffusionConfig:
    """The Gaussian diffusion process of one stage (no weights)."""

    timesteps: int = 1000
    schedule: Schedule = "cosine"
    prediction: Prediction = "eps"
    variance: Variance = "fixed_small"  # of the reverse process: DDPM sampling only (DDIM: eta)
    loss_weighting: LossWeighting = "none"
    min_snr_gamma: float = 5.0
    clip_denoised: bool = True  # clamp predicted x0 to [-1, 1] while sampling (images)

    def __post_init__(self) -> None:
        check_choice("schedule", self.schedule, SCHEDULES)
        check_choice("prediction", self.prediction, PREDICTIONS)
        check_choice("variance", self.variance, VARIANCES)
        check_choice("loss_weighting", self.loss_weighting, LOSS_WEIGHTINGS)
        if self.timesteps < 2:
            raise ConfigError(f"timesteps must be >= 2, got {self.timesteps}")


@dataclass(frozen=True)
class PriorNetConfig:
    """Decoder-only causal Transformer prior (docs/method.md, "Diffusion prior")."""

    embed_dim: int = 128  # CLIP embedding size D
    text_width: int = 0  # width of CLIP per-token text states; 0 = no encoded-text tokens
    max_text_len: int = 32  # how many encoded text tokens the prior reads at most
    width: int = 256
    layers: int = 6
    heads: int = 4
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    # not read: the timestep MLP embeds any t and the diffusion's own config sets T; kept
    # because configs are loaded strictly and every saved prior checkpoint records it
    num_timesteps: int = 1000

    def __post_init__(self) -> None:
        if self.width % self.heads:
            raise ConfigError(f"width {self.width} must be divisible by heads {self.heads}")


@dataclass(frozen=True)
class UNetConfig:
    """ADM/GLIDE-style UNet used by the decoder and (with ``low_res_channels``) upsamplers."""

    image_size: int = 32
    in_channels: int = 3
    out_channels: int = 3
    base_channels: int = 32
    channel_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 1
    attention_resolutions: tuple[int, ...] = (8,)  # feature-map sizes with self-attention
    head_channels: int = 32
    dropout: float = 0.0
    clip_dim: int = 0  # CLIP image-embedding size; 0 = unconditional (upsamplers)
    clip_tokens: int = 4  # extra context tokens projected from the CLIP embedding
    text_width: int = 0  # width of CLIP per-token text states; 0 = no text conditioning
    max_text_len: int = 32
    low_res_channels: int = 0  # > 0: upsampler, concatenates the upsampled low-res image
    groups: int = 8  # GroupNorm groups
    clip_whiten: bool = False  # condition on the CLIP embedding whitened with the training
    # embeddings' mean and covariance (fitted before step 1): attributes that move the
    # embedding little (shape) reach the projections at the scale of those that move it a
    # lot (colour, position)
    clip_whiten_floor: float = 1e-2  # whitening floors the eigenvalues at this fraction
    # of the largest: directions below it (CLIP's noise) stay small instead of being blown
    # up to the scale of the content
    clip_spatial: bool = False  # also project the CLIP embedding into a feature map at the
    # lowest resolution (added before the middle blocks): a per-position response to the
    # embedding, so it can say what to draw where, not only which channels to scale

    def __post_init__(self) -> None:
        for ch in (self.base_channels * m for m in self.channel_mult):
            if ch % self.groups:
                raise ConfigError(f"channels {ch} not divisible by groups {self.groups}")
        down = 2 ** (len(self.channel_mult) - 1)
        if self.image_size % down:
            raise ConfigError(
                f"image_size {self.image_size} must be divisible by {down} "
                "(one halving per extra channel_mult level)"
            )


@dataclass(frozen=True)
class ClipRef:
    """Which CLIP a stage was trained against (must match the Parquet metadata)."""

    model: str = ""  # open_clip name, or URI of a CLIP checkpoint from `unclip train clip`
    pretrained: str = ""
    embed_dim: int = 0
    fingerprint: str = ""  # content id of the weights (ClipIdentity.fingerprint)
    text_width: int = 0
    context_length: int = 0


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 100
    lr_schedule: Literal["constant", "cosine"] = "constant"
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    ema_warmup: bool = True  # use min(decay, (1+n)/(10+n)) early on


@dataclass(frozen=True)
class PriorConfig:
    """Everything the diffusion-prior stage needs, saved with every checkpoint."""

    stage: Literal["prior"] = "prior"
    net: PriorNetConfig = field(default_factory=PriorNetConfig)
    diffusion: DiffusionConfig = field(
        default_factory=lambda: DiffusionConfig(prediction="x0", clip_denoised=False)
    )
    clip: ClipRef = field(default_factory=ClipRef)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-4, weight_decay=1e-2))
    text_drop_prob: float = 0.1  # classifier-free guidance dropout of the text conditioning
    image_embed_scale: float = 0.0  # 0 = sqrt(embed_dim) (unit-variance components)
    sample_steps: int = 64
    sample_eta: float = 1.0  # DDIM eta of prior sampling (1 ~ ancestral, keeps candidates diverse)
    guidance_scale: float = 1.0
    candidates: int = 2  # best-of-N by dot product with the text embedding


@dataclass(frozen=True)
class ARPriorNetConfig:
    """Autoregressive prior (docs/method.md, "Autoregressive prior"): PCA-reduced, quantised image embeddings
    predicted token by token by a causal Transformer conditioned on the text."""

    embed_dim: int = 128
    pca_dims: int = 64  # principal components kept (paper: 319 of 1024)
    bins: int = 256  # quantisation buckets per component (paper: 1024)
    text_width: int = 0
    max_text_len: int = 32
    width: int = 256
    layers: int = 6
    heads: int = 4
    mlp_ratio: float = 4.0
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.width % self.heads:
            raise ConfigError(f"width {self.width} must be divisible by heads {self.heads}")
        if not 1 <= self.pca_dims <= self.embed_dim:
            raise ConfigError(f"pca_dims must be in [1, {self.embed_dim}], got {self.pca_dims}")


@dataclass(frozen=True)
class ARPriorConfig:
    stage: Literal["ar_prior"] = "ar_prior"
    net: ARPriorNetConfig = field(default_factory=ARPriorNetConfig)
    clip: ClipRef = field(default_factory=ClipRef)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-4, weight_decay=1e-2))
    text_drop_prob: float = 0.1
    temperature: float = 1.0
    guidance_scale: float = 1.0
    dot_top_fraction: float = 0.5  # sample the z_i . z_t token from the top half (paper)


@dataclass(frozen=True)
class DecoderConfig:
    """The 64 px (here: base-resolution) decoder stage."""

    stage: Literal["decoder"] = "decoder"
    net: UNetConfig = field(default_factory=lambda: UNetConfig(clip_dim=128))
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    clip: ClipRef = field(default_factory=ClipRef)
    optim: OptimConfig = field(default_factory=OptimConfig)
    clip_drop_prob: float = 0.1
    text_drop_prob: float = 0.5
    # conditioning augmentation: during training, Gaussian noise of std ~ U(0, clip_noise)
    # per example is added to the CLIP embedding in the UNet's (whitened) coordinates, so the
    # decoder also reads embeddings a little off the training set's, as the prior's are
    clip_noise: float = 0.0
    sample_steps: int = 50
    sample_eta: float = 0.0
    guidance_scale: float = 3.0
    # steps of the bipartite latent (inversion and its decoding; SamplingSettings.latent_steps)
    latent_steps: int = 200

    def __post_init__(self) -> None:
        if self.clip_noise < 0:
            raise ConfigError(f"decoder clip_noise must be >= 0, got {self.clip_noise}")


@dataclass(frozen=True)
class UpsamplerConfig:
    """A diffusion upsampler: low-res image (bicubic-upsampled) → high-res image."""

    stage: Literal["upsampler"] = "upsampler"
    net: UNetConfig = field(
        default_factory=lambda: UNetConfig(
            image_size=64, low_res_channels=3, attention_resolutions=()
        )
    )
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    low_res_size: int = 32
    degradation: Degradation = "blur"
    blur_sigma: float = 0.6
    blur_kernel: int = 3
    blur_random: bool = False  # sigma ~ U(0, blur_sigma) per image instead of fixed
    crop_size: int = 0  # train on random crops of this size (0 = whole image)
    residual: bool = True  # diffuse image - bicubic(low_res) instead of the image
    optim: OptimConfig = field(default_factory=OptimConfig)
    sample_steps: int = 27
    sample_eta: float = 0.0

    def __post_init__(self) -> None:
        check_choice("degradation", self.degradation, DEGRADATIONS)
        if self.net.low_res_channels <= 0:
            raise ConfigError("upsampler net.low_res_channels must be > 0")


@dataclass(frozen=True)
class SamplingSettings:
    """Generation settings: a bundle's defaults, overridable per request."""

    prior_steps: int = 64
    prior_guidance_scale: float = 1.0
    prior_eta: float = 1.0
    candidates: int = 2
    decoder_steps: int = 50
    decoder_guidance_scale: float = 3.0
    decoder_eta: float = 0.0
    upsampler_steps: int = 27
    # The bipartite latent of the manipulations (variations, interpolations, text diffs):
    # DDIM inversion and the decoding of inverted latents run at these, whatever the
    # generation settings above. Guidance 1 (no classifier-free guidance) and ~200 steps
    # keep the deterministic ODE close enough to itself that eta 0 gives the image back;
    # with guidance 3 or 25 steps reconstructions lose colour or background
    # (docs/benchmarks.md, "Reconstruction by DDIM inversion").
    latent_steps: int = 200
    latent_guidance_scale: float = 1.0


StageConfig = PriorConfig | ARPriorConfig | DecoderConfig | UpsamplerConfig
STAGE_CONFIGS: dict[str, type] = {
    "prior": PriorConfig,
    "ar_prior": ARPriorConfig,
    "decoder": DecoderConfig,
    "upsampler": UpsamplerConfig,
}

T = TypeVar("T")


def to_dict(cfg: Any) -> dict[str, Any]:
    """Dataclass → JSON-ready dict (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def from_dict(cls: type[T], data: dict[str, Any], path: str = "") -> T:
    """Build dataclass ``cls`` from ``data``, checking keys and types strictly.

    Missing keys take their defaults; unknown keys raise ``ConfigError`` listing the known ones.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{path or cls.__name__}: expected an object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{path or cls.__name__}: unknown key(s) {', '.join(unknown)}; "
            f"known keys: {', '.join(fields)}"
        )
    kwargs = {
        name: _convert(hints[name], value, f"{path}.{name}" if path else name)
        for name, value in data.items()
    }
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{path or cls.__name__}: {e}") from None


def _convert(tp: Any, value: Any, path: str) -> Any:
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(
                f"{path}: unknown value {value!r}; valid choices: {', '.join(map(str, choices))}"
            )
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{path}: expected a list, got {type(value).__name__}")
        args = get_args(tp)
        item_tp = args[0]
        return tuple(_convert(item_tp, v, f"{path}[{i}]") for i, v in enumerate(value))
    if origin in (typing.Union, types.UnionType):
        for arg in get_args(tp):
            try:
                return _convert(arg, value, path)
            except ConfigError:
                continue
        raise ConfigError(f"{path}: {value!r} does not match {tp}")
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true/false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    return value


def stage_config_from_dict(data: dict[str, Any]) -> StageConfig:
    """Pick the stage class from ``data["stage"]`` and build it."""
    stage = data.get("stage")
    if stage not in STAGE_CONFIGS:
        raise ConfigError(f"config has stage {stage!r}; valid stages: {', '.join(STAGE_CONFIGS)}")
    return from_dict(STAGE_CONFIGS[stage], data)


def merge(cfg: T, overrides: dict[str, Any]) -> T:
    """Return ``cfg`` with nested ``overrides`` applied (validated like ``from_dict``)."""
    base = to_dict(cfg)
    _deep_update(base, overrides)
    return from_dict(type(cfg), base)


def _deep_update(base: dict[str, Any], upd: dict[str, Any]) -> None:
    for k, v in upd.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _deep_update(base[k], v)
        else:
            base[k] = v
