"""``unclip train clip``: data reading, the Ray Train loop (local mode, 2-worker DDP, S3),
checkpoints that ``Clip.load`` reads like any open_clip model, resuming, and quality."""

from __future__ import annotations

import argparse
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from training.clip import ClipJob, evaluate, fit, plan, run
from training.clip_data import HardNegatives, list_pairs, read_folder, worker_batches
from training.clip_eval import all_combinations, caption_retrieval, zero_shot
from training.runs import latest_checkpoint
from unclip import fs
from unclip.checkpoint import load_train_state
from unclip.clip import Clip
from unclip.errors import UserError
from unclip.schema import DataError

TINY = {
    "model": {
        "embed_dim": 32,
        "image_size": 32,
        "vision": "resnet",
        "vision_width": 8,
        "vision_head_width": 16,
        "text_width": 32,
        "text_layers": 1,
        "text_heads": 2,
        "context_length": 32,
    },
    "batch_size": 8,
    "warmup_steps": 1,
    "log_every": 1,
    "checkpoint_every": 2,
    "eval_images": 16,
    "eval_shapes": "on",
    "eval_captions_per_combo": 1,
}


def write_shapes(root: str, n: int, size: int = 32, seed: int = 0) -> str:
    """A captioned shapes folder (PNG + .txt), local or s3://."""
    from unclip.shapes.render import make_item, png_bytes

    for i in range(n):
        item = make_item(seed, i, size)
        fs.write_bytes(fs.join(root, f"{item.id}.png"), png_bytes(item.image))
        fs.write_text(fs.join(root, f"{item.id}.txt"), item.caption)
    return root


def args_for(data: str, out: str, **kw) -> argparse.Namespace:
    base = dict(
        stage="clip",
        data=data,
        out=out,
        preset="quick",
        config=None,
        steps=None,
        workers=0,
        gpu=False,
        resume=False,
        storage=None,
    )
    return argparse.Namespace(**{**base, **kw})


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_shapes(str(tmp_path_factory.mktemp("shapes")), 40)


# ---------------------------------------------------------------------- data
def test_read_folder_lists_every_unusable_file(tmp_path: Path) -> None:
    write_shapes(str(tmp_path), 6)
    (tmp_path / "lonely.png").write_bytes((tmp_path / "0_0000000.png").read_bytes())
    (tmp_path / "0_0000001.txt").write_text("  \n")
    (tmp_path / "0_0000002.png").write_bytes(b"not a png")
    (tmp_path / "notes.md").write_text("ignored: not an image")
    data = read_folder(str(tmp_path), 16, 32)
    assert data.ids == ["0_0000000", "0_0000003", "0_0000004", "0_0000005"]
    assert data.images.shape == (4, 3, 16, 16) and data.images.dtype == np.uint8
    assert data.tokens.shape == (4, 32) and (data.tokens[:, 0] == 49406).all()  # start token
    reasons = dict(data.skipped)
    assert set(reasons) == {"lonely.png", "0_0000001.png", "0_0000002.png"}
    assert "no caption" in reasons["lonely.png"]
    assert "empty caption" in reasons["0_0000001.png"]
    assert "cannot decode" in reasons["0_0000002.png"]


def test_read_folder_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_folder(str(tmp_path / "missing"), 16, 32)
    (tmp_path / "a.png").write_bytes(b"x")
    with pytest.raises(DataError, match="no captioned images"):
        read_folder(str(tmp_path), 16, 32)
    pairs, skipped = list_pairs(str(tmp_path))
    assert pairs == [] and skipped == [("a.png", "no caption file a.txt")]


