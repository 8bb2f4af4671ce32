"""Stage checkpoints and bundles (docs/formats.md, "Stage checkpoint", "Bundle").

A stage checkpoint is a directory (local or ``s3://``):
    config.json        the frozen stage config: enough to rebuild the model, no flags
    model.safetensors  EMA weights (what sampling uses)
    train_state.pt     optional, for resuming: raw weights, optimizer, step, RNG
                       (tensors and plain containers only; loaded with weights_only=True)
    commit.json        written last: the name, size and SHA-256 of every file above. A
                       checkpoint without it is incomplete (a crash while writing), one whose
                       files differ from it is damaged; neither is resumed from. Checkpoints
                       written before commit markers existed have none and load as before.
A bundle is a directory with ``bundle.json`` and one subdirectory per stage.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor

from unclip import fs
from unclip.config import (
    ConfigError,
    DecoderConfig,
    PriorConfig,
    SamplingSettings,
    StageConfig,
    UpsamplerConfig,
    from_dict,
    stage_config_from_dict,
    to_dict,
)
from unclip.models import StageModel, build_model

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
TRAIN_STATE = "train_state.pt"
COMMIT = "commit.json"
COMMIT_FORMAT = 1
BUNDLE = "bundle.json"
BUNDLE_FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint or bundle is missing, incomplete or inconsistent."""


# ---------------------------------------------------------------------- stage checkpoints
def save_stage(
    uri: str,
    config: StageConfig,
    weights: dict[str, Tensor],
    train_state: dict[str, Any] | None = None,
) -> None:
    """Write a stage checkpoint directory. ``weights``: the (EMA) state_dict to sample with.

    The config comes after the weights, and the commit marker (``commit.json``) last.
    """
    fs.makedirs(uri)
    tensors = {k: v.detach().cpu().contiguous() for k, v in weights.items()}
    files = {WEIGHTS: save_safetensors(tensors)}
    if train_state is not None:
        buf = io.BytesIO()
        torch.save(train_state, buf)
        files[TRAIN_STATE] = buf.getvalue()
    files[CONFIG] = json.dumps(to_dict(config), indent=2).encode()
    for name, data in files.items():
        fs.write_bytes(fs.join(uri, name), data)
    write_commit(uri, files)


def write_commit(uri: str, files: dict[str, bytes] | list[str]) -> None:
    """Mark the checkpoint at ``uri`` complete: ``commit.json`` with the name, size and SHA-256
    of each file (given as bytes, or as names to read back). Call it after every file is
    written."""
    if not isinstance(files, dict):
        files = {name: fs.read_bytes(fs.join(uri, name)) for name in files}
    entries = {
        name: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        for name, data in files.items()
    }
    fs.write_text(fs.join(uri, COMMIT), json.dumps({"format": COMMIT_FORMAT, "files": entries}))


def read_commit(uri: str) -> dict[str, dict[str, Any]] | None:
    """``{file name: {"size", "sha256"}}`` from a checkpoint's commit marker; None without one."""
    try:
        data = json.loads(fs.read_text(fs.join(uri, COMMIT)))
    except FileNotFoundError:
        return None
    except ValueError as e:
        raise CheckpointError(f"{fs.join(uri, COMMIT)} is not valid JSON ({e})") from None
    if data.get("format") != COMMIT_FORMAT or not isinstance(data.get("files"), dict):
        raise CheckpointError(
            f"{fs.join(uri, COMMIT)} has format {data.get('format')!r}; this version reads "
            f"format {COMMIT_FORMAT}"
        )
    return data["files"]


def verify_commit(uri: str) -> bool:
    """Check every file against the commit marker: True if intact, False if the checkpoint
    has no marker (written before markers existed); raises ``CheckpointError`` naming the
    first file that is missing, of another size or with another checksum."""
    files = read_commit(uri)
    if files is None:
        return False
    for name, want in files.items():
        try:
            data = fs.read_bytes(fs.join(uri, name))
        except FileNotFoundError:
            raise CheckpointError(f"checkpoint {uri!r}: {name} is missing") from None
        if len(data) != want["size"] or hashlib.sha256(data).hexdigest() != want["sha256"]:
            raise CheckpointError(
                f"checkpoint {uri!r}: {name} is damaged ({len(data)} bytes, "
                f"{want['size']} committed, or another checksum)"
            )
    return True


