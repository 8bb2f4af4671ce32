"""Multi-node Ray on one machine: node loss in the ETL, training and Serve; GPU scheduling.

Each test runs one scenario of ``tests/multinode/`` in a child process with a cluster of its
own (``ray.cluster_utils.Cluster``: a head and worker nodes that can be removed), apart from
the session's Ray (``tests/multinode/__init__.py`` says why), and asserts on what it saw.
Selected with ``pytest -m multinode``; slow (each starts a cluster, loses a node, recovers).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.multinode, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 600  # a scenario takes 1-3 min on an idle 2-core machine


def scenario(name: str, tmp_path: Path) -> dict[str, Any]:
    """Run ``python -m tests.multinode NAME`` and return its result.json."""
    workdir = tmp_path / name
    workdir.mkdir()
    # Ray's socket paths must stay under 107 bytes: a short temp dir for the cluster
    ray_tmp = tempfile.mkdtemp(prefix="mn", dir=os.environ.get("RAY_TMPDIR", "/tmp"))
    env = dict(os.environ, PYTHONPATH=str(ROOT), RAY_TMPDIR=ray_tmp, PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS", None)
    log = workdir / "scenario.log"
    with open(log, "w") as out:
        proc = subprocess.run(
            [sys.executable, "-m", "tests.multinode", name, str(workdir)],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=TIMEOUT_S,
        )
    text = log.read_text()
    assert proc.returncode == 0, f"scenario {name} failed:\n{text[-4000:]}"
    return json.loads((workdir / "result.json").read_text())


def test_etl_survives_a_lost_node_every_row_exactly_once(tmp_path: Path) -> None:
    r = scenario("etl", tmp_path)
    assert len(r["actor_nodes_before_loss"]) == 2  # embedding actors on both worker nodes
    assert len(r["decode_task_nodes"]) == 2  # and decode tasks too
    assert r["lost_mid_run"] and r["victim_had_actor"]
    assert r["first_run_finished"], "the run hung after the node loss"
    # the run may fail with the node (then the rerun finishes it); here Ray recovered it
    if r["first_run_error"] is None:
        assert r["first_run_embedded"] == r["good"]
        assert r["rerun_embedded"] == 0
    assert r["duplicates"] is None  # read_rows found no id twice
    assert r["rows"] == r["good_ids"]  # every good row, once
    assert sorted(e[0] for e in r["errors"]) == r["bad"]  # errors: the bad inputs only
    assert all(stage == "decode" for _, stage, _ in r["errors"])
    assert r["temp_left"] == []


def test_training_resumes_on_a_replacement_node(tmp_path: Path) -> None:
    r = scenario("train", tmp_path)
    assert len(r["worker_nodes_before_loss"]) == 2  # DDP workers on two nodes
    assert r["finished"] and r["error"] is None, r["error"]
    assert r["step"] == r["final_step"] == r["ema_updates"] == r["steps"]
    assert r["worker_nodes_after"], "no worker ran on the replacement node"
    # resumed once, from the checkpoint committed before the loss (not from step 0)
    assert r["resumed_at"] == [r["last_checkpoint_at_loss"]] and r["resumed_at"][0] >= 40
    steps = [s for s, _ in r["losses"]]
    assert steps == sorted(set(steps)) and steps[-1] == r["steps"]  # one line per step
    # loss continuity: the first loss after the resume is in line with the ones before it
    losses = dict(r["losses"])
    at = r["resumed_at"][0]
    before = [v for s, v in losses.items() if at - 60 <= s <= at]
    after = [v for s, v in losses.items() if at < s <= at + 40]
    assert before and after and max(after) < 2 * max(before), (before, after)


def test_serve_keeps_answering_through_a_lost_node(tmp_path: Path) -> None:
    r = scenario("serve", tmp_path)
    for name, nodes in r["replica_nodes"].items():
        assert len(nodes) == 2, f"{name} replicas not spread over both nodes: {nodes}"
    answers = r["answers"]
    during = [a for a in answers if a["after_loss"]]
    assert during, "no traffic after the node loss"
    bad = [a for a in answers if a["status"] != 200 and not (a["status"] == 503 and a["json"])]
    assert not bad, f"answers other than 200 or a JSON 503: {bad[:5]}"
    assert r["recovered"]  # Serve put the lost replicas back, no hand work
    after = [a for a in answers if a["after_recovery"]]
    assert after and all(a["status"] == 200 for a in after)
    assert r["ready"] == 200
    for name, nodes in r["replica_nodes_after"].items():
        assert r["removed"] not in nodes, name


def test_gpu_scheduling_on_declared_gpus(tmp_path: Path) -> None:
    r = scenario("gpu", tmp_path)
    assert r["cluster_gpus"] == 2.0
    workers = r["train_workers"]
    # each Ray Train worker holds one GPU, on its own GPU node; none left free meanwhile
    assert [len(w["gpu_ids"]) for w in workers] == [1, 1]
    assert sorted(w["node"] for w in workers) == r["gpu_nodes"]
    assert all(w["free_gpus"] == 0.0 for w in workers)
    for w in workers:
        assert "device" not in w, "a worker holding a GPU chose a device without CUDA"
        assert f"Ray granted GPU {w['gpu_ids'][0]} to Ray Train worker" in w["device_error"]
        assert "CUDA is not available" in w["device_error"]
    assert r["free_gpus_after_train"] == 2.0
    for cli in ("cli_train", "cli_embed"):
        out = r[cli]
        assert out["rc"] == 1, out["tail"]
        assert len(out["errors"]) == 1, out["tail"]  # one line, no traceback
        assert "Ray granted GPU" in out["errors"][0] and "CUDA is not available" in out["errors"][0]
        assert "Traceback" not in out["tail"]
    serve = r["serve"]
    for name, gpus in serve["requested_gpus"].items():
        assert (gpus > 0) == (name != "Ingress"), (name, gpus)
    assert not serve["deployed"]
    assert "Ray granted GPU" in serve["error"] and "CUDA is not available" in serve["error"]
    placed = {
        n for name, nodes in serve["replica_nodes"].items() if name != "Ingress" for n in nodes
    }
    assert placed and placed <= set(r["gpu_nodes"])  # GPU stages only on the GPU nodes
    assert r["free_gpus_at_end"] == 2.0  # nothing holds a GPU after the failures
