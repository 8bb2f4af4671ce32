"""Checkpoint commit markers: only complete, intact checkpoints are resumed from, and a damaged
newest one gives way to the one before it (no Ray needed: the run directory is plain files)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest

from tests.tiny import save_tiny_clip, tiny_configs
from training.runs import checkpoint_dir_name, latest_checkpoint, newest_loadable
from unclip.checkpoint import (
    COMMIT,
    CheckpointError,
    load_committed_train_state,
    load_stage,
    save_stage,
    verify_commit,
)
from unclip.models import build_model
from unclip.schema import DataError


@pytest.fixture(scope="module")
def prior_cfg(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    clip = save_tiny_clip(str(tmp_path_factory.mktemp("clip") / "clip"))
    return tiny_configs(clip)[0]


def _save(run: Path, step: int, cfg) -> Path:  # noqa: ANN001
    d = run / checkpoint_dir_name(step)
    save_stage(str(d), cfg, build_model(cfg).state_dict(), train_state={"step": step})
    return d


def test_a_checkpoint_is_committed_last_with_sizes_and_checksums(tmp_path: Path, prior_cfg) -> None:  # noqa: ANN001
    d = _save(tmp_path, 3, prior_cfg)
    files = json.loads((d / COMMIT).read_text())["files"]
    assert set(files) == {"config.json", "model.safetensors", "train_state.pt"}
    assert files["train_state.pt"]["size"] == (d / "train_state.pt").stat().st_size
    assert verify_commit(str(d)) and load_committed_train_state(str(d))["step"] == 3

    state = d / "train_state.pt"
    state.write_bytes(state.read_bytes()[:100])  # truncated, as by a crash mid-upload
    with pytest.raises(CheckpointError, match="train_state.pt is damaged"):
        load_committed_train_state(str(d))

    # a checkpoint from before commit markers still loads, for sampling and for resuming
    old = _save(tmp_path, 4, prior_cfg)
    (old / COMMIT).unlink()
    assert not verify_commit(str(old))
    assert load_committed_train_state(str(old))["step"] == 4
    load_stage(str(old))
    # a marker from another version is refused with a message that says so
    (old / COMMIT).write_text(json.dumps({"format": 99, "files": {}}))
    with pytest.raises(CheckpointError, match="format 99"):
        verify_commit(str(old))


def test_resume_skips_uncommitted_and_falls_back_from_a_damaged_newest(
    tmp_path: Path,
    prior_cfg,  # noqa: ANN001
) -> None:
    run = tmp_path / "prior.run"
    for step in (2, 4, 6, 8):
        _save(run, step, prior_cfg)
    (run / checkpoint_dir_name(8) / COMMIT).unlink()  # crashed before its commit: not complete
    truncated = run / checkpoint_dir_name(6) / "train_state.pt"
    truncated.write_bytes(truncated.read_bytes()[:-10])  # size differs from the marker
    assert latest_checkpoint(str(run)) == (4, str(run / checkpoint_dir_name(4)))

    # same size, other bytes: only the checksum sees it; loading falls back with a warning
    flipped = run / checkpoint_dir_name(4) / "train_state.pt"
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0xFF
    flipped.write_bytes(bytes(data))
    assert latest_checkpoint(str(run))[0] == 4
    candidates = [
        (
            s,
            checkpoint_dir_name(s),
            lambda s=s: contextlib.nullcontext(str(run / checkpoint_dir_name(s))),
        )
        for s in (2, 4)
    ]
    with pytest.warns(UserWarning, match="step 4 cannot be resumed from"):
        state = newest_loadable(candidates)
    assert state is not None and state["step"] == 2
    assert newest_loadable([]) is None
    with (
        pytest.raises(DataError, match="no checkpoint of this run can be resumed"),
        pytest.warns(UserWarning),
    ):
        newest_loadable(candidates[1:])


def test_a_run_from_before_commit_markers_resumes_as_before(tmp_path: Path, prior_cfg) -> None:  # noqa: ANN001
    run = tmp_path / "old.run"
    for step in (2, 4):
        (_save(run, step, prior_cfg) / COMMIT).unlink()
    (run / checkpoint_dir_name(4) / "train_state.pt").unlink()  # incomplete by the old rule
    assert latest_checkpoint(str(run))[0] == 2