def test_worker_batches_partition_the_global_batch() -> None:
    one = worker_batches(50, 8, 0, 1, seed=3)
    two = [worker_batches(50, 8, r, 2, seed=3) for r in range(2)]
    seen = []
    for _ in range(8):  # 6 batches per epoch: crosses an epoch boundary
        step, rows = next(one)
        (s0, r0), (s1, r1) = next(two[0]), next(two[1])
        assert step == s0 == s1
        assert len(r0) == len(r1) == 4 and not set(r0) & set(r1)
        assert sorted([*r0, *r1]) == sorted(rows)
        seen.append(rows)
    assert len(set(np.concatenate(seen[:6]).tolist())) == 48  # an epoch: no repeats
    resumed = worker_batches(50, 8, 0, 1, seed=3, start_step=7)
    assert np.array_equal(next(resumed)[1], seen[7])


def test_combinations_cover_every_attribute_tuple() -> None:
    combos = all_combinations()
    assert len(combos) == len(set(combos)) == 8 * 4 * 2 * 5 * 5


def test_zero_shot_and_retrieval_read_attributes_off_embeddings() -> None:
    """With text embeddings that identify each tuple, images near a tuple's embedding are
    classified as that tuple; a wrong neighbour costs exactly the attributes it differs in."""
    combos = all_combinations()
    torch.manual_seed(0)
    text = torch.nn.functional.normalize(torch.randn(len(combos), 64), dim=-1)
    pick = [3, 500, 1599, 42]
    images = torch.nn.functional.normalize(text[pick] + 0.02 * torch.randn(4, 64), dim=-1)
    truth = [combos[i] for i in pick]
    joint, marginal = zero_shot(images, combos, text, truth)
    assert joint == marginal == {k: 1.0 for k in ("colour", "shape", "size", "position", "all")}
    # retrieval: caption 0 retrieves image 1, which the oracle reads as tuple 500
    oracle = [combos[3], combos[500], combos[1599], combos[42]]
    caption_emb = images[[1, 1, 2, 3]]
    got = caption_retrieval(images, caption_emb, truth, oracle)
    same = [getattr(combos[3], k) == getattr(combos[500], k) for k in ("colour", "shape")]
    assert (
        got["all"] == 0.75
        and got["colour"] == (3 + same[0]) / 4
        and got["shape"] == (3 + same[1]) / 4
    )


# ---------------------------------------------------------------------- config and plan
def test_plan_rejects_bad_config_and_runs(tmp_path: Path, shapes_dir: str) -> None:
    out = str(tmp_path / "clip")
    with pytest.raises(Exception, match="unknown key"):
        plan(shapes_dir, out, config={"modle": {}})
    with pytest.raises(Exception, match="vision_layers needs 4"):
        plan(shapes_dir, out, config={"model": {"vision_layers": [1, 1]}})
    with pytest.raises(UserError, match="nothing to resume"):
        plan(shapes_dir, out, resume=True)
    with pytest.raises(UserError, match="not divisible"):
        plan(shapes_dir, out, config={"batch_size": 9, "hard_negatives": 0}, workers=2)
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("lr: 0.0005\nmodel: {vision: vit, vision_layers: [2], patch_size: 4}\n")
    job = plan(shapes_dir, out, "full", str(cfg_file), steps=7)
    assert job.train.lr == 0.0005 and job.train.steps == 7
    assert job.train.model.to_open_clip()["vision_cfg"]["patch_size"] == 4
    assert job.storage == str(tmp_path) and job.name == "clip.run"


