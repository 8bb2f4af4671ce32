"""The output table's lease (pipelines.lease): one writer at a time, local disk and S3."""

from __future__ import annotations

import os
import threading
import time

import pytest

from pipelines.lease import (
    LEASE_NAME,
    Lease,
    LeaseHeld,
    LeaseInfo,
    LeaseLost,
    check_holder,
    read_lease,
)
from unclip import fs


@pytest.fixture(params=["local", "s3"])
def table_uri(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "table")
    return request.getfixturevalue("s3_bucket") + "/table"


def expired_lease(table: str) -> Lease:
    """A run that took the lease and was killed: no heartbeat, its TTL passed."""
    dead = Lease(table, ttl_s=0.01)
    dead.acquire()
    time.sleep(0.05)
    return dead


def stored(table: str) -> LeaseInfo:
    info = read_lease(table)
    assert info is not None
    return info


def test_a_second_run_is_refused_naming_the_holder_since_and_expiry(table_uri) -> None:
    first = Lease(table_uri, ttl_s=600)
    first.acquire()
    with pytest.raises(LeaseHeld) as e:
        Lease(table_uri).acquire()
    msg = str(e.value)
    assert len(msg.splitlines()) == 1
    assert f"holds the lease on {table_uri}" in msg and first.owner in msg
    assert first.run[:12] in msg and " since 20" in msg and "expires 20" in msg
    assert "--lease-wait" in msg
    # a bounded wait ends with the same refusal
    with pytest.raises(LeaseHeld, match=r"\(waited 0 s\)|\(waited"):
        Lease(table_uri).acquire(wait_s=0.2)
    first.release()
    assert not fs.exists(fs.join(table_uri, LEASE_NAME))
    second = Lease(table_uri)
    second.acquire()
    assert stored(table_uri).run == second.run and second.took_over is None
    second.release()


def test_an_expired_lease_is_taken_over_and_its_holder_has_lost_it(table_uri) -> None:
    dead = expired_lease(table_uri)
    new = Lease(table_uri, ttl_s=600)
    new.acquire()
    assert new.took_over is not None and new.took_over.run == dead.run
    assert stored(table_uri).run == new.run
    # the old holder comes back (it was frozen, not dead): it cannot renew or commit
    with pytest.raises(LeaseLost, match="lost its lease"):
        dead.renew()
    with pytest.raises(LeaseLost, match="no longer holds the lease"):
        check_holder(table_uri, dead.run)
    check_holder(table_uri, new.run)
    dead.release()  # does not remove the new holder's lease
    assert stored(table_uri).run == new.run
    new.release()


def test_heartbeat_renews_the_lease_without_changing_its_holder(table_uri) -> None:
    lease = Lease(table_uri, ttl_s=0.6)  # a beat every 0.1 s
    lease.acquire()
    before = stored(table_uri)
    lease.start_heartbeat()
    try:
        deadline = time.monotonic() + 60
        while stored(table_uri).renewed == before.renewed and time.monotonic() < deadline:
            time.sleep(0.05)
        after = stored(table_uri)
    finally:
        lease.release()
    assert after.renewed > before.renewed
    assert (after.run, after.since, after.owner) == (before.run, before.since, before.owner)
    assert lease.lost is None


def test_a_waiting_run_gets_the_lease_when_the_holder_ends(table_uri) -> None:
    first = Lease(table_uri, ttl_s=600)
    first.acquire()
    timer = threading.Timer(0.3, first.release)
    timer.start()
    second = Lease(table_uri)
    try:
        second.acquire(wait_s=120)
    finally:
        timer.join()
    assert stored(table_uri).run == second.run
    second.release()


def test_racing_takeovers_of_an_expired_lease_have_one_winner(tmp_path) -> None:
    """Local disk (flock'd compare-and-swap). Moto checks S3 conditions without a lock, so
    the same race against it would test moto, not S3."""
    table = str(tmp_path / "table")
    expired_lease(table)
    racers = [Lease(table, ttl_s=600) for _ in range(8)]
    results: list[LeaseInfo | None] = [None] * len(racers)
    go = threading.Barrier(len(racers))

    def race(i: int) -> None:
        go.wait()
        results[i] = racers[i].try_acquire()

    threads = [threading.Thread(target=race, args=(i,)) for i in range(len(racers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [r for r, res in zip(racers, results, strict=True) if res is None]
    assert len(winners) == 1
    assert stored(table).run == winners[0].run
    assert {res.run for res in results if res is not None} == {winners[0].run}


def test_a_damaged_lease_counts_from_its_modification_time(tmp_path) -> None:
    """A writer killed between creating the local lease file and writing it."""
    table = tmp_path / "table"
    table.mkdir()
    (table / LEASE_NAME).write_bytes(b"")
    with pytest.raises(LeaseHeld, match="unknown"):
        Lease(str(table)).acquire()
    old = time.time() - 3600
    os.utime(table / LEASE_NAME, (old, old))
    lease = Lease(str(table))
    lease.acquire()
    assert lease.took_over is not None and lease.took_over.owner == "unknown"
    lease.release()


def test_check_held_asks_the_storage(tmp_path) -> None:
    table = str(tmp_path / "table")
    dead = expired_lease(table)
    dead.check_held()  # expired but nobody else took it: still ours
    Lease(table, ttl_s=600).acquire()
    with pytest.raises(LeaseLost, match="no longer holds the lease"):
        dead.check_held()
    assert dead.lost is not None
