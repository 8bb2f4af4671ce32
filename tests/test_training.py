"""Ray Train stages (prior, decoder, upsampler): configs, data, the shared loop, the CLI.

The loop tests run Ray Train in local mode (``--workers 0``: the loop in this process, data
from a real Ray Data pipeline over a real Parquet table). Real multi-worker runs, faults and
S3 checkpoints are in ``test_training_faults.py`` (slow).
"""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from tests.tables import png, write_table
from tests.tiny import save_tiny_clip
from training.cli import bind_to_table, execute, latest_checkpoint, plan, run_location
from training.data import StageColumns, heldout_mask, prepare_batch, table_clip, train_embeddings
from training.harness import Stepper, lr_at, new_state
from training.presets import TrainConfig, load_config_file, preset, resolve
from training.stages import stage_for
from unclip.checkpoint import load_stage, load_stage_config, load_train_state
from unclip.cli import main
from unclip.config import ConfigError, OptimConfig
from unclip.errors import UserError
from unclip.models import build_model, count_parameters
from unclip.schema import DataError, read_table_info

TINY = {
    "prior": {"net": {"width": 32, "layers": 1, "heads": 2}, "sample_steps": 4},
    "ar_prior": {"net": {"width": 32, "layers": 1, "heads": 2, "bins": 16}},
    "decoder": {
        "net": {
            "image_size": 16,
            "base_channels": 16,
            "channel_mult": [1, 2],
            "attention_resolutions": [8],
            "head_channels": 16,
        },
        "sample_steps": 4,
    },
    "upsampler": {
        "net": {"image_size": 32, "base_channels": 16, "channel_mult": [1, 2]},
        "low_res_size": 16,
        "crop_size": 0,
        "sample_steps": 3,
    },
}
RUN = {
    "steps": 8,
    "batch_size": 8,
    "checkpoint_every": 4,
    "eval_every": 4,
    "log_every": 2,
    "heldout_fraction": 0.2,
    "eval_images": 4,
    "time_limit_minutes": 0,
}


def tiny(stage: str, **run) -> dict:
    return {**json.loads(json.dumps(TINY[stage])), "train": {**RUN, **run}}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    """A tiny CLIP and a 96-row table embedded with it (plus an image-less copy)."""
    root = tmp_path_factory.mktemp("train-data")
    clip = save_tiny_clip(str(root / "clip"))
    ids = write_table(str(root / "table"), clip, n=96, image_size=32)
    write_table(str(root / "noimage"), clip, n=32, with_image=False)
    return {"root": root, "clip": clip, "table": str(root / "table"), "ids": ids}


