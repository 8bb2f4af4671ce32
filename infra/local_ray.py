"""Starting (or joining) Ray for this project's commands.

``init(**kwargs)`` is ``ray.init`` with one difference when it starts a new local Ray: the
worker processes run at normal priority. Ray starts its workers at nice 15
(``worker_niceness``) so that the driver and the raylet stay responsive on a shared node;
on a 2-core machine it means every ordinary process (the driver, the dashboard, a browser,
another job) preempts the training or embedding worker, and its torch threads, which wait
for each other at every parallel region, stall together. Measured on a 2-core Xeon with a
second, lower-priority (nice 19) job running beside the quick demo: the CLIP trained at
0.7 steps/s with Ray's default niceness and at 2.2 steps/s with niceness 0.

The same local Ray's own processes (raylet, GCS, dashboard, Ray Train's and Ray Data's
control actors, idle workers) then run at nice 0 too and wake up ~2,000 times a second in
all, each time preempting a torch thread: ``UNCLIP_QUIET_RAY`` (set here to "idle") lets a
training loop or the evaluation actor put them in SCHED_IDLE while it computes, and the
driver restore them when the stage ends (``training.priority``).

Joining an existing cluster (``RAY_ADDRESS`` or ``address=``) changes nothing: its raylets
already run with the cluster's own settings, and their workers never see these variables.
An explicit ``RAY_worker_niceness`` or ``UNCLIP_QUIET_RAY`` (empty: off) wins.
"""

from __future__ import annotations

import os
from typing import Any

WORKER_NICENESS = "RAY_worker_niceness"
QUIET_RAY = "UNCLIP_QUIET_RAY"  # training.priority.QUIET_ENV (infra does not import training)


def init(**kwargs: Any) -> Any:
    """``ray.init(**kwargs)``; a local Ray it starts runs its workers at nice 0."""
    import ray

    os.environ.setdefault(WORKER_NICENESS, "0")  # read by the raylet ray.init spawns
    os.environ.setdefault(QUIET_RAY, "idle")  # inherited by the workers of a raylet started here
    return ray.init(**kwargs)
