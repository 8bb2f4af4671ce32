"""`unclip eval`: the prior ablation as a Ray Data job, on a real (small) shapes table.

The bundle is tiny and untrained, so the numbers say nothing about quality; the tests check
the contract (eval.json shape, rows, bounds), that the metrics are computed from what was
generated (summarise on known inputs), and that the same seed gives the same report.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.embed import EmbedOptions, run_embed
from pipelines.evaluate import (
    ORACLE_KEYS,
    EvalConfig,
    EvalReport,
    evaluate,
    load_heldout,
    markdown_table,
    summarise,
)
from pipelines.shapes import make_shapes
from tests.tiny import make_tiny_bundle
from unclip.schema import DataError
from unclip.split import is_heldout

pytestmark = pytest.mark.slow
METHODS = ("diffusion_prior", "no_prior", "ground_truth", "random")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, ray_session) -> dict[str, str]:
    root = tmp_path_factory.mktemp("eval")
    bundle = make_tiny_bundle(str(root))  # 16 px decoder, 32 px upsampler, tiny CLIP
    make_shapes(str(root / "shapes"), n=500, size=32, seed=3, workers=1)
    run_embed(
        EmbedOptions(
            input=str(root / "shapes"),
            output=str(root / "table"),
            clip=str(root / "clip_ckpt"),
            image_size=32,
            batch_size=128,
            progress=False,
        )
    )
    return {"bundle": bundle, "table": str(root / "table"), "root": str(root)}


def test_summarise_computes_the_metrics_from_the_generated_embeddings() -> None:
    g = torch.Generator().manual_seed(0)
    real = torch.nn.functional.normalize(torch.randn(40, 8, generator=g), dim=-1)
    text = torch.nn.functional.normalize(real + 0.1 * torch.randn(40, 8, generator=g), dim=-1)
    far = torch.nn.functional.normalize(torch.randn(40, 8, generator=g) + 3.0, dim=-1)
    right = {"colour": True, "shape": True, "size": True, "position": False, "all": False}
    wrong = dict.fromkeys(ORACLE_KEYS, False)
    results = {
        "method": np.array(["copy"] * 40 + ["far"] * 40, dtype=object),
        "gen_emb": np.array(list(real.numpy()) + list(far.numpy()), dtype=object),
        "text_emb": np.array(list(text.numpy()) * 2, dtype=object),
        "scores": np.array([json.dumps(right)] * 40 + [json.dumps(wrong)] * 40, dtype=object),
    }
    copy, far_row = summarise(results, real, ("copy", "far"))
    assert copy.fd == pytest.approx(0.0, abs=1e-4) and far_row.fd > 0.5
    assert copy.clip_score == pytest.approx(float((real * text).sum(-1).mean()), abs=1e-5)
    assert copy.clip_score > far_row.clip_score
    assert copy.oracle == {"colour": 1.0, "shape": 1.0, "size": 1.0, "position": 0.0, "all": 0.0}
    assert far_row.oracle == dict.fromkeys(ORACLE_KEYS, 0.0)
    assert copy.retrieval_top1 > 0.9 and copy.n == far_row.n == 40
    assert "| copy | 1.00 | 1.00 | 1.00 | 0.00 | 0.00 |" in markdown_table(
        EvalReport([copy, far_row])
    )


def test_heldout_rows_come_with_their_attributes(setup) -> None:
    table = load_heldout(setup["table"], 5)
    ids = table.column("id").to_pylist()
    assert 0 < len(ids) <= 5 and ids == sorted(ids) and all(is_heldout(i) for i in ids)
    for row in table.to_pylist():  # joined by id from the dataset's attributes.parquet
        assert all(row[k] is not None for k in ("colour", "shape", "size", "position"))


def test_eval_writes_the_report_and_is_reproducible(setup, tmp_path) -> None:
    cfg = EvalConfig(
        n=6,
        batch_size=4,
        grid_captions=3,
        decoder_steps=3,
        upsampler_steps=2,
        prior_steps=3,
        num_cpus_per_worker=1,
        manipulations=4,
    )
    first = evaluate(setup["bundle"], setup["table"], str(tmp_path / "a"), cfg, preset="test")
    report = json.loads((tmp_path / "a" / "eval.json").read_text())
    assert set(report) >= {"rows", "preset", "seconds"} and report["preset"] == "test"
    assert [r["method"] for r in report["rows"]] == list(METHODS)
    for row in report["rows"]:
        assert row["n"] == 6
        assert set(row["oracle"]) == set(ORACLE_KEYS)
        assert all(0.0 <= v <= 1.0 for v in row["oracle"].values())
        assert row["oracle"]["all"] <= min(row["oracle"][k] for k in ORACLE_KEYS[:4])
        assert -1.0 <= row["clip_score"] <= 1.0 and row["fd"] >= 0.0
    grid = Image.open(tmp_path / "a" / "eval_grid.png")
    assert grid.size[0] == 3 * 32 and grid.size[1] == len(METHODS) * 32
    assert "| diffusion_prior |" in (tmp_path / "a" / "eval.md").read_text()
    # the manipulations section: measured on 4 held-out images, one strip per manipulation
    m = report["manipulations"]
    assert m["images"] == 4 and m["output_size"] == 32
    assert (m["latent_steps"], m["latent_guidance_scale"]) == (6, 1.0)  # the bundle's
    assert m["variations"]["images"] == 4 and m["interpolation"]["pairs"] == 2
    # strips: originals over reconstructions; originals over two variations; 2 pairs x 5
    # frames (the ends are the pair's reconstructions); one row of 3 frames per red image
    sizes = {k: Image.open(tmp_path / "a" / v).size for k, v in m["strips"].items()}
    assert sizes["reconstruction"] == (4 * 32, 2 * 32)
    assert sizes["variations"] == (4 * 32, 3 * 32)
    assert sizes["interpolation"] == (5 * 32, 2 * 32)
    if m["text_diff"]["images"]:
        assert sizes["text_diff"] == (3 * 32, m["text_diff"]["images"] * 32)
    assert "## Manipulations" in (tmp_path / "a" / "eval.md").read_text()

    second = evaluate(setup["bundle"], setup["table"], str(tmp_path / "b"), cfg)
    assert [r.__dict__ for r in first.rows] == [r.__dict__ for r in second.rows]
    drop = ("seconds", "stage_seconds")
    assert {k: v for k, v in (first.manipulations or {}).items() if k not in drop} == {
        k: v for k, v in (second.manipulations or {}).items() if k not in drop
    }


def test_eval_refuses_a_table_of_another_clip(setup, tmp_path) -> None:
    other = make_tiny_bundle(str(tmp_path / "other"), seed=1)  # different CLIP weights
    with pytest.raises(DataError, match="CLIP"):
        evaluate(other, setup["table"], str(tmp_path / "out"), EvalConfig(n=2))
