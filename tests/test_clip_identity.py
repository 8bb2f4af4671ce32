"""A CLIP checkpoint's identity read without torch equals what the built model reports."""

from __future__ import annotations

import subprocess
import sys

import open_clip
import pytest
import torch

from pipelines.embed import load_identity
from tests.tiny import TINY_CLIP_CFG
from training.clip_presets import ClipModelConfig
from unclip.clip import (
    Clip,
    _embed_dim,
    _image_size,
    _text_width,
    identity_of,
    save_clip_checkpoint,
)
from unclip.clip_identity import ClipLoadError

CONFIGS = {
    "tiny_vit": TINY_CLIP_CFG,
    "shapes_resnet": ClipModelConfig(vision_width=8, text_width=32, text_heads=2).to_open_clip(),
    "vit_defaults": {  # image size and text width left to open_clip's defaults
        "embed_dim": 16,
        "vision_cfg": {"layers": 1, "width": 32, "patch_size": 32, "head_width": 16},
        "text_cfg": {"context_length": 8, "vocab_size": 49408, "heads": 2, "layers": 1},
    },
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_checkpoint_identity_matches_the_built_model(tmp_path, name: str) -> None:
    torch.manual_seed(0)
    net = open_clip.model.CLIP(**CONFIGS[name])
    save_clip_checkpoint(str(tmp_path / "c"), net, CONFIGS[name])
    ident = load_identity(str(tmp_path / "c"))
    assert ident == Clip.load(str(tmp_path / "c")).identity
    assert (ident.embed_dim, ident.text_width, ident.image_size) == (
        _embed_dim(net),
        _text_width(net),
        _image_size(net),
    )
    assert ident.fingerprint.startswith("sha256:")


def test_identity_of_a_checkpoint_imports_no_torch(tmp_path) -> None:
    torch.manual_seed(0)
    save_clip_checkpoint(str(tmp_path / "c"), open_clip.model.CLIP(**TINY_CLIP_CFG), TINY_CLIP_CFG)
    code = (
        "import sys; from pipelines.embed import load_identity; "
        f"i = load_identity({str(tmp_path / 'c')!r}); "
        "assert 'torch' not in sys.modules and 'open_clip' not in sys.modules, 'imported'; "
        "print(i.embed_dim, i.image_size)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["32", "32"]


def test_not_a_checkpoint_is_refused_clearly(tmp_path) -> None:
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "config.json").write_text('{"kind": "prior"}')
    with pytest.raises(ClipLoadError, match="incomplete"):
        load_identity(str(tmp_path / "c"))
    (tmp_path / "c" / "model.safetensors").write_bytes(b"x")
    with pytest.raises(ClipLoadError, match="not a CLIP checkpoint"):
        load_identity(str(tmp_path / "c"))


@pytest.mark.filterwarnings("ignore:CLIP .* without a pretrained tag")
@pytest.mark.parametrize("name", ["ViT-B-32", "RN50"])
def test_identity_of_an_open_clip_name_needs_no_weights(name: str) -> None:
    """What `unclip import-embeddings --clip NAME --pretrained TAG` records equals what the
    model reports once loaded (the tag only names the weights; none are read)."""
    built = Clip.load(name).identity  # randomly initialised: no download
    named = identity_of(name, "openai")
    assert named == identity_of(name, "openai")
    assert (named.model, named.pretrained, named.fingerprint) == (name, "openai", f"{name}/openai")
    fields = ("embed_dim", "context_length", "text_width", "image_size")
    assert [getattr(named, f) for f in fields] == [getattr(built, f) for f in fields]
    assert identity_of(name) == built


def test_identity_of_an_unknown_name_is_refused() -> None:
    with pytest.raises(ClipLoadError, match="neither an open_clip model name"):
        identity_of("ViT-Nope-99", "openai")
