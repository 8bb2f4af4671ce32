"""GPU scheduling without GPUs (issue 15 item 4, issue 13 item 8).

A head (2 CPUs) and two worker nodes that declare one GPU each (``num_gpus=1``; the machine
has none, so CUDA is absent on both). What must hold:

- Ray Train workers of ``unclip train --gpu`` get one GPU each (Ray's resource view drops to
  0 free GPUs while they run; each sees its accelerator id) and the device chosen from those
  ids fails with the one clear message instead of computing on the CPU;
- ``unclip train --gpu`` and ``unclip embed --gpus-per-worker 1`` end with that message as
  one line and exit 1 (their GPU check is granted a GPU, then finds no CUDA);
- the Serve GPU config (``serving/config.yaml``) deploys its model stages with GPU shares;
  each replica granted one fails to start with that message, and the deployment says so.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

from tests.conftest import free_port
from tests.multinode.cluster import cluster, node_of_actors
from tests.tables import write_table
from tests.test_embed_inputs import write_good_folder
from tests.test_training import tiny
from tests.tiny import make_tiny_bundle, save_tiny_clip

GPU_NODE = {"num_cpus": 4, "num_gpus": 1, "memory": 24 * 2**30}


def _train_loop(config: dict[str, Any]) -> None:
    """Ray Train worker: what Ray granted, and what the harness makes of it."""
    import ray
    import ray.train

    from training.harness import _device

    rank = ray.train.get_context().get_world_rank()
    seen: dict[str, Any] = {
        "gpu_ids": ray.get_runtime_context().get_accelerator_ids().get("GPU", []),
        "node": ray.get_runtime_context().get_node_id(),
        "free_gpus": ray.available_resources().get("GPU", 0.0),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
    }
    try:
        seen["device"] = str(_device(False, rank))
    except Exception as e:  # noqa: BLE001 - the error is what the test looks at
        seen["device_error"] = f"{type(e).__name__}: {e}"
    with open(os.path.join(config["dir"], f"rank{rank}.json"), "w") as f:
        json.dump(seen, f)
    ray.train.report({"done": 1})


def _train_workers(workdir: str, table: str) -> list[dict[str, Any]]:
    """The project's ScalingConfig for ``--gpu --workers 2``, gloo so the group forms on CPU."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from training.cli import _worker_resources, plan

    job = plan(
        "prior", table, os.path.join(workdir, "p"), overrides=tiny("prior"), workers=2, gpu=True
    )
    seen = os.path.join(workdir, "seen")
    os.makedirs(seen)
    TorchTrainer(
        _train_loop,
        train_loop_config={"dir": seen},
        torch_config=TorchConfig(backend="gloo"),
        scaling_config=ScalingConfig(
            num_workers=job.workers, use_gpu=job.gpu, resources_per_worker=_worker_resources(job)
        ),
        run_config=RunConfig(name="gpu", storage_path=os.path.join(workdir, "runs")),
    ).fit()
    out = []
    for rank in range(2):
        with open(os.path.join(seen, f"rank{rank}.json")) as f:
            out.append(json.load(f))
    return out


def _cli(address: str, *args: str) -> dict[str, Any]:
    env = dict(os.environ, RAY_ADDRESS=address, PYTHONPATH=os.getcwd())
    p = subprocess.run(
        [sys.executable, "-m", "unclip.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    return {"rc": p.returncode, "errors": errors, "tail": p.stderr[-1500:]}


def _serve(workdir: str) -> dict[str, Any]:
    from ray import serve

    from serving.cli import deploy, load_config, serve_config
    from unclip.errors import UserError

    bundle = make_tiny_bundle(os.path.join(workdir, "tiny"))
    config = load_config(None, gpus=2.0)  # what `unclip serve` picks on a cluster with GPUs
    config["proxy_location"] = "HeadOnly"
    config["applications"][0]["runtime_env"] = {"env_vars": {"PYTHONPATH": os.getcwd()}}
    schema = serve_config(config, bundle, port=free_port(), gpus=2.0)
    requested = {
        d.name: getattr(d.ray_actor_options, "num_gpus", None) or 0.0
        for d in schema.applications[0].deployments
    }
    out: dict[str, Any] = {"requested_gpus": requested}
    try:
        deploy(schema, timeout_s=240)
        out["deployed"] = True
    except UserError as e:
        out["deployed"] = False
        out["error"] = str(e)
    out["replica_nodes"] = {
        name: sorted(set(node_of_actors(f"ServeReplica:unclip:{name}").values()))
        for name in requested
    }
    serve.shutdown()
    return out


def run(workdir: str) -> dict[str, Any]:
    import ray

    clip = os.path.join(workdir, "clip")
    table = os.path.join(workdir, "table")
    write_table(table, save_tiny_clip(clip), n=64, image_size=32)
    images = os.path.join(workdir, "images")
    write_good_folder(images, 8, size=24)
    result: dict[str, Any] = {}
    with cluster({"num_cpus": 2}, [GPU_NODE, GPU_NODE]) as c:
        result["gpu_nodes"] = sorted(n.node_id for n in c.worker_nodes)
        result["cluster_gpus"] = ray.cluster_resources().get("GPU", 0.0)
        result["train_workers"] = _train_workers(workdir, table)
        result["free_gpus_after_train"] = ray.available_resources().get("GPU", 0.0)
        result["cli_train"] = _cli(
            c.address,
            *("train", "prior", "--data", table, "--out", os.path.join(workdir, "prior")),
            *("--gpu", "--workers", "2", "--steps", "5"),
        )
        result["cli_embed"] = _cli(
            c.address,
            *("embed", "--input", images, "--output", os.path.join(workdir, "emb")),
            *("--clip", clip, "--workers", "2", "--gpus-per-worker", "1"),
        )
        result["serve"] = _serve(workdir)
        result["free_gpus_at_end"] = ray.available_resources().get("GPU", 0.0)
    return result
