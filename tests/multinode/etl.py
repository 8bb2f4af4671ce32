"""ETL across nodes, a worker node lost mid-run (issue 15, item 1).

A head with no CPUs (the driver) and two worker nodes of 3 logical CPUs each; 2 embedding
actors of 1 CPU, decode tasks of 1 CPU, so both kinds land on both nodes and, with one node
gone, the other still fits 2 actors and a decode task. Once a few parts are committed, the
node of one embedding actor is killed (no graceful drain). The run goes on (Ray restarts
the lost actor and re-runs the lost tasks and blocks) or fails; either way a rerun must
leave every good row exactly once and only the bad inputs in the errors table.
"""

from __future__ import annotations

import os
import threading
import time
import traceback
from typing import Any

from PIL import Image

from pipelines.embed import EmbedOptions, run_embed
from tests.multinode.cluster import cluster, node_of_actors, nodes_of_tasks, wait_for
from tests.test_embed import read_errors, read_rows
from tests.test_embed_inputs import write_good_folder
from tests.tiny import save_tiny_clip
from unclip.schema import parquet_files

ROWS = 640
BAD = {"zero": b"", "text": b"this is not an image"}


def _inputs(root: str) -> list[str]:
    ids = write_good_folder(root, ROWS, size=24)
    for stem, data in BAD.items():
        with open(os.path.join(root, f"{stem}.png"), "wb") as f:
            f.write(data)
        with open(os.path.join(root, f"{stem}.txt"), "w") as f:
            f.write(f"a {stem} picture")
    Image.new("RGB", (24, 24), (200, 0, 0)).save(os.path.join(root, "red.png"))
    with open(os.path.join(root, "red.txt"), "w") as f:
        f.write("a red square")
    return [*ids, "red"]


def run(workdir: str) -> dict[str, Any]:
    clip = os.path.join(workdir, "clip")
    save_tiny_clip(clip)
    inp, out = os.path.join(workdir, "in"), os.path.join(workdir, "out")
    good = _inputs(inp)
    opts = EmbedOptions(
        input=inp,
        output=out,
        clip=clip,
        batch_size=16,
        workers=2,
        cpus_per_worker=1.0,
        image_size=24,
        rows_per_read=32,
        progress=False,
    )
    result: dict[str, Any] = {"good": len(good), "bad": sorted(BAD)}
    node = {"num_cpus": 3, "object_store_memory": 150 * 2**20}
    with cluster({"num_cpus": 0}, [node, node]) as c:
        workers = {n.node_id: n for n in c.worker_nodes}
        outcome: dict[str, Any] = {}

        def first_run() -> None:
            try:
                outcome["summary"] = run_embed(opts, log=lambda _: None)
            except Exception as e:  # noqa: BLE001 - recorded: a failed run is allowed
                outcome["error"] = "".join(traceback.format_exception_only(e)).strip()

        thread = threading.Thread(target=first_run, daemon=True)
        t0 = time.monotonic()
        thread.start()
        wait_for(lambda: len(parquet_files(out)) >= 3 or not thread.is_alive(), 240, "3 parts")
        result["parts_before_loss"] = len(parquet_files(out))
        actors = node_of_actors("Embedder")
        victim = next((n for n in actors.values() if n in workers), next(iter(workers)))
        result["actor_nodes_before_loss"] = sorted(set(actors.values()))
        result["victim_had_actor"] = victim in actors.values()
        result["lost_mid_run"] = thread.is_alive()
        c.remove_node(workers[victim], allow_graceful=False)
        result["removed"] = victim
        thread.join(timeout=300)
        result["first_run_finished"] = not thread.is_alive()
        result["first_run_s"] = round(time.monotonic() - t0, 1)
        result["first_run_error"] = outcome.get("error")
        if "summary" in outcome:
            result["first_run_embedded"] = outcome["summary"].embedded
        result["decode_task_nodes"] = sorted(nodes_of_tasks("decode_units"))
        result["actor_nodes"] = sorted(set(node_of_actors("Embedder").values()))
        rerun = run_embed(opts, log=lambda _: None)  # the second run after a loss
        result["rerun_embedded"] = rerun.embedded
        result["rerun_skipped"] = rerun.skipped
    try:
        rows = read_rows(out)  # raises on a duplicate id
        result["rows"] = sorted(rows)
        result["duplicates"] = None
    except AssertionError as e:
        result["duplicates"] = str(e)
    result["good_ids"] = sorted(good)
    result["errors"] = [(r["id"], r["stage"], r["error"]) for r in read_errors(out)]
    result["temp_left"] = [n for n in os.listdir(out) if n.startswith("_tmp-")]
    return result
