"""Training across nodes, a node lost mid-run and a replacement added (issue 15, item 2).

A head with no CPUs and three worker nodes of 1 logical CPU. Two DDP workers (gloo) of 0.6
CPU cannot share a node, so they run on two nodes and the third keeps a whole CPU for Ray
Data's read tasks. After the first committed checkpoint the node of one training worker is
killed and a new node joins: Ray Train restarts the worker group (FailureConfig), the
workers resume from the last committed checkpoint and the run ends at the planned step.
"""

from __future__ import annotations

import json
import os
import threading
import time
import traceback
from typing import Any

from tests.multinode.cluster import cluster, node_of_actors, wait_for
from tests.tables import write_table
from tests.test_training import tiny
from tests.tiny import save_tiny_clip
from training.cli import execute, latest_checkpoint, plan
from unclip.checkpoint import load_stage, load_train_state

STEPS = 400
NODE = {"num_cpus": 1, "object_store_memory": 150 * 2**20}


def run(workdir: str) -> dict[str, Any]:
    clip = save_tiny_clip(os.path.join(workdir, "clip"))
    table = os.path.join(workdir, "table")
    write_table(table, clip, n=128, image_size=32)
    over = tiny("prior", steps=STEPS, checkpoint_every=40, eval_every=200, log_every=20)
    over["train"] |= {"cpus_per_worker": 0.6, "max_failures": 3}
    over["sample_steps"] = 2
    out = os.path.join(workdir, "prior")
    run_dir = out + ".run"
    job = plan("prior", table, out, overrides=over, workers=2)
    result: dict[str, Any] = {"steps": STEPS}
    with cluster({"num_cpus": 0}, [NODE, NODE, NODE]) as c:
        workers = {n.node_id: n for n in c.worker_nodes}
        outcome: dict[str, Any] = {}

        def train() -> None:
            try:
                outcome["step"] = execute(job).step
            except Exception as e:  # noqa: BLE001 - recorded for the test
                outcome["error"] = "".join(traceback.format_exception_only(e)).strip()

        thread = threading.Thread(target=train, daemon=True)
        t0 = time.monotonic()
        thread.start()
        first = wait_for(
            lambda: latest_checkpoint(run_dir) or not thread.is_alive(), 300, "a checkpoint"
        )
        result["checkpoint_before_loss"] = first[0] if isinstance(first, tuple) else None
        nodes = node_of_actors("RayTrainWorker")
        result["worker_nodes_before_loss"] = sorted(set(nodes.values()))
        victim = next(n for n in nodes.values() if n in workers)
        c.remove_node(workers[victim], allow_graceful=False)
        result["removed"] = victim
        result["last_checkpoint_at_loss"] = (latest_checkpoint(run_dir) or (None,))[0]
        c.add_node(**NODE)  # the replacement
        thread.join(timeout=480)
        result["finished"] = not thread.is_alive()
        result["seconds"] = round(time.monotonic() - t0, 1)
        result["error"] = outcome.get("error")
        result["step"] = outcome.get("step")
        result["worker_nodes_after"] = sorted(
            set(node_of_actors("RayTrainWorker").values()) - {victim} - set(nodes.values())
        )
    if outcome.get("step"):
        state = load_train_state(out)
        result["final_step"] = state["step"]
        result["ema_updates"] = state["ema_updates"]
        load_stage(out)
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        log = [json.loads(line) for line in f]
    result["resumed_at"] = [r["step"] for r in log if r.get("resumed")]
    result["losses"] = [(r["step"], r["loss"]) for r in log if "loss" in r]
    return result