# ---------------------------------------------------------------------- configs
def test_presets_fit_the_cpu_budget_and_resolve_strictly(tmp_path) -> None:
    decoder, run = preset("decoder", "quick")
    assert 0.5e6 < count_parameters(build_model(decoder)) < 2.5e6  # CPU-sized UNet
    assert decoder.net.clip_whiten and decoder.net.clip_spatial
    assert (decoder.net.image_size, decoder.net.base_channels, run.batch_size) == (32, 32, 32)
    for stage in ("prior", "ar_prior", "decoder", "upsampler"):
        for name in ("quick", "full"):
            cfg, r = preset(stage, name)
            assert r.time_limit_minutes > 0 and r.steps > 0
            gcfg, gr = preset(stage, name, gpu=True)
            assert count_parameters(build_model(gcfg)) > count_parameters(build_model(cfg))

    path = tmp_path / "c.yaml"
    path.write_text("optim: {lr: 0.002}\nnet: {layers: 3}\ntrain: {steps: 77, batch_size: 4}\n")
    cfg, run = resolve("prior", "quick", overrides=load_config_file(str(path)), steps=50)
    assert (cfg.optim.lr, cfg.net.layers, run.steps, run.batch_size) == (0.002, 3, 50, 4)
    (tmp_path / "c.json").write_text(json.dumps({"stage": "prior", "train": {"seed": 3}}))
    assert resolve("prior", overrides=load_config_file(str(tmp_path / "c.json")))[1].seed == 3

    with pytest.raises(ConfigError, match="c.yaml.*unknown key.*lerning_rate"):
        resolve("prior", overrides={"optim": {"lerning_rate": 1}}, where=str(path))
    with pytest.raises(ConfigError, match="train: unknown key.*stepz"):
        resolve("decoder", overrides={"train": {"stepz": 3}})
    with pytest.raises(ConfigError, match="config for stage 'decoder', not 'prior'"):
        resolve("prior", overrides={"stage": "decoder"})
    with pytest.raises(ConfigError, match="batch_size must be >= 1"):
        TrainConfig(batch_size=0)
    (tmp_path / "bad.yaml").write_text("net: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config_file(str(tmp_path / "bad.yaml"))


def test_lr_warms_up_then_decays() -> None:
    o = OptimConfig(lr=1e-3, warmup_steps=10, lr_schedule="cosine")
    assert lr_at(1, o, 110) == pytest.approx(1e-4)
    assert lr_at(10, o, 110) == pytest.approx(1e-3)
    assert lr_at(60, o, 110) == pytest.approx(5e-4)
    assert lr_at(110, o, 110) == pytest.approx(0.0, abs=1e-12)
    const = OptimConfig(lr=1e-3, warmup_steps=10)
    assert lr_at(5, const, 100) == pytest.approx(5e-4) and lr_at(90, const, 100) == 1e-3


# ---------------------------------------------------------------------- data
def test_weight_decay_shrinks_layer_weights_only(tmp_path) -> None:
    """With zero gradients an AdamW step is pure decay: linear and conv weights shrink by
    lr x weight_decay; norms, biases, positional tables and the learned null conditioning
    stay where they are (decaying them pulls the unconditional input towards 0)."""
    from tests.tiny import tiny_configs

    clip = save_tiny_clip(str(tmp_path / "clip"))
    prior_cfg, decoder_cfg, _ = tiny_configs(clip)
    for cfg in (prior_cfg, decoder_cfg):
        cfg = replace(cfg, optim=OptimConfig(lr=0.1, weight_decay=0.5))
        state = new_state(cfg)
        for p in state.model.parameters():
            p.grad = torch.zeros_like(p)
            if not p.any():  # zero-initialised output layers: decay would not show
                p.data.normal_()
        before = {n: p.detach().clone() for n, p in state.model.named_parameters()}
        state.optimizer.step()
        after = dict(state.model.named_parameters())
        shrunk = {n for n in before if not torch.equal(before[n], after[n])}
        for n in shrunk:
            torch.testing.assert_close(after[n], before[n] * (1 - 0.1 * 0.5))
        assert any(n.endswith("weight") and before[n].ndim >= 2 for n in shrunk), cfg.stage
        kept = {n for n in before if n not in shrunk}
        assert all(before[n].ndim < 2 or "null" in n or n.endswith("pos") for n in kept), kept - {
            n for n in kept if before[n].ndim < 2
        }
        assert any("null" in n for n in kept), cfg.stage
        assert any("norm" in n or ".ln" in n for n in kept), cfg.stage


def test_heldout_split_is_stable_and_sized() -> None:
    ids = [f"img-{i}" for i in range(5000)]
    mask = heldout_mask(ids, 0.1)
    assert 0.08 < mask.mean() < 0.12
    # the same id is held out whatever else is in the batch, in any order
    assert np.array_equal(heldout_mask(ids[::-1], 0.1), mask[::-1])
    assert np.array_equal(heldout_mask(ids[:7], 0.1), mask[:7])


def test_prepare_batch_decodes_and_projects(data) -> None:
    image = np.zeros((40, 48, 3), np.uint8)
    image[:, 4:44] = (10, 200, 30)  # centre-crop of the 48 px wide image is all green
    table = pa.table(
        {
            "id": ["a", "b"],
            "image": [png(image), png(image)],
            "text_emb": pa.FixedSizeListArray.from_arrays(
                pa.array(np.arange(8.0), pa.float32()), 4
            ),
            "text_tokens": pa.array([[5, 6, 7], [8]], pa.list_(pa.int32())),
        }
    )
    spec = StageColumns(("image", "text_emb", "text_tokens"), image_size=16, context_length=5)
    parts = [prepare_batch(table, spec, s, 0.5) for s in ("train", "heldout")]
    parts = [p for p in parts if isinstance(p, dict)]  # an empty split is an empty block
    both = {k: np.concatenate([p[k] for p in parts]) for k in spec.columns}
    assert both["image"].shape == (2, 3, 16, 16) and both["image"].dtype == np.uint8
    assert np.abs(both["image"][0, :, 8, 8].astype(int) - (10, 200, 30)).max() <= 2
    assert both["text_tokens"].shape == (2, 5)
    assert sorted(both["text_tokens"][:, 0].tolist()) == [5, 8]
    assert both["text_emb"].shape == (2, 4) and both["text_emb"].dtype == np.float32

    empty = prepare_batch(table, spec, "heldout", 0.0)  # no row held out: an empty block
    assert empty.num_rows == 0 and set(empty.column_names) == set(spec.columns)
    assert "Tensor" in str(empty.schema.field("image").type)  # not pickled objects

    broken = table.set_column(1, "image", pa.array([b"not a png", png(image)]))
    with pytest.raises(DataError, match="row 'a'.*do not decode"):
        prepare_batch(broken, StageColumns(("image",), image_size=16), "train", 0.0)


def test_prior_never_reads_image_bytes(data, ray_session) -> None:
    from training.data import read_split

    cfg = plan("prior", data["table"], str(data["root"] / "p-cols"), overrides=tiny("prior")).stage
    cols = stage_for(cfg).columns()
    assert "image" not in cols.columns
    ds = read_split(read_table_info(data["table"]), cols, "train", 0.2)
    assert "image" not in ds.schema().names
    assert "image" in stage_for(preset("decoder")[0]).columns().columns


def test_heldout_rows_come_in_table_order_every_time(data, ray_session) -> None:
    from training.cli import _in_file_order
    from training.data import read_split

    info = read_table_info(data["table"])
    cols = StageColumns(("image_emb",))
    # the reference: the held-out rows of each file, files in the table's order
    want = np.concatenate(
        [prepare_batch(pq.read_table(f), cols, "heldout", 0.2)["image_emb"] for f in info.files]
    )
    for _ in range(3):  # unordered execution would interleave blocks differently per run
        ds = _in_file_order(read_split(info, cols, "heldout", 0.2))
        got = np.concatenate([b["image_emb"] for b in ds.iter_batches(batch_format="numpy")])
        assert np.array_equal(got, want)


# ---------------------------------------------------------------------- checks before starting
def test_refuses_a_table_from_another_clip(data, tmp_path) -> None:
    other = save_tiny_clip(str(tmp_path / "other"), seed=5)
    write_table(str(tmp_path / "other_table"), other, n=16)
    mine = data["clip"].identity
    over = tiny("prior") | {"clip": {"fingerprint": mine.fingerprint}}
    with pytest.raises(DataError, match="embedded with CLIP.*fingerprint"):
        plan("prior", str(tmp_path / "other_table"), str(tmp_path / "p"), overrides=over)
    # an embedding size set in the config must match the table's
    over = tiny("decoder") | {"net": {**TINY["decoder"]["net"], "clip_dim": 64}}
    with pytest.raises(DataError, match=r"dim 32.*expects CLIP embeddings of size 64"):
        plan("decoder", data["table"], str(tmp_path / "d"), overrides=over)
    with pytest.raises(DataError, match="no image column"):
        plan(
            "decoder",
            str(data["root"] / "noimage"),
            str(tmp_path / "d2"),
            overrides=tiny("decoder"),
        )
    with pytest.raises(DataError, match="no embedding table"):
        plan("prior", str(tmp_path / "nowhere"), str(tmp_path / "p3"))


def test_preset_dimensions_adapt_to_the_table(data) -> None:
    info = read_table_info(data["table"])
    prior, _ = preset("prior", "full")  # reads text tokens
    bound = bind_to_table(prior, info, explicit=set())
    ident = data["clip"].identity
    assert bound.net.embed_dim == ident.embed_dim == 32
    assert bound.net.text_width == ident.text_width and bound.net.max_text_len == 16
    assert bound.clip == table_clip(info)
    assert (bound.clip.fingerprint, bound.clip.context_length) == (ident.fingerprint, 16)
    with pytest.raises(DataError, match="text width"):
        bind_to_table(prior, info, explicit={"net.text_width"})


def test_decoder_whitens_the_table_with_the_configs_floor(data) -> None:
    """``net.clip_whiten_floor`` reaches the fit: a low floor brings the directions of the
    training embeddings to about unit scale, a high one keeps all but the strongest small."""
    info = read_table_info(data["table"])
    files = tuple(info.files)
    cfg = bind_to_table(preset("decoder", "quick")[0], info, explicit=set())
    emb = torch.from_numpy(train_embeddings(files, 10_000, 0.2)[0]).float()
    spectra = {}
    for floor in (1e-4, 0.5):
        c = replace(cfg, net=replace(cfg.net, clip_whiten_floor=floor))
        model = build_model(c)
        assert stage_for(c).prepare(model, files, 0.2)
        z = (emb - model.net.clip_mean) @ model.net.clip_whitening
        spectra[floor] = torch.linalg.eigvalsh(torch.cov(z.T.double()))
    low, high = spectra[1e-4], spectra[0.5]  # ascending; the tiny table spans few directions
    assert (low[-8:] > 0.9).all() and low.max() < 1.01
    assert high.max() < 0.7 and high[-8] < low[-8] / 2


def test_run_location_and_existing_runs(tmp_path) -> None:
    assert run_location("s3://b/x/prior", None) == ("s3://b/x", "prior.run")
    assert run_location("s3://b/prior/", "s3://c/runs") == ("s3://c/runs", "prior.run")
    assert run_location(str(tmp_path / "dec"), None) == (str(tmp_path), "dec.run")
    with pytest.raises(UserError, match="needs a key inside the bucket"):
        run_location("s3://bucket", None)
    assert latest_checkpoint(str(tmp_path / "none")) is None


# ---------------------------------------------------------------------- the loop (local mode)
def test_decoder_with_text_states_writes_sample_grids(data, ray_session, tmp_path) -> None:
    over = tiny("decoder")
    over["net"]["text_width"] = 32  # conditions on CLIP token states computed in the loop
    job = plan("decoder", data["table"], str(tmp_path / "dec"), overrides=over, workers=0)
    assert job.stage.net.text_width == 32 and job.stage.net.clip_dim == 32
    outcome = execute(job)
    grid = Image.open(outcome.metrics["samples_png"])
    assert grid.size == (4 * 16, 2 * 16)  # true images above, samples below
    assert {"sample_clip_cos", "true_clip_cos"} <= set(outcome.metrics)
    assert load_stage(str(tmp_path / "dec")).config.net.text_width == 32


def test_upsampler_reports_psnr_beside_bicubic(data, ray_session, tmp_path) -> None:
    job = plan(
        "upsampler", data["table"], str(tmp_path / "up"), overrides=tiny("upsampler"), workers=0
    )
    m = execute(job).metrics
    assert m["bicubic_psnr"] > 15 and math.isfinite(m["sample_psnr"])
    assert m["clean_bicubic_psnr"] > m["bicubic_psnr"]  # the corruption costs bicubic PSNR
    assert math.isfinite(m["clean_sample_psnr"])
    assert Image.open(m["samples_png"]).size == (4 * 32, 3 * 32)


def test_nan_loss_stops_with_a_clear_message(data, ray_session, tmp_path) -> None:
    job = plan(
        "prior",
        data["table"],
        str(tmp_path / "p"),
        overrides=tiny("prior", debug_nan_at_step=6),
        workers=0,
    )
    with pytest.raises(
        UserError, match="diverged at step 6.*no checkpoint was written after step 4"
    ):
        execute(job)
    assert not (tmp_path / "p").exists()


def test_a_time_limit_cuts_a_run_only_when_steps_remain(data, ray_session, tmp_path) -> None:
    """A limit that has passed by the first log step stops an 8-step run at step 2 and
    says so; a 2-step run that reaches its last step as the limit passes is complete."""
    runs = {}
    for steps in (2, 8):
        over = tiny("prior", steps=steps, checkpoint_every=2, time_limit_minutes=1e-6)
        out = tmp_path / f"p{steps}"
        execute(plan("prior", data["table"], str(out), overrides=over, workers=0))
        runs[steps] = json.loads((out / "training.json").read_text())
    assert runs[2]["steps_done"] == 2 and runs[2]["stopped_early"] is None
    assert runs[8]["steps_done"] == 2 and "time limit" in runs[8]["stopped_early"]


def test_stepper_refuses_nan_data_without_touching_the_weights(data) -> None:
    cfg = plan("prior", data["table"], "/nonexistent/p", overrides=tiny("prior")).stage
    cfg = replace(cfg, net=replace(cfg.net, text_width=0))
    state = new_state(cfg)
    before = {k: v.clone() for k, v in state.model.state_dict().items()}
    stepper = Stepper(stage_for(cfg), state.model, state)
    emb = torch.nn.functional.normalize(torch.randn(8, 32), dim=-1)
    bad = {
        "text_emb": emb,
        "image_emb": emb.clone().index_fill_(0, torch.tensor([3]), float("nan")),
    }
    out = stepper(bad, lr=1e-3)
    assert not out.finite and state.step == 0 and state.ema.updates == 0
    assert all(torch.equal(v, before[k]) for k, v in state.model.state_dict().items())
    assert stepper({"text_emb": emb, "image_emb": emb}, lr=1e-3).finite and state.step == 1


def test_bf16_and_channels_last_steps_follow_fp32_steps(data) -> None:
    """The settings the numerics probe may pick change speed, not what is learnt: bf16
    autocast and channels-last steps keep fp32 weights and move them like fp32 steps."""
    from unclip.numerics import Numerics

    cfg = plan("decoder", data["table"], "/nonexistent/d", overrides=tiny("decoder")).stage
    g = torch.Generator().manual_seed(0)
    batch = {
        "image": torch.randint(0, 256, (8, 3, 16, 16), generator=g, dtype=torch.uint8),
        "image_emb": torch.nn.functional.normalize(torch.randn(8, 32, generator=g), dim=-1),
    }
    runs = {}
    for n in (Numerics("none"), Numerics("bf16"), Numerics("none", "channels_last")):
        torch.manual_seed(0)  # same init, same timesteps and noise
        state = new_state(cfg, "cpu", n.amp)
        n.apply(state.model)
        flat = lambda m: torch.cat([p.detach().reshape(-1) for p in m.parameters()])  # noqa: E731
        start = flat(state.model)
        stepper = Stepper(stage_for(cfg), state.model, state, settings=n)
        losses = [float(stepper(batch, lr=1e-3).loss) for _ in range(8)]
        assert all(p.dtype == torch.float32 for p in state.model.parameters())
        moved = flat(state.model) - start
        runs[n.label] = (np.array(losses), moved)
    l32, d32 = runs["fp32/contiguous/1t"]
    for label in ("bf16/contiguous/1t", "fp32/channels_last/1t"):
        other, moved = runs[label]
        assert np.all(np.abs(other - l32) < 0.05 * l32 + 1e-3), label
        assert torch.nn.functional.cosine_similarity(moved, d32, dim=0) > 0.9, label


def test_ar_prior_fits_its_codebook_on_training_rows_then_trains(
    data, ray_session, tmp_path
) -> None:
    from unclip.ar_prior import ARPrior

    job = plan(
        "ar_prior", data["table"], str(tmp_path / "ar"), overrides=tiny("ar_prior"), workers=0
    )
    assert job.stage.net.embed_dim == 32 and job.stage.net.pca_dims == 32  # clamped to the CLIP
    metrics = execute(job).metrics
    assert metrics["codebook_cos"] > 0.95  # 32 of 32 components, 16 buckets: near lossless
    assert -1 <= metrics["heldout_cos"] <= 1 and -1 <= metrics["baseline_cos"] <= 1
    model = load_stage(str(tmp_path / "ar"))
    assert isinstance(model, ARPrior) and bool(model.fitted)
    # the EMA restarted after fitting: the saved basis is the fitted one, not a blend with 0
    rows = torch.tensor(
        np.stack(pq.read_table(data["table"]).column("image_emb").to_pylist())
    ).float()
    rows = rows[~torch.from_numpy(heldout_mask(ids_of(data["table"]), 0.2))]
    assert torch.allclose(model.pca_mean, rows.mean(0), atol=1e-5)


def ids_of(table: str) -> list[str]:
    return pq.read_table(table, columns=["id"]).column("id").to_pylist()


def test_cli_trains_the_prior_into_the_design_checkpoint(data, ray_session, tmp_path, capsys):
    cfg = tmp_path / "prior.yaml"
    cfg.write_text(json.dumps(tiny("prior")))
    out = str(tmp_path / "prior")
    args = ["train", "prior", "--data", data["table"], "--out", out, "--config", str(cfg)]
    assert main([*args, "--workers", "0"]) == 0
    assert "final checkpoint (step 8) written to" in capsys.readouterr().out

    # the stage checkpoint of docs/formats.md: config + EMA safetensors + resumable train state
    config = load_stage_config(out)
    assert config.clip == table_clip(read_table_info(data["table"]))
    assert config.net.embed_dim == 32 and config.net.width == 32  # table dims, file sizes
    model = load_stage(out)
    state = load_train_state(out)  # weights_only=True inside
    assert state["step"] == 8 and state["ema_updates"] == 8
    assert set(state) >= {"model", "optimizer", "ema", "rng"}
    for k, v in model.state_dict().items():
        assert torch.equal(v, state["ema"][k])  # model.safetensors holds the EMA weights
    assert any(not torch.equal(state["model"][k], state["ema"][k]) for k in state["ema"])
    assert json.loads((tmp_path / "prior" / "train_config.json").read_text())["steps"] == 8
    summary = json.loads((tmp_path / "prior" / "training.json").read_text())
    assert summary["steps_done"] == summary["steps_planned"] == 8
    assert summary["stopped_early"] is None and summary["numerics"]
    all_records = [json.loads(x) for x in (tmp_path / "prior.run" / "metrics.jsonl").open()]
    head = all_records[0]  # what the numerics probe chose, before step 1
    assert head["step"] == 0 and head["numerics"] == summary["numerics"]
    measured = {**head["numerics_timings"], **head.get("numerics_thread_timings", {})}
    assert head["numerics"] in measured or head["numerics_source"] == "fixed"
    records = [r for r in all_records if "loss" in r]
    assert [r["step"] for r in records] == [2, 4, 6, 8]
    evals = [r for r in records if "heldout_cos" in r]
    assert [r["step"] for r in evals] == [4, 8]
    assert all(math.isfinite(r["loss"]) and -1 <= r["baseline_cos"] <= 1 for r in evals)
    assert evals[-1]["heldout_rows"] > 0

    # user errors: one line on stderr, exit 1
    assert main([*args, "--workers", "0"]) == 1  # refuses to overwrite a checkpoint
    assert "already holds a stage checkpoint" in capsys.readouterr().err
    args[5] = str(tmp_path / "other")
    assert main([*args[:-2], "--config", str(tmp_path / "missing.yaml")]) == 1
    assert main(["train", "prior", "--data", str(tmp_path), "--out", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "missing.yaml" in err[0] and "no embedding table" in err[1]
    assert (
        main(["train", "prior", "--data", data["table"], "--out", str(tmp_path / "y"), "--resume"])
        == 1
    )
    assert "nothing to resume" in capsys.readouterr().err


class _Shard:
    """A dataset shard stand-in: ``iter_torch_batches`` over rows 0..n-1."""

    def __init__(self, n: int) -> None:
        self.n, self.passes = n, 0

    def iter_torch_batches(self, batch_size: int, device: str):
        self.passes += 1
        for i in range(0, self.n, 3):  # uneven blocks, as Ray Data yields them
            rows = torch.arange(i, min(i + 3, self.n))
            yield {"row": rows, "image_emb": rows[:, None].float().expand(-1, 2)}


def test_cached_data_is_read_once_and_every_epoch_visits_each_row_once() -> None:
    from training.harness import in_memory_batches

    shard = _Shard(10)
    batches = in_memory_batches(shard, TrainConfig(batch_size=4), torch.device("cpu"), seed=0)
    epochs = [[next(batches) for _ in range(2)] for _ in range(3)]  # 10 rows: 2 full batches
    assert shard.passes == 1  # the data pipeline ran once, not once per epoch
    orders = []
    for epoch in epochs:
        rows = torch.cat([b["row"] for b in epoch])
        assert len(set(rows.tolist())) == 8  # no row twice within an epoch
        assert torch.equal(torch.cat([b["image_emb"][:, 0] for b in epoch]).long(), rows)
        orders.append(rows.tolist())
    assert orders[0] != orders[1]  # a fresh order every epoch
    with pytest.raises(DataError, match="fewer than one batch"):
        next(in_memory_batches(_Shard(3), TrainConfig(batch_size=4), torch.device("cpu"), 0))


def test_a_split_too_big_for_memory_is_streamed_with_a_message(data, capsys) -> None:
    from training.cli import fit_cache, split_bytes

    job = plan("decoder", data["table"], "/nonexistent/d", overrides=tiny("decoder"))
    need = split_bytes(job)
    assert need > 0
    assert fit_cache(job, budget=need) is job  # fits: cached
    streamed = fit_cache(job, budget=need - 1)
    assert streamed.run.cache_data is False and streamed.stage == job.stage
    assert "streaming it through Ray Data" in capsys.readouterr().out
