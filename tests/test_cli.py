"""The `unclip` command line: help, user errors as one line, bundle + generate end to end."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
from PIL import Image

from tests.tiny import save_tiny_clip, tiny_configs
from unclip.checkpoint import save_stage
from unclip.cli import COMMANDS, build_parser
from unclip.models import build_model


def unclip(*args: str, cwd: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    return subprocess.run(
        [sys.executable, "-m", "unclip.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=300,
    )


def test_help_lists_every_design_subcommand() -> None:
    out = unclip("--help")
    assert out.returncode == 0
    for cmd in (
        "shapes",
        "embed",
        "train",
        "bundle",
        "generate",
        "serve",
        "eval",
        "demo",
        "submit",
    ):
        assert cmd in out.stdout
    assert set(COMMANDS) == {
        "vary",
        "interpolate",
        "text-diff",
        "shapes",
        "embed",
        "import-embeddings",
        "train",
        "bundle",
        "generate",
        "serve",
        "eval",
        "demo",
        "submit",
    }


def test_parser_matches_design_flags() -> None:
    p = build_parser()
    a = p.parse_args(
        [
            "train",
            "prior",
            "--data",
            "d",
            "--out",
            "o",
            "--preset",
            "full",
            "--steps",
            "5",
            "--workers",
            "2",
            "--resume",
        ]
    )
    assert (a.stage, a.preset, a.steps, a.workers, a.resume) == ("prior", "full", 5, 2, True)
    a = p.parse_args(
        ["generate", "a red circle", "--bundle", "b", "-n", "2", "--seed", "3", "-o", "x.png"]
    )
    assert (a.prompt, a.num_images, a.seed, a.out) == ("a red circle", 2, 3, "x.png")


def test_user_errors_are_one_line_without_traceback(tmp_path) -> None:
    out = unclip(
        "generate",
        "a red circle",
        "--bundle",
        str(tmp_path / "missing"),
        "-o",
        str(tmp_path / "x.png"),
    )
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    assert out.stderr.strip().startswith("error:") and "not a bundle" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    out = unclip("generate", "   ", "--bundle", str(tmp_path), "-o", str(tmp_path / "x.png"))
    assert out.returncode == 1 and "prompt is empty" in out.stderr


def test_bundle_then_generate_writes_a_png(tmp_path) -> None:
    clip = save_tiny_clip(str(tmp_path / "clip"))
    paths = []
    for cfg in tiny_configs(clip):
        path = str(tmp_path / cfg.stage)
        save_stage(path, cfg, build_model(cfg).state_dict())
        paths.append(path)
    out = unclip(
        "bundle",
        "--clip",
        str(tmp_path / "clip"),
        "--prior",
        paths[0],
        "--decoder",
        paths[1],
        "--upsampler",
        paths[2],
        "--out",
        str(tmp_path / "bundle"),
    )
    assert out.returncode == 0, out.stderr
    assert "prior, decoder, upsampler1" in out.stdout
    png = tmp_path / "out.png"
    out = unclip(
        "generate",
        "a small red circle",
        "--bundle",
        str(tmp_path / "bundle"),
        "-n",
        "4",
        "--seed",
        "1",
        "-o",
        str(png),
    )
    assert out.returncode == 0, out.stderr
    img = np.asarray(Image.open(png))
    assert img.shape == (64, 64, 3)  # 2x2 grid of 32 px images
