"""training.priority: a local Ray's own processes are reniced, training workers never."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from training import priority

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

THREADED = (
    "import threading, time; [threading.Thread(target=time.sleep, args=(60,)).start() "
    "for _ in range(2)]; time.sleep(60)"
)
# head (the "driver") -> raylet + gcs; raylet -> two training workers, an idle worker, and a
# control actor already at nice 15. Titles set with `exec -a`, as Ray's setproctitle does.
# The "GCS" runs two more threads (Linux keeps niceness per thread); the idle worker has a
# child of its own (as the dashboard has its module processes).
TREE = f"""
( exec -a gcs_server {sys.executable} -c '{THREADED}' ) &
( exec -a raylet bash -c '
  ( exec -a ray::RayTrainWorker sleep 60 ) &
  ( exec -a ray::RayTrainWorker sleep 60 ) &
  ( exec -a ray::IDLE bash -c "( exec -a ray-dashboard-NodeHead-0 sleep 60 ) & wait" ) &
  ( renice -n 15 -p $BASHPID >/dev/null; exec -a ray::TrainController sleep 60 ) &
  wait' ) &
wait
"""


def _children(pid: int) -> list[int]:
    return [
        int(p.name)
        for p in Path("/proc").iterdir()
        if p.name.isdigit() and priority._parent(int(p.name)) == pid
    ]


@pytest.fixture
def session():
    head = subprocess.Popen(["bash", "-c", TREE], start_new_session=True)
    try:
        for _ in range(100):  # until all six processes exist
            kids = _children(head.pid)
            raylet = next((k for k in kids if priority._title(k) == "raylet"), 0)
            workers = _children(raylet) if raylet else []
            titles = sorted(priority._title(w) for w in workers)
            gcs = next((k for k in kids if k != raylet), 0)
            if (
                len(kids) == 2
                and len(workers) == 4
                and "ray::TrainController" in titles
                and len(priority.threads_of(gcs)) == 3
                and any(_children(w) for w in workers)
            ):
                break
            time.sleep(0.05)
        else:
            pytest.fail("the fake session did not start")
        yield head.pid, raylet, kids, workers
    finally:
        os.killpg(head.pid, 9)
        head.wait()


def _nice(pid: int) -> int:
    return os.getpriority(os.PRIO_PROCESS, pid)


def test_other_processes_of_the_session_are_reniced_training_workers_are_not(session, monkeypatch):
    head, raylet, kids, workers = session
    me = next(w for w in workers if priority._title(w) == "ray::RayTrainWorker")
    gcs = next(k for k in kids if k != raylet)
    by_title = {priority._title(w): w for w in workers if w != me}
    monkeypatch.delenv(priority.QUIET_ENV, raising=False)  # set by any local_ray.init before
    assert priority.quiet_session(me) == []  # no variable: not our local Ray, nothing changes
    assert _nice(gcs) == 0

    monkeypatch.setenv(priority.QUIET_ENV, "10")
    changed = priority.quiet_session(me)

    grandchild = _children(by_title["ray::IDLE"])
    assert sorted(changed) == sorted([raylet, gcs, by_title["ray::IDLE"], *grandchild])
    assert _nice(raylet) == _nice(gcs) == _nice(by_title["ray::IDLE"]) == 10
    assert [_nice(t) for t in priority.threads_of(gcs)] == [10, 10, 10]  # every thread
    assert [_nice(c) for c in grandchild] == [10]  # and their children
    assert _nice(by_title["ray::TrainController"]) == 15  # never lowered
    assert _nice(me) == _nice(by_title["ray::RayTrainWorker"]) == 0
    assert _nice(head) == 0  # the driver keeps its priority
    assert priority.quiet_session(me) == []  # idempotent


def test_a_worker_without_a_raylet_parent_changes_nothing(monkeypatch):
    monkeypatch.setenv(priority.QUIET_ENV, "10")
    assert priority.session_processes(1) == []
    # a local-mode training loop runs in the driver: its parent is a shell, not a raylet
    assert priority.session_processes(os.getpid()) == []
    assert priority.quiet_session() == []


@pytest.mark.skipif(not priority.can_restore(), reason="SCHED_IDLE could not be undone here")
def test_idle_quiets_every_thread_and_the_driver_restores_them(session, monkeypatch):
    head, raylet, kids, workers = session
    me = next(w for w in workers if priority._title(w) == "ray::RayTrainWorker")
    gcs = next(k for k in kids if k != raylet)
    idle = next(w for w in workers if priority._title(w) == "ray::IDLE")
    ctl = next(w for w in workers if priority._title(w) == "ray::TrainController")
    os.sched_setscheduler(me, os.SCHED_IDLE, os.sched_param(0))  # forked by an idle raylet
    monkeypatch.setenv(priority.QUIET_ENV, "idle")

    priority.quiet_session(me)
    policy = os.sched_getscheduler
    assert {policy(t) for t in priority.threads_of(gcs)} == {os.SCHED_IDLE}
    assert policy(raylet) == policy(idle) == os.SCHED_IDLE
    assert policy(me) == os.SCHED_OTHER  # the computing worker took itself out first
    assert policy(head) == os.SCHED_OTHER
    assert _nice(gcs) == 0  # SCHED_IDLE alone: nothing that could not be undone

    assert sorted(priority.restore_session(head)) == sorted(
        [raylet, gcs, idle, ctl, *_children(idle)]
    )
    assert {policy(t) for t in priority.threads_of(gcs)} == {os.SCHED_OTHER}
    assert policy(raylet) == policy(idle) == os.SCHED_OTHER
