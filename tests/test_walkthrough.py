"""docs/own-data.md's walkthrough, run as written, with a real open_clip architecture.

The CLIP is ViT-B-32 (embedding 512, context 77, images 224 px: nothing of the embedded
default's small CLIP), randomly initialised and saved as a local weights file that
``--pretrained`` takes, as a user without network would pass real weights. The photos are
JPEGs of mixed sizes and aspect ratios with captions. The ``unclip`` lines of the doc's
walkthrough block run in order with the doc's variables set here; ``unclip serve`` is
deployed through the same functions it calls (``serving.cli.serve_config`` + ``deploy``)
on the test's Ray, then asked for images over HTTP.
"""

from __future__ import annotations

import base64
import io
import json
import re
import shlex
from pathlib import Path

import numpy as np
import open_clip
import pyarrow.parquet as pq
import pytest
import requests
import torch
from PIL import Image

from serving.cli import deploy, load_config, serve_config
from tests.conftest import free_port
from unclip.checkpoint import load_stage_config, read_bundle_spec
from unclip.cli import main
from unclip.schema import parquet_files, read_table_info

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "own-data.md"
MARKER = "<!-- walkthrough:"
COLOURS = {"red": (210, 40, 40), "green": (40, 170, 60), "blue": (40, 60, 210)}
SIZES = [(320, 240), (200, 300), (512, 128), (97, 61), (256, 256), (150, 400), (640, 360)]

# small stage configs (the doc's PRIOR_OPTS / DECODER_OPTS): few steps, fixed numerics
RUN = {
    "steps": 3,
    "batch_size": 4,
    "checkpoint_every": 3,
    "eval_every": 3,
    "log_every": 1,
    "heldout_fraction": 0.2,
    "eval_images": 2,
    "amp": "none",
    "memory_format": "contiguous",
}
PRIOR = {
    # on the full preset, which reads the CLIP's per-token text states: their width and the
    # context come from the table's CLIP (ViT-B-32: 512, 77 tokens), not from the preset
    "net": {"width": 32, "layers": 1, "heads": 2, "max_text_len": 77},
    "sample_steps": 3,
    "train": RUN,
}
DECODER = {
    "net": {
        "image_size": 16,
        "base_channels": 16,
        "channel_mult": [1, 2],
        "attention_resolutions": [8],
        "head_channels": 16,
    },
    "sample_steps": 3,
    "train": RUN,
}


def walkthrough(doc: Path) -> list[str]:
    """The ``unclip`` lines of the fenced block after the walkthrough marker."""
    text = doc.read_text()
    block = text[text.index(MARKER) :].split("```", 2)[1]
    return [line.strip() for line in block.splitlines() if line.strip().startswith("unclip ")]


def substitute(line: str, env: dict[str, str]) -> list[str]:
    """Expand ``$NAME`` like the shell does for unquoted variables (split on spaces)."""
    return shlex.split(re.sub(r"\$([A-Z_]+)", lambda m: env[m.group(1)], line))


def photo(i: int, w: int, h: int) -> Image.Image:
    """A disc of a named colour on a gradient background."""
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx * 200 // w, yy * 200 // h, np.full_like(xx, 120)], -1).astype(np.uint8)
    colour = list(COLOURS.values())[i % len(COLOURS)]
    cx, cy, r = w * (0.3 + 0.4 * (i % 2)), h / 2, min(w, h) / 4
    img[(xx - cx) ** 2 + (yy - cy) ** 2 < r**2] = colour
    return Image.fromarray(img)


def write_photos(folder: Path, n: int = 21) -> None:
    folder.mkdir(parents=True)
    for i in range(n):
        w, h = SIZES[i % len(SIZES)]
        sub = folder / ("indoor" if i % 3 else "outdoor")
        sub.mkdir(exist_ok=True)
        photo(i, w, h).save(sub / f"img{i:03d}.jpg", quality=90)
        name = list(COLOURS)[i % len(COLOURS)]
        side = "left" if i % 2 == 0 else "right"
        (sub / f"img{i:03d}.txt").write_text(f"a {name} disc on the {side}")