def load_committed_train_state(uri: str) -> dict[str, Any]:
    """The train state of a checkpoint after checking it against its commit marker (if it
    has one); ``CheckpointError`` if it is damaged, has none, or does not load."""
    verify_commit(uri)
    try:
        state = load_train_state(uri)
    except (RuntimeError, EOFError, ValueError, OSError) as e:
        raise CheckpointError(f"checkpoint {uri!r}: {TRAIN_STATE} does not load ({e})") from None
    if state is None:
        raise CheckpointError(f"checkpoint {uri!r} has no {TRAIN_STATE}")
    return state


def load_stage_config(uri: str) -> StageConfig:
    try:
        data = json.loads(fs.read_text(fs.join(uri, CONFIG)))
    except FileNotFoundError:
        raise CheckpointError(
            f"{uri!r} is not a stage checkpoint (no {CONFIG}); expected the output of "
            "`unclip train prior|decoder|upsampler`"
        ) from None
    try:
        return stage_config_from_dict(data)
    except ConfigError as e:
        raise CheckpointError(f"{fs.join(uri, CONFIG)}: {e}") from None


def load_weights(uri: str) -> dict[str, Tensor]:
    try:
        return load_safetensors(fs.read_bytes(fs.join(uri, WEIGHTS)))
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {uri!r} has no {WEIGHTS}") from None


