"""Keep a local Ray's own processes from preempting the training threads.

Every Ray process wakes up about 100-150 times a second even when idle (each core worker
runs a 10 ms timer in its main thread, plus gRPC polling). While a stage trains, a local
Ray session holds a dozen of them (raylet, GCS, dashboard, Ray Train's controller,
synchronisation, placement-group and preemption actors, Ray Data's dataset manager and
stats actors, idle workers): on 2 cores that is ~2,000 wake-ups a second, each one
preempting one of the two torch threads while the other waits for it at the next
parallel region. Measured on a 2-core Xeon (AMX), decoder quick preset: 0.27-0.30 s per
step inside Ray Train against 0.21 s for the same steps in a plain process; with the
session's other processes at nice 10, 0.23-0.24 s (docs/benchmarks.md).

``quiet_session()`` raises the niceness of those processes (never of a training worker,
never lowers anyone's) when the session is a local Ray this project started for the run
(``UNCLIP_QUIET_RAY`` in the environment, set by ``infra.local_ray.init``). On a cluster
nothing changes. Raising niceness needs no privileges; it is not undone (lowering it would),
so the session's idle workers stay at the higher niceness until the session ends.
"""

from __future__ import annotations

import os
from pathlib import Path

QUIET_ENV = "UNCLIP_QUIET_RAY"  # set (to the niceness) when the local Ray is ours
TRAINING_TITLES = ("ray::RayTrainWorker",)


def _parent(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    return int(stat.rsplit(")", 1)[1].split()[1])


def _title(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0", 1)[0].decode(errors="replace")
    except OSError:
        return ""


def session_processes(worker_pid: int) -> list[int]:
    """The pids of this node's Ray session seen from one of its workers: the raylet (the
    worker's parent), the workers it started, and what started with it (GCS, dashboard,
    log monitor: the raylet's siblings), excluding the process that started them all."""
    raylet = _parent(worker_pid)
    if raylet <= 1:
        return []
    head = _parent(raylet)  # the driver that ran ray.init (or `ray start`)
    procs = [raylet]
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        parent = _parent(pid)
        if parent == raylet or (head > 1 and parent == head and pid != raylet):
            procs.append(pid)
    return procs


def quiet_session(worker_pid: int | None = None) -> list[int]:
    """Raise the niceness of the local session's other processes to ``UNCLIP_QUIET_RAY``;
    return the pids changed (none unless the variable is set)."""
    target = os.environ.get(QUIET_ENV, "")
    if not target.isdigit() or not hasattr(os, "setpriority"):
        return []
    nice = int(target)
    me = os.getpid() if worker_pid is None else worker_pid
    changed = []
    for pid in session_processes(me):
        if pid == me or _title(pid).startswith(TRAINING_TITLES):
            continue
        try:
            if os.getpriority(os.PRIO_PROCESS, pid) < nice:
                os.setpriority(os.PRIO_PROCESS, pid, nice)
                changed.append(pid)
        except OSError:  # gone, or another user's
            continue
    return changed
