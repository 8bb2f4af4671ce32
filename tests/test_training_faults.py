"""Real multi-worker Ray Train runs and their faults (slow: each run starts a worker group).

- a training worker process is SIGKILLed mid-run: the run restarts from its last
  checkpoint, reaches the requested step and its final weights load;
- the driver is SIGKILLed: ``--resume`` continues from the last checkpoint, not from zero;
- a NaN loss stops the run with a clear message and no checkpoint after it;
- checkpoints and the final stage checkpoint go to S3 (moto over HTTP).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from tests.multinode.cluster import wait_for
from tests.tables import write_table
from tests.test_training import TINY, tiny
from tests.tiny import save_tiny_clip
from training.cli import execute, latest_checkpoint, plan
from unclip import fs
from unclip.checkpoint import load_stage, load_train_state
from unclip.errors import UserError

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def table(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("fault-data")
    clip = save_tiny_clip(str(root / "clip"))
    write_table(str(root / "table"), clip, n=128, image_size=32)
    return str(root / "table")


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_worker_killed_mid_run_resumes_from_the_last_checkpoint(
    table, ray_session, tmp_path
) -> None:
    pids = tmp_path / "pids"
    over = tiny("prior", steps=400, checkpoint_every=40, eval_every=200, log_every=20)
    over["train"] |= {"debug_pid_dir": str(pids), "cpus_per_worker": 0.5, "max_failures": 2}
    over["sample_steps"] = 2
    job = plan("prior", table, str(tmp_path / "prior"), overrides=over, workers=2)
    outcome: dict = {}
    thread = threading.Thread(target=lambda: outcome.update(result=execute(job)), daemon=True)
    thread.start()

    run_dir = tmp_path / "prior.run"
    first = wait_for(lambda: latest_checkpoint(str(run_dir)), 240, "a first checkpoint")
    victim = int((pids / "rank1.pid").read_text())
    os.kill(victim, signal.SIGKILL)
    thread.join(timeout=480)
    assert not thread.is_alive(), "the run did not finish after the worker was killed"

    assert outcome["result"].step == 400
    restarted = int((pids / "rank1.pid").read_text())
    assert restarted != victim  # a new worker process took over
    state = load_train_state(str(tmp_path / "prior"))
    assert state["step"] == 400 and state["ema_updates"] == 400
    load_stage(str(tmp_path / "prior"))
    log = records(run_dir)
    resumed = [r["step"] for r in log if r.get("resumed")]
    assert len(resumed) == 1 and resumed[0] >= first[0] >= 40  # from a checkpoint, not 0
    steps = [r["step"] for r in log if "loss" in r]  # the training log lines
    assert steps == sorted(set(steps)) and steps[-1] == 400  # lines after it were replaced


def run_cli(*args: str, env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "unclip.cli", "train", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def cli_env(**extra: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1", **extra)
    return env


@pytest.mark.extended
def test_driver_killed_then_resume_continues_from_the_last_checkpoint(
    table, ray_session, tmp_path
) -> None:
    import ray

    address = ray.get_runtime_context().gcs_address  # the CLI joins this test's Ray
    config = tmp_path / "prior.yaml"
    over = tiny("prior", steps=600, checkpoint_every=50, eval_every=300, log_every=25)
    over["sample_steps"] = 2
    config.write_text(json.dumps(over))
    out, run_dir = tmp_path / "prior", tmp_path / "prior.run"
    args = ["prior", "--data", table, "--out", str(out), "--config", str(config)]
    env = cli_env(RAY_ADDRESS=address)

    driver = run_cli(*args, env=env)
    try:
        killed_at = wait_for(lambda: latest_checkpoint(str(run_dir)), 240, "a checkpoint")[0]
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
    assert killed_at < 600 and not out.exists()
    # Ray ends the dead driver's trainer; wait until its CPUs are free again
    wait_for(lambda: ray.available_resources().get("CPU", 0) >= 1.9, 120, "free CPUs")
    last = latest_checkpoint(str(run_dir))[0]

    # without --resume the existing run is not clobbered
    again = run_cli(*args, env=env)
    text, _ = again.communicate(timeout=120)
    assert again.returncode == 1 and "pass --resume" in text

    resumed = run_cli(*args, "--resume", env=env)
    text, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, text
    assert f"resuming from step {last}" in text and f"resuming at step {last} of 600" in text
    assert "starting at step 0" not in text
    assert load_train_state(str(out))["step"] == 600
    log = records(run_dir)
    assert [r["step"] for r in log if r.get("resumed")] == [last]
    steps = [r["step"] for r in log if "loss" in r]  # the training log lines
    assert steps == sorted(set(steps)) and steps[0] == 25 and steps[-1] == 600

    # resuming a finished run only re-exports its final checkpoint
    done = run_cli(*args, "--resume", env=env)
    text, _ = done.communicate(timeout=300)
    assert done.returncode == 0, text
    assert "final checkpoint (step 600)" in text


@pytest.mark.extended
def test_nan_loss_stops_before_writing_a_broken_checkpoint(table, ray_session, tmp_path) -> None:
    over = tiny("prior", steps=40, checkpoint_every=5, debug_nan_at_step=13)
    over["train"]["cpus_per_worker"] = 0.5
    job = plan("prior", table, str(tmp_path / "prior"), overrides=over, workers=2)
    with pytest.raises(
        UserError, match="diverged at step 13.*no checkpoint was written after step 10"
    ):
        execute(job)
    assert latest_checkpoint(str(tmp_path / "prior.run"))[0] == 10
    assert not (tmp_path / "prior").exists()


def test_checkpoints_and_final_weights_on_s3(table, s3_bucket, tmp_path) -> None:
    """The CLI in its own process and its own local Ray (so workers see the S3 endpoint)."""
    config = tmp_path / "decoder.yaml"
    over = tiny("decoder", steps=10, checkpoint_every=5)
    config.write_text(json.dumps(over))
    out = f"{s3_bucket}/models/decoder"
    proc = run_cli(
        "decoder",
        *("--data", table, "--out", out, "--config", str(config)),
        *("--storage", f"{s3_bucket}/runs"),
        env=cli_env(RAY_ADDRESS="local"),
    )
    text, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, text
    run_dir = f"{s3_bucket}/runs/decoder.run"
    assert latest_checkpoint(run_dir) == (10, f"{run_dir}/checkpoint_00000010")
    assert fs.exists(f"{run_dir}/checkpoint_00000005/train_state.pt")
    assert fs.exists(f"{run_dir}/metrics.jsonl")
    model = load_stage(out)
    assert model.config.net.image_size == TINY["decoder"]["net"]["image_size"]
    assert load_train_state(out)["step"] == 10
    assert isinstance(next(iter(model.state_dict().values())), torch.Tensor)
