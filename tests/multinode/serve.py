"""Serve across nodes, a node lost under traffic (issue 15, item 3).

A head with no CPUs (the driver, the Serve controller and the one HTTP proxy: every node of
this cluster shares one address, so proxies on other nodes could not bind the port) and two
worker nodes of 3 logical CPUs. The CPU config with 2 replicas of every deployment: Serve
spreads them over both nodes, and one node can hold them all. Three clients send
/v1/generate while the node of a Decoder replica is killed; every answer must be a 200 or a
JSON 503, and Serve must bring the lost replicas back on the other node with no hand work.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import requests

from serving.cli import deploy, load_config, serve_config
from tests.conftest import free_port
from tests.multinode.cluster import cluster, node_of_actors, wait_for
from tests.test_serving_http import TEST_LIMITS
from tests.tiny import make_tiny_bundle

NODE = {"num_cpus": 3, "object_store_memory": 150 * 2**20}
CLIENTS = 3
AFTER_LOSS_S = 30.0  # traffic kept up after the loss, then until the replicas are back
BODY = {"prompt": "a small red circle", "num_images": 1, "decoder_steps": 4, "prior_steps": 4}


def _config(bundle: str, port: int) -> Any:
    config = load_config()  # the CPU config, 2 replicas of everything
    config["proxy_location"] = "HeadOnly"
    app = config["applications"][0]
    app["args"]["limits"].update(TEST_LIMITS)
    app["runtime_env"] = {"env_vars": {"PYTHONPATH": os.getcwd()}}
    for d in app["deployments"]:
        d.pop("autoscaling_config", None)
        d["num_replicas"] = 2
    return serve_config(config, bundle, port=port)


def _answer(url: str, seed: int) -> dict[str, Any]:
    t = time.monotonic()
    try:
        r = requests.post(f"{url}/v1/generate", json={**BODY, "seed": seed}, timeout=120)
    except requests.RequestException as e:
        return {"t": t, "status": None, "error": type(e).__name__}
    try:
        body = r.json()
        is_json = True
    except ValueError:
        body, is_json = r.text[:200], False
    kept = None if r.status_code == 200 else body
    return {
        "t": t,
        "s": round(time.monotonic() - t, 2),
        "status": r.status_code,
        "json": is_json,
        "body": kept,
        "retry_after": r.headers.get("Retry-After"),
    }


def run(workdir: str) -> dict[str, Any]:
    from ray import serve

    bundle = make_tiny_bundle(os.path.join(workdir, "tiny"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    result: dict[str, Any] = {}
    with cluster({"num_cpus": 0}, [NODE, NODE]) as c:
        workers = {n.node_id: n for n in c.worker_nodes}
        deploy(_config(bundle, port), timeout_s=300)
        placed = {
            name: sorted(set(node_of_actors(f"ServeReplica:unclip:{name}", True).values()))
            for name in ("Ingress", "TextEncoder", "Prior", "Decoder", "Upsampler1")
        }
        result["replica_nodes"] = placed
        answers: list[dict[str, Any]] = []
        stop = threading.Event()
        loss: dict[str, float] = {}

        def client(k: int) -> None:
            seed = k * 10_000
            while not stop.is_set():
                answers.append(_answer(url, seed))
                seed += 1

        with ThreadPoolExecutor(CLIENTS) as pool:
            for k in range(CLIENTS):
                pool.submit(client, k)
            wait_for(lambda: sum(a["status"] == 200 for a in answers) >= 6, 120, "traffic")
            victim = next(n for n in placed["Decoder"] if n in workers)
            loss["t"] = time.monotonic()
            c.remove_node(workers[victim], allow_graceful=False)
            result["removed"] = victim
            time.sleep(AFTER_LOSS_S)

            def back() -> bool:
                app = serve.status().applications.get("unclip")
                return (
                    bool(app)
                    and app.status == "RUNNING"
                    and all(d.status == "HEALTHY" for d in app.deployments.values())
                )

            result["recovered"] = bool(wait_for(back, 180, "the replicas back", poll=1.0))
            result["recovered_after_s"] = round(time.monotonic() - loss["t"], 1)
            recovered_at = time.monotonic()
            wait_for(
                lambda: sum(a["t"] > recovered_at and a["status"] == 200 for a in answers) >= 6,
                120,
                "requests after recovery",
            )
            stop.set()
        result["ready"] = requests.get(f"{url}/v1/ready", timeout=30).status_code
        result["replica_nodes_after"] = {
            name: sorted(set(node_of_actors(f"ServeReplica:unclip:{name}", True).values()))
            for name in placed
        }
        for a in answers:
            a["after_loss"] = a["t"] >= loss["t"]
            a["after_recovery"] = a["t"] > recovered_at
            del a["t"]
        result["answers"] = answers
        serve.shutdown()
    return result