@pytest.mark.slow
@pytest.mark.extended
def test_own_data_walkthrough_with_vit_b_32(tmp_path, ray_session, capsys) -> None:
    commands = walkthrough(DOC)
    assert [c.split()[1] for c in commands] == [
        "embed",
        "train",
        "train",
        "bundle",
        "generate",
        "serve",
    ]
    weights = tmp_path / "vit-b-32-random.pt"
    torch.manual_seed(0)
    torch.save(open_clip.create_model("ViT-B-32").state_dict(), weights)
    write_photos(tmp_path / "photos")
    (tmp_path / "prior.json").write_text(json.dumps(PRIOR))
    (tmp_path / "decoder.json").write_text(json.dumps(DECODER))
    work = tmp_path / "work"
    env = {
        "PHOTOS": str(tmp_path / "photos"),
        "WORK": str(work),
        "CLIP": "ViT-B-32",
        "PRETRAINED": str(weights),
        "PRIOR_OPTS": f"--preset full --config {tmp_path / 'prior.json'} --workers 0",
        "DECODER_OPTS": f"--config {tmp_path / 'decoder.json'} --workers 0",
    }
    serve_args = None
    for line in commands:
        argv = substitute(line, env)[1:]
        if argv[0] == "serve":
            serve_args = argv
            continue
        assert main(argv) == 0, f"{line}\n{capsys.readouterr().err}"

    # the table: ViT-B-32's sizes, every photo, images kept at the asked size
    info = read_table_info(str(work / "table"))
    assert (info.embed_dim, info.num_rows, info.has_image) == (512, 21, True)
    rows = pq.read_table(parquet_files(str(work / "table"))[0]).to_pylist()
    assert {(r["width"], r["height"]) for r in rows} <= set(SIZES)
    assert all(Image.open(io.BytesIO(r["image"])).size == (64, 64) for r in rows)
    prior = load_stage_config(str(work / "prior"))
    assert (prior.net.embed_dim, prior.net.text_width, prior.net.max_text_len) == (512, 512, 77)
    assert (prior.clip.model, prior.clip.context_length) == ("ViT-B-32", 77)
    assert load_stage_config(str(work / "decoder")).net.clip_dim == 512
    spec = read_bundle_spec(str(work / "bundle"))
    assert spec.clip["model"] == "ViT-B-32" and spec.clip["embed_dim"] == 512
    grid = Image.open(work / "samples.png")
    assert grid.size == (2 * 16, 2 * 16)  # 4 images of the decoder's 16 px, 2 x 2
    assert "wrote" in capsys.readouterr().out

    # serve: what `unclip serve --bundle $WORK/bundle --port 8000` deploys, on a free port
    from ray import serve

    assert serve_args is not None and serve_args[serve_args.index("--bundle") + 1] == str(
        work / "bundle"
    )
    port = free_port()
    config = load_config()
    config["applications"][0]["runtime_env"] = {"env_vars": {"PYTHONPATH": str(ROOT)}}
    deploy(serve_config(config, str(work / "bundle"), port=port), timeout_s=600)
    try:
        body = {"prompt": "a red disc on the left", "num_images": 2, "seed": 0}
        r = requests.post(f"http://127.0.0.1:{port}/v1/generate", json=body, timeout=300)
        assert r.status_code == 200, r.text
        images = [Image.open(io.BytesIO(base64.b64decode(b))) for b in r.json()["images"]]
        assert [im.size for im in images] == [(16, 16), (16, 16)]
        again = requests.post(f"http://127.0.0.1:{port}/v1/generate", json=body, timeout=300)
        assert again.json()["images"] == r.json()["images"]  # same seed, same images
    finally:
        serve.shutdown()
