"""A head and worker nodes of a local multi-node Ray, and helpers shared by the scenarios."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def cluster(head: dict[str, Any], workers: list[dict[str, Any]]) -> Iterator[Any]:
    """A ``Cluster`` with ``head`` (add_node kwargs) and one node per ``workers`` entry; this
    process is its driver. Shut down (driver first) on exit."""
    import ray

    from serving.cli import set_serve_env_defaults

    set_serve_env_defaults()
    os.environ.pop("RAY_ADDRESS", None)
    c = _start(head, workers)
    try:
        ray.init(  # Cluster.connect() without the driver's log stream
            address=c.address,
            namespace="serve",
            log_to_driver=False,
            runtime_env={"env_vars": {"PYTHONPATH": os.getcwd()}},
        )
        c.connected = True
        ray.data.DataContext.get_current().enable_progress_bars = False
        yield c
    finally:
        ray.shutdown()
        c.shutdown()


def _start(head: dict[str, Any], workers: list[dict[str, Any]], attempts: int = 3) -> Any:
    """The nodes, started again if one times out: Ray gives a new node 30 s to register,
    which a loaded (or briefly paused) machine can miss. Ray's default node health checks
    are kept: faster ones (1 s period, 3 misses) declared live nodes dead on a loaded
    2-core machine, whose niced raylets could not answer in time."""
    from ray.cluster_utils import Cluster

    for attempt in range(attempts):
        c = Cluster(
            initialize_head=True,
            head_node_args=head,
        )
        try:
            for w in workers:
                c.add_node(**w)
            c.wait_for_nodes()
            return c
        except Exception as e:  # noqa: BLE001 - Ray raises a bare Exception on a timeout
            c.shutdown()
            if attempt == attempts - 1 or "timed out" not in str(e):
                raise
            print(f"cluster start failed ({e}); starting again", flush=True)
    raise AssertionError("unreachable")


def alive_nodes() -> list[str]:
    import ray

    return [n["NodeID"] for n in ray.nodes() if n["Alive"]]


def node_of_actors(class_part: str, alive_only: bool = False) -> dict[str, str]:
    """{actor id: node id} of the actors (live, or also dead) whose class name contains
    ``class_part`` (read from the GCS: no dashboard needed)."""
    from ray._private import state

    return {
        aid: a["Address"]["NodeID"]
        for aid, a in state.actors().items()
        if class_part in a.get("ActorClassName", "")
        and (not alive_only or str(a.get("State")) in ("ALIVE", "2"))
        and a["Address"]["NodeID"]
    }


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, poll: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


def write_result(workdir: str, result: dict[str, Any]) -> None:
    with open(os.path.join(workdir, "result.json"), "w") as f:
        json.dump(result, f, indent=2, default=str)


def nodes_of_tasks(name_part: str) -> set[str]:
    """Nodes that ran tasks whose name contains ``name_part`` (task events from the GCS)."""
    from ray._private import state

    found = set()
    for ev in state.state._get_all_task_events():
        if name_part in ev.task_info.name and ev.state_updates.node_id:
            found.add(ev.state_updates.node_id.hex())
    return found