# ---------------------------------------------------------------------- training
def test_local_mode_trains_and_checkpoint_loads_like_open_clip(
    tmp_path: Path, shapes_dir: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = str(tmp_path / "clip")
    cfg_file = tmp_path / "tiny.json"
    cfg_file.write_text(json.dumps(TINY))
    assert run(args_for(shapes_dir, out, config=str(cfg_file), steps=3)) == 0
    printed = capsys.readouterr().out
    assert "step 3/3 loss" in printed and "steps/s" in printed and "zero_shot" in printed

    clip = Clip.load(out)  # exactly the open_clip path: config.json kind open_clip
    assert clip.identity.embed_dim == 32 and clip.identity.image_size == 32
    tokens, _ = clip.tokenize(["a small red circle in the centre", "a big blue square"])
    text = clip.encode_text(tokens)
    images = clip.encode_images(torch.rand(2, 3, 64, 64) * 2 - 1)
    assert text.shape == images.shape == (2, 32)
    assert torch.allclose(text.norm(dim=-1), torch.ones(2), atol=1e-5)

    state = load_train_state(out)  # weights_only=True
    assert state["step"] == 3 and "optimizer" in state
    metrics = json.loads(fs.read_text(fs.join(out, "metrics.json")))
    assert metrics["steps"] == 3 and metrics["images"] == 40
    keys = ("zero_shot", "zero_shot_marginal", "retrieval")
    for key in [*keys, *(k + "_upsampled" for k in keys)]:
        assert set(metrics[key]) == {"colour", "shape", "size", "position", "all"}
    with pytest.raises(UserError, match="already holds a stage checkpoint"):
        run(args_for(shapes_dir, out, config=str(cfg_file), steps=3))


def test_time_limit_stops_early_with_a_checkpoint(tmp_path: Path, shapes_dir: str) -> None:
    job = plan(
        shapes_dir, str(tmp_path / "clip"), config={**TINY, "time_limit_minutes": 1e-6}, workers=0
    )
    step, metrics = fit(job, read_folder(shapes_dir, 32, 32))
    assert step == 0 and metrics["final"]
    assert Clip.load(job.out).identity.embed_dim == 32


def _weights(uri: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return load(fs.read_bytes(fs.join(uri, "model.safetensors")))


@pytest.mark.slow
def test_two_workers_ddp_equals_one_process_on_the_global_batch(
    ray_session: None, tmp_path: Path, shapes_dir: str
) -> None:
    """ClipLoss gathers features across workers (with gradients): 2 DDP workers with 4 rows
    each take exactly the step one process takes on the 8 rows. Without the gather each
    worker's loss would see only its 4 rows as negatives and the weights would differ.
    (A ViT tower: a ResNet's BatchNorm takes per-worker batch statistics, as usual in DDP.)"""
    vit = {"vision": "vit", "vision_layers": [1], "vision_width": 32, "patch_size": 8}
    over = {
        **TINY,
        "model": {**TINY["model"], **vit},
        "upsample_fraction": 0.0,
        "checkpoint_every": 100,
        "threads": 1,
    }
    data = read_folder(shapes_dir, 32, 32)
    one = plan(shapes_dir, str(tmp_path / "one"), config=over, steps=2, workers=0)
    two = plan(shapes_dir, str(tmp_path / "two"), config=over, steps=2, workers=2)
    step1, m1 = fit(one, data)
    step2, m2 = fit(two, data)
    assert step1 == step2 == 2
    assert m1["loss"] == pytest.approx(m2["loss"], rel=1e-4)
    w1, w2 = _weights(one.out), _weights(two.out)
    moved = w1["visual.conv1.weight"] - _initial_weights(one)["visual.conv1.weight"]  # patchify
    assert moved.abs().max() > 1e-4  # the step did change the weights
    for k in w1:
        assert torch.allclose(w1[k], w2[k], atol=2e-5, rtol=1e-4), k
    # the run directory holds Ray Train's checkpoint with a resumable train state
    step, ckpt = latest_checkpoint(two.run_dir)
    assert step == 2 and load_train_state(ckpt)["step"] == 2


def _initial_weights(job: ClipJob) -> dict[str, torch.Tensor]:
    from training.clip_steps import build_clip

    torch.manual_seed(job.train.seed)
    return build_clip(job.train.model).state_dict()


@pytest.mark.slow
@pytest.mark.extended
def test_s3_data_and_checkpoints_and_resume(
    ray_session: None, s3_bucket: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_shapes(f"{s3_bucket}/shapes", 24)
    out = f"{s3_bucket}/models/clip"
    cfg = json.dumps({**TINY, "eval_images": 0, "checkpoint_every": 2})
    fs.write_text(f"{s3_bucket}/tiny.json", cfg)
    assert run(args_for(data, out, config=f"{s3_bucket}/tiny.json", steps=3, workers=1)) == 0
    run_dir = f"{s3_bucket}/models/clip.run"
    assert latest_checkpoint(run_dir)[0] == 3
    assert Clip.load(out).identity.embed_dim == 32
    fs.get_fs(out)[0].rm(fs.get_fs(out)[1], recursive=True)  # as if the driver had crashed
    with pytest.raises(UserError, match="pass --resume"):
        plan(data, out, config=json.loads(cfg))
    capsys.readouterr()
    assert run(args_for(data, out, steps=5, workers=1, resume=True)) == 0
    assert "resuming at step 3" in capsys.readouterr().out
    state = torch.load(io.BytesIO(fs.read_bytes(fs.join(out, "train_state.pt"))), weights_only=True)
    assert state["step"] == 5
    assert json.loads(fs.read_text(fs.join(out, "metrics.json")))["steps"] == 5


@pytest.mark.slow
@pytest.mark.extended
def test_quality_colour_well_above_chance(tmp_path: Path) -> None:
    """A small budget (local mode) already reads colour far above chance (1/8)."""
    data = write_shapes(str(tmp_path / "shapes"), 2000, size=64, seed=7)
    job = plan(
        data,
        str(tmp_path / "clip"),
        config={
            "batch_size": 64,
            "log_every": 20,
            "eval_images": 200,
            "eval_shapes": "on",
            "time_limit_minutes": 0,  # a step budget, not a time budget: load must not matter
        },
        steps=int(os.environ.get("CLIP_QUALITY_STEPS", "120")),
        workers=0,
    )
    fit(job, read_folder(data, 64, 32))
    metrics = evaluate(job, read_folder(data, 64, 32).split(0.05)[1])
    assert metrics["zero_shot"]["colour"] > 0.5, metrics


def test_hard_negative_batches_group_images_that_differ_only_in_shape() -> None:
    rng = np.random.default_rng(0)
    n = 800
    key = rng.integers(0, 100, n)  # everything but the shape (the shapes data: 400 values)
    variant = rng.integers(0, 4, n)  # the shape
    groups = HardNegatives(key, variant, 4)

    def partnered(batches: list[np.ndarray]) -> float:
        """Fraction of images whose batch holds one differing from it in shape only."""
        hits = 0
        for b in batches:
            for i in b:
                hits += any(key[j] == key[i] and variant[j] != variant[i] for j in b)
        return hits / sum(len(b) for b in batches)

    grouped = worker_batches(n, 16, 0, 1, seed=1, groups=groups)
    epoch = [next(grouped)[1] for _ in range(n // 16)]
    rows = np.concatenate(epoch)
    assert len(set(rows.tolist())) == len(rows) == n  # an epoch: every image once
    plain = worker_batches(n, 16, 0, 1, seed=1)
    assert partnered(epoch) > 0.8
    assert partnered([next(plain)[1] for _ in range(n // 16)]) < 0.2
    # two workers still split each global batch, groups included
    two = [worker_batches(n, 16, r, 2, seed=1, groups=groups) for r in range(2)]
    (_, r0), (_, r1) = next(two[0]), next(two[1])
    assert sorted([*r0, *r1]) == sorted(epoch[0].tolist())


def test_temporary_cloud_credentials_are_not_frozen_into_the_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Ray keeps the run's storage filesystem (pickled with its options): long-lived keys may
    be passed on to the workers, a session token (which expires) must not."""
    from training.clip import storage_filesystem

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDLONGLIVED")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "long-lived-secret")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "temporary-session-token")
    filesystem, path = storage_filesystem("s3://bucket/runs")
    saved = repr(filesystem.__reduce__())
    assert path == "bucket/runs"
    assert "temporary-session-token" not in saved and "long-lived-secret" not in saved
    monkeypatch.delenv("AWS_SESSION_TOKEN")
    filesystem, _ = storage_filesystem("s3://bucket/runs")
    assert "AKIDLONGLIVED" in repr(filesystem.__reduce__())