def load_stage(uri: str, device: str | torch.device = "cpu") -> StageModel:
    """Rebuild a stage model from its config and load its (EMA) weights, in eval mode."""
    config = load_stage_config(uri)
    model = build_model(config)
    missing, unexpected = model.load_state_dict(load_weights(uri), strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"weights in {uri!r} do not fit its config: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    return model.to(device).eval()


def load_train_state(uri: str) -> dict[str, Any] | None:
    """The resumable training state, or None. Never unpickles code (weights_only=True)."""
    path = fs.join(uri, TRAIN_STATE)
    if not fs.exists(path):
        return None
    return torch.load(io.BytesIO(fs.read_bytes(path)), map_location="cpu", weights_only=True)


# ---------------------------------------------------------------------- bundles
@dataclass(frozen=True)
class BundleSpec:
    """Contents of ``bundle.json``."""

    format_version: int = BUNDLE_FORMAT
    clip: dict[str, Any] = field(default_factory=dict)  # ClipIdentity as JSON
    clip_path: str = ""  # subdirectory with a CLIP checkpoint, or "" for an open_clip name
    stages: tuple[str, ...] = ()  # subdirectories, in pipeline order
    sampling: SamplingSettings = field(default_factory=SamplingSettings)


def make_bundle(
    out: str,
    clip: str,
    prior: str,
    decoder: str,
    upsamplers: list[str] | tuple[str, ...] = (),
    clip_pretrained: str = "",
    sampling: SamplingSettings | None = None,
) -> BundleSpec:
    """Assemble a bundle from stage checkpoints (copies config + EMA weights only).

    Checks that the stages fit together: same CLIP as the prior and decoder were trained
    with, decoder output size == first upsampler's input size, and so on.
    """
    from unclip.clip import Clip

    clip_model = Clip.load(clip, clip_pretrained)
    ident = clip_model.identity
    configs = [load_stage_config(u) for u in (prior, decoder, *upsamplers)]
    check_stage_chain(configs, ident.embed_dim, ident.fingerprint)
    names = ["prior", "decoder"] + [f"upsampler{i + 1}" for i in range(len(upsamplers))]
    for name, src in zip(names, (prior, decoder, *upsamplers), strict=True):
        for f in (CONFIG, WEIGHTS):
            fs.write_bytes(fs.join(out, name, f), fs.read_bytes(fs.join(src, f)))
    clip_path = ""
    if clip_model.identity.pretrained == "" and fs.exists(fs.join(clip, "config.json")):
        clip_path = "clip"
        for f in ("config.json", "model.safetensors"):
            fs.write_bytes(fs.join(out, "clip", f), fs.read_bytes(fs.join(clip, f)))
    if sampling is None:
        p, d = configs[0], configs[1]
        assert isinstance(p, PriorConfig) and isinstance(d, DecoderConfig)
        sampling = SamplingSettings(
            prior_steps=p.sample_steps,
            prior_guidance_scale=p.guidance_scale,
            prior_eta=p.sample_eta,
            candidates=p.candidates,
            decoder_steps=d.sample_steps,
            decoder_guidance_scale=d.guidance_scale,
            decoder_eta=d.sample_eta,
            latent_steps=d.latent_steps,
            upsampler_steps=configs[2].sample_steps if upsamplers else 27,
        )
    spec = BundleSpec(
        clip=ident.to_json(), clip_path=clip_path, stages=tuple(names), sampling=sampling
    )
    fs.write_text(fs.join(out, BUNDLE), json.dumps(asdict(spec), indent=2))
    return spec


def check_stage_chain(configs: list[StageConfig], embed_dim: int, fingerprint: str) -> None:
    """Raise CheckpointError unless prior, decoder and upsamplers fit this CLIP and each other."""
    prior, decoder, *ups = configs
    if not isinstance(prior, PriorConfig):
        raise CheckpointError(f"first stage must be a prior, got {prior.stage!r}")
    if not isinstance(decoder, DecoderConfig):
        raise CheckpointError(f"second stage must be a decoder, got {decoder.stage!r}")
    for cfg in (prior, decoder):
        dim = cfg.net.embed_dim if isinstance(cfg, PriorConfig) else cfg.net.clip_dim
        if dim != embed_dim:
            raise CheckpointError(
                f"{cfg.stage} expects CLIP embeddings of size {dim}, the CLIP gives {embed_dim}"
            )
        if cfg.clip.fingerprint and fingerprint and cfg.clip.fingerprint != fingerprint:
            raise CheckpointError(
                f"{cfg.stage} was trained with CLIP {cfg.clip.model!r} "
                f"({cfg.clip.fingerprint}), not this one ({fingerprint})"
            )
    size = decoder.net.image_size
    for i, up in enumerate(ups):
        if not isinstance(up, UpsamplerConfig):
            raise CheckpointError(f"stage {i + 3} must be an upsampler, got {up.stage!r}")
        if up.low_res_size != size:
            raise CheckpointError(
                f"upsampler{i + 1} takes {up.low_res_size} px input, the stage before "
                f"gives {size} px"
            )
        size = up.net.image_size


def read_bundle_spec(uri: str) -> BundleSpec:
    try:
        data = json.loads(fs.read_text(fs.join(uri, BUNDLE)))
    except FileNotFoundError:
        raise CheckpointError(
            f"{uri!r} is not a bundle (no {BUNDLE}); make one with `unclip bundle`"
        ) from None
    if data.get("format_version") != BUNDLE_FORMAT:
        raise CheckpointError(
            f"bundle {uri!r} has format {data.get('format_version')!r}; this version reads "
            f"format {BUNDLE_FORMAT}"
        )
    try:
        return from_dict(BundleSpec, data)
    except ConfigError as e:
        raise CheckpointError(f"{fs.join(uri, BUNDLE)}: {e}") from None


def bundle_clip_source(uri: str, spec: BundleSpec) -> tuple[str, str]:
    """(model, pretrained) to pass to ``Clip.load`` for a bundle's CLIP."""
    if spec.clip_path:
        return fs.join(uri, spec.clip_path), ""
    return spec.clip["model"], spec.clip.get("pretrained", "")
