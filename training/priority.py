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

``quiet_session()`` lowers the priority of every thread of those processes (never of a
training worker or of the caller's peers) when the session is a local Ray this project
started for the run (``UNCLIP_QUIET_RAY`` in the environment, set by
``infra.local_ray.init``): ``SCHED_IDLE`` where it can be undone, which never preempts a
normal thread (a niced one still does when it wakes), else nice 10. The driver puts the
session back with ``restore_session()`` when the stage ends, so that the next stage's
processes (forked by a quieted raylet, they would inherit SCHED_IDLE) start at full
priority. On a cluster nothing changes. Measured on a 2-core Xeon without AMX, decoder quick
step inside Ray Train: 0.522 s untouched, 0.494 at nice 10, 0.463 in SCHED_IDLE
(docs/benchmarks.md).
"""

from __future__ import annotations

import os
from pathlib import Path

QUIET_ENV = "UNCLIP_QUIET_RAY"  # "idle" or a niceness, set when the local Ray is ours
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
    log monitor: the raylet's siblings), with their own children, excluding the process
    that started them all."""
    raylet = _parent(worker_pid)
    if raylet <= 1 or not _is_raylet(raylet):  # e.g. a local-mode loop in the driver itself
        return []
    return _session(raylet, _parent(raylet))  # head: the driver that ran ray.init


def _is_raylet(pid: int) -> bool:
    return os.path.basename(_title(pid)) == "raylet"


def driver_session(driver_pid: int | None = None) -> list[int]:
    """The same pids seen from the driver that started the local Ray (the raylet's parent)."""
    head = os.getpid() if driver_pid is None else driver_pid
    raylets = [p for p in _children(head) if _is_raylet(p)]
    return _session(raylets[0], head) if raylets else []


def _parents() -> dict[int, int]:
    """pid -> parent pid of every process (one scan of /proc)."""
    return {int(e.name): _parent(int(e.name)) for e in Path("/proc").iterdir() if e.name.isdigit()}


def _children(pid: int) -> list[int]:
    return [p for p, parent in _parents().items() if parent == pid]


def _session(raylet: int, head: int) -> list[int]:
    """The raylet and every process below it or below ``head`` (GCS, dashboard and the
    dashboard's own module processes, log monitor, workers), ``head`` itself excluded."""
    parents = _parents()
    roots = {raylet, head} if head > 1 else {raylet}
    procs, frontier = [raylet], roots
    while frontier:
        frontier = {p for p, parent in parents.items() if parent in frontier} - roots
        procs += sorted(p for p in frontier if p not in procs)
    return procs


def threads_of(pid: int) -> list[int]:
    """The thread ids of process ``pid`` (its main thread's id is ``pid``)."""
    try:
        return [int(t.name) for t in Path(f"/proc/{pid}/task").iterdir() if t.name.isdigit()]
    except OSError:
        return []


def can_restore() -> bool:
    """Whether this process may take a thread out of SCHED_IDLE again (root, CAP_SYS_NICE,
    or an RLIMIT_NICE that allows nice 0): only then is SCHED_IDLE used."""
    if not hasattr(os, "SCHED_IDLE"):
        return False
    if os.geteuid() == 0:
        return True
    try:
        import resource

        if resource.getrlimit(resource.RLIMIT_NICE)[0] >= 20:
            return True
        status = Path("/proc/self/status").read_text()
    except (OSError, ValueError, ImportError):
        return False
    cap = next((ln.split()[1] for ln in status.splitlines() if ln.startswith("CapEff:")), "0")
    return bool(int(cap, 16) >> 23 & 1)  # CAP_SYS_NICE


def parse_quiet(value: str) -> tuple[int, bool] | None:
    """``UNCLIP_QUIET_RAY`` -> (niceness to raise to, use SCHED_IDLE), or None (off).

    "idle": SCHED_IDLE where it can be undone (``can_restore``), else nice 10; a number: that
    niceness."""
    if value == "idle":
        return (0, True) if can_restore() else (10, False)
    return (int(value), False) if value.isdigit() else None


def _quiet_thread(tid: int, nice: int, idle: bool) -> bool:
    """Lower one thread's priority; whether anything changed."""
    changed = False
    if nice and os.getpriority(os.PRIO_PROCESS, tid) < nice:
        os.setpriority(os.PRIO_PROCESS, tid, nice)
        changed = True
    if idle and os.sched_getscheduler(tid) != os.SCHED_IDLE:
        os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
        changed = True
    return changed


def _unidle(pids: list[int]) -> list[int]:
    """Every SCHED_IDLE thread of ``pids`` back to SCHED_OTHER; the pids changed."""
    changed = []
    for pid in pids:
        hit = False
        for tid in threads_of(pid):
            try:
                if os.sched_getscheduler(tid) == os.SCHED_IDLE:
                    os.sched_setscheduler(tid, os.SCHED_OTHER, os.sched_param(0))
                    hit = True
            except OSError:
                continue
        if hit:
            changed.append(pid)
    return changed


def quiet_session(worker_pid: int | None = None) -> list[int]:
    """Lower the priority of the local session's other processes as ``UNCLIP_QUIET_RAY``
    says; return the pids changed (none unless the variable is set).

    Every thread of each process: on Linux niceness and scheduling policy belong to a
    thread, and a Ray process's gRPC and event-loop threads wake up as often as its main
    thread. SCHED_IDLE (the default of a local Ray started by this project) never preempts
    a normal thread, whereas a niced thread still does when it wakes; a process started
    later by a quieted one (a worker forked by the raylet) inherits the policy, so the
    compute process first takes its own threads out of SCHED_IDLE, and the driver puts the
    session back with ``restore_session`` when the stage ends."""
    quiet = parse_quiet(os.environ.get(QUIET_ENV, ""))
    if quiet is None or not hasattr(os, "setpriority"):
        return []
    nice, idle = quiet
    me = os.getpid() if worker_pid is None else worker_pid
    if idle:
        _unidle([me])
    mine = _title(me)  # my peers (the other replicas of an actor pool) compute too
    changed = []
    for pid in session_processes(me):
        title = _title(pid)
        if pid == me or title.startswith(TRAINING_TITLES) or title == mine:
            continue
        hit = False
        for tid in threads_of(pid):
            try:
                hit = _quiet_thread(tid, nice, idle) or hit
            except OSError:  # gone, or another user's
                continue
        if hit:
            changed.append(pid)
    return changed


def restore_session(driver_pid: int | None = None) -> list[int]:
    """From the driver that started the local Ray: take the session's threads out of
    SCHED_IDLE (after a stage, so that the next stage's processes start at full priority).
    Niceness raised by the numeric setting stays (lowering it needs privileges)."""
    if parse_quiet(os.environ.get(QUIET_ENV, "")) != (0, True):
        return []
    return _unidle(driver_session(driver_pid))
