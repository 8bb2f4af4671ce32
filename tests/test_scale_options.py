"""Options for large models (training/scale.py): gradient accumulation, activation
checkpointing, torch.compile, FSDP. Each must change memory or speed, never what is learnt:
the tests compare loss trajectories and weights with the plain path on tiny models."""

from __future__ import annotations

import os
from dataclasses import replace

import numpy as np
import pytest
import torch

import unclip.nn.layers as layers
from tests.tables import write_table
from tests.test_training import tiny
from tests.tiny import save_tiny_clip
from training.cli import execute, plan
from training.harness import Stepper, new_state
from training.presets import TrainConfig
from training.scale import micro_batches, prepare
from training.stages import Batch, Stage, stage_for
from unclip.conditioning import TextCond
from unclip.config import ConfigError
from unclip.errors import UserError


@pytest.fixture(scope="module")
def table(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("scale-data")
    clip = save_tiny_clip(str(root / "clip"))
    write_table(str(root / "table"), clip, n=96, image_size=32)
    return str(root / "table")


def stage_config(stage: str, table: str, **net):
    cfg = plan(stage, table, "/nonexistent/x", overrides=tiny(stage)).stage
    return replace(cfg, net=replace(cfg.net, **net)) if net else cfg


def batch_for(stage: str, rows: int, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    emb = lambda: torch.nn.functional.normalize(torch.randn(rows, 32, generator=g), dim=-1)  # noqa: E731
    if stage == "decoder":
        images = torch.randint(0, 256, (rows, 3, 16, 16), generator=g, dtype=torch.uint8)
        return {"image": images, "image_emb": emb()}
    return {"text_emb": emb(), "image_emb": emb()}


class RowSeeded(Stage):
    """A stage's own loss with each row's random draws (timestep, noise, CFG drops) seeded
    by the row's ``seed``: a batch's loss is then the mean of per-row losses that do not
    depend on which other rows share the batch, so a batch split into micro-batches must
    give the same loss and the same gradients as the whole batch."""

    def __init__(self, inner: Stage) -> None:
        super().__init__(inner.config)
        self.inner = inner

    def text_cond(self, batch: Batch, clip) -> TextCond | None:
        return self.inner.text_cond(batch, clip)

    def loss(self, model, batch: Batch, text: TextCond | None) -> torch.Tensor:
        losses = []
        for i, seed in enumerate(batch["seed"].tolist()):
            torch.manual_seed(seed)
            row = {k: v[i : i + 1] for k, v in batch.items() if k != "seed"}
            row_text = None if text is None else TextCond(text.emb[i : i + 1])
            losses.append(self.inner.loss(model, row, row_text))
        return torch.stack(losses).mean()


def same_update(a: torch.Tensor, b: torch.Tensor) -> None:
    """Weights after the same steps up to float rounding: AdamW's g / sqrt(v) magnifies
    rounding in the few weights whose gradients are ~0 to a fraction of one step (lr 1e-3);
    nearly every other weight agrees to 1e-5."""
    torch.testing.assert_close(a, b, rtol=1e-3, atol=5e-4)
    assert ((a - b).abs() < 1e-5).float().mean() > 0.99


def flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def trajectory(cfg, stage: Stage, batches: list[Batch], grad_accum=1, run=None, seed=0):
    """Losses of one step per batch from a fixed initialisation, and the final weights."""
    torch.manual_seed(seed)
    state = new_state(cfg)
    if run is not None:
        prepare(state.model, run)
    stepper = Stepper(stage, state.model, state, grad_accum=grad_accum)
    losses = []
    for batch in batches:
        torch.manual_seed(seed + state.step)  # the same draws for both paths of a step
        losses.append(float(stepper(batch, lr=1e-3).loss))
    return np.array(losses), flat(state.model), state


@pytest.mark.parametrize("name", ["prior", "decoder"])
def test_two_micro_batches_of_16_make_the_step_of_one_batch_of_32(table, name) -> None:
    cfg = stage_config(name, table, text_width=0)
    stage = RowSeeded(stage_for(cfg))
    batches = []
    for k in range(3):
        b = batch_for(name, 32, seed=k)
        batches.append({**b, "seed": torch.arange(32) + 100 * k})
    whole, w_whole, s1 = trajectory(cfg, stage, batches, grad_accum=1)
    split, w_split, s2 = trajectory(cfg, stage, batches, grad_accum=2)
    np.testing.assert_allclose(split, whole, rtol=1e-5, atol=1e-6)
    same_update(w_split, w_whole)
    assert s1.step == s2.step == 3 and s1.ema.updates == s2.ema.updates == 3
    torch.manual_seed(0)
    assert (w_whole - flat(new_state(cfg).model)).abs().max() > 1e-4  # it trained


def test_micro_batches_split_in_order_and_refuse_uneven_splits() -> None:
    b = {"x": torch.arange(8), "y": torch.arange(8) * 10}
    parts = micro_batches(b, 4)
    assert [p["x"].tolist() for p in parts] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert parts[3]["y"].tolist() == [60, 70]
    assert micro_batches(b, 1) == [b]
    with pytest.raises(ValueError, match="does not split"):
        micro_batches(b, 3)
    with pytest.raises(ConfigError, match="grad_accum must be >= 1 and divide"):
        TrainConfig(batch_size=32, grad_accum=3)


@pytest.mark.parametrize("name", ["prior", "decoder"])
def test_activation_checkpointing_recomputes_and_learns_the_same(table, name, monkeypatch):
    cfg = stage_config(name, table, text_width=0)
    stage = stage_for(cfg)
    batches = [batch_for(name, 8, seed=k) for k in range(3)]
    plain, w_plain, _ = trajectory(cfg, stage, batches)
    calls = count_checkpoint_calls(monkeypatch)
    run = TrainConfig(activation_checkpointing=True)
    ckpt, w_ckpt, state = trajectory(cfg, stage, batches, run=run)
    assert calls[0] > 0  # the blocks really went through torch.utils.checkpoint
    np.testing.assert_allclose(ckpt, plain, rtol=1e-5, atol=1e-6)
    same_update(w_ckpt, w_plain)
    # the checkpoint's weights keep the plain model's names (interchangeable checkpoints)
    assert set(state.model.state_dict()) == set(new_state(cfg).model.state_dict())


def test_checkpointing_reaches_every_block_of_each_stage(table) -> None:
    """UNet levels (decoder, upsampler) and Transformer blocks (both priors)."""
    for name in ("prior", "ar_prior", "decoder", "upsampler"):
        cfg = stage_config(name, table)
        model = new_state(cfg).model
        n = layers.set_activation_checkpointing(model)
        blocks = [m for m in model.modules() if isinstance(m, layers.Checkpointable)]
        assert n == len(blocks) > 0 and all(b.checkpointing for b in blocks), name
        if "prior" in name:
            assert n == cfg.net.layers, name


def count_checkpoint_calls(monkeypatch) -> list[int]:
    calls = [0]
    real = layers.checkpoint

    def counting(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(layers, "checkpoint", counting)
    return calls


def test_checkpointing_is_off_in_evaluation_and_sampling(table, monkeypatch) -> None:
    cfg = stage_config("decoder", table, text_width=0)
    model = new_state(cfg).model
    assert layers.set_activation_checkpointing(model) > 0
    calls = count_checkpoint_calls(monkeypatch)
    model.eval()
    with torch.no_grad():
        model.sample(batch_for("decoder", 2)["image_emb"], None, generator=torch.Generator())
    assert calls[0] == 0


def test_fsdp_is_refused_with_a_clear_message_before_any_worker_starts(table) -> None:
    with pytest.raises(ConfigError, match="train.parallel 'fsdp' is not supported.*ddp"):
        plan("prior", table, "/nonexistent/p", overrides=tiny("prior", parallel="fsdp"))
    with pytest.raises(ConfigError, match="valid choices: ddp, fsdp"):
        plan("prior", table, "/nonexistent/p", overrides=tiny("prior", parallel="zero3"))


@pytest.mark.slow  # inductor compiles C++ for the CPU: a minute or more here
@pytest.mark.extended
def test_compiled_model_learns_like_the_eager_one(table) -> None:
    """torch.compile (inductor, CPU) of the tiny prior's network: same losses within float
    tolerance (the random draws stay eager), same state-dict keys (compiled in place)."""
    cfg = stage_config("prior", table, text_width=0)
    stage = stage_for(cfg)
    batches = [batch_for("prior", 8, seed=k) for k in range(3)]
    eager, w_eager, _ = trajectory(cfg, stage, batches)
    compiled, w_comp, state = trajectory(cfg, stage, batches, run=TrainConfig(compile=True))
    np.testing.assert_allclose(compiled, eager, rtol=1e-4, atol=1e-5)
    same_update(w_comp, w_eager)
    assert set(state.model.state_dict()) == set(new_state(cfg).model.state_dict())


def test_the_ray_loop_runs_with_accumulation_and_checkpointing(table, ray_session, tmp_path):
    """Local mode (in-process) through ``unclip train``'s path with the options on."""
    over = tiny("decoder", grad_accum=2, activation_checkpointing=True, amp="none",
                memory_format="contiguous", threads=1)  # fmt: skip
    job = plan("decoder", table, str(tmp_path / "d"), overrides=over, workers=0)
    out = execute(job)
    assert out.step == job.run.steps
    assert os.path.exists(tmp_path / "d" / "model.safetensors")


def test_a_bad_option_is_one_clear_line(table, tmp_path) -> None:
    with pytest.raises((ConfigError, UserError), match="grad_accum"):
        plan("prior", table, str(tmp_path / "p"), overrides=tiny("prior", grad_accum=3))


def _ddp_rank(rank: int, world: int, port: int, table: str, out: str) -> None:
    """One rank of the DDP test: 3 steps of its own rows, whole batch vs 2 micro-batches."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    cfg = stage_config("prior", table, text_width=0)
    stage = RowSeeded(stage_for(cfg))
    batches = [
        {
            **batch_for("prior", 16, seed=10 * k + rank),
            "seed": torch.arange(16) + 100 * k + 50 * rank,
        }
        for k in range(3)
    ]
    result = {}
    for accum in (1, 2):
        torch.manual_seed(0)  # the same initial weights on both ranks and in both runs
        state = new_state(cfg)
        stepper = Stepper(stage, DistributedDataParallel(state.model), state, grad_accum=accum)
        for batch in batches:
            stepper(batch, lr=1e-3)
        result[accum] = flat(state.model)
    torch.save(result, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow  # two processes, DDP over gloo
def test_micro_batches_under_ddp_match_whole_batches_on_every_rank(table, tmp_path) -> None:
    import torch.multiprocessing as mp

    from tests.conftest import free_port

    mp.spawn(_ddp_rank, args=(2, free_port(), table, str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for accum in (1, 2):  # DDP keeps the ranks identical
        torch.testing.assert_close(r0[accum], r1[accum])
    same_update(r0[2], r0[1])
    torch.manual_seed(0)
    start = flat(new_state(stage_config("prior", table, text_width=0)).model)
    assert (r0[1] - start).abs().max() > 1e-4  # it trained
