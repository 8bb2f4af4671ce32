"""A lease on an embedding table: one writer (``unclip embed`` run) at a time. No Ray.

Two runs on one output table would each compute "ids not yet committed" at their start and
both embed them: every row twice. So a run first takes the table's lease, the object
``<table>/_lease.json`` (readers skip names starting with ``_``), and keeps it until it ends:

- **take**: create the object only if it is absent: ``O_CREAT | O_EXCL`` on local disk,
  a PUT with ``If-None-Match: *`` on S3 (s3fs ``put_object``, AWS S3 since 2024-08; moto
  implements it too). Exactly one of two racing runs succeeds.
- **heartbeat**: the holder rewrites the lease every ``ttl / 6`` seconds with a new
  ``renewed`` time, as a compare-and-swap on the version it last wrote: ``If-Match: <etag>``
  on S3; on local disk the read-compare-replace runs under ``flock`` of ``_lease.lock``.
  If the swap fails, another run took the lease over: this run has lost it and stops.
- **expiry**: a lease not renewed for ``ttl`` seconds (its run was killed, or its machine
  stopped) is expired. The next run takes it over with the same compare-and-swap on the
  expired version, so of two runs that both see it expired only one wins.
- **release**: the holder deletes the lease at the end (``If-Match`` on S3).

A second run either waits (``wait_s``, bounded) or gets :class:`LeaseHeld`, one line naming
the holder, since when it holds the lease and when it expires. Writers also check the lease
just before each commit (:func:`check_holder`), so a run that lost its lease while frozen
commits at most the part it was writing.

Expiry compares wall clocks: the machines writing one table must agree on the time to well
within ``ttl`` (NTP does). Moto's S3 server checks its conditions without a lock, so tests
against it show the protocol, not S3's atomicity (which AWS guarantees).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime

from unclip import fs
from unclip.errors import UserError

LEASE_NAME = "_lease.json"
LOCK_NAME = "_lease.lock"  # local disk only: guards the compare-and-swap
DEFAULT_TTL_S = 180.0
HEARTBEATS_PER_TTL = 6
WAIT_POLL_S = 1.0  # a waiting run looks again this often (one small GET on S3)


@dataclass(frozen=True)
class LeaseInfo:
    """The lease object's contents."""

    owner: str  # host:pid of the holder
    run: str  # unique id of the holder's run
    since: float  # when the run took the lease (Unix time)
    renewed: float  # last heartbeat (Unix time)
    ttl_s: float

    @property
    def expires(self) -> float:
        return self.renewed + self.ttl_s

    def expired(self, now: float | None = None) -> bool:
        return (time.time() if now is None else now) >= self.expires

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @staticmethod
    def from_bytes(data: bytes, fallback_time: float) -> LeaseInfo:
        """Parse; an empty or damaged object (a writer died mid-write) is a lease of unknown
        owner renewed at ``fallback_time`` (its modification time) with the default TTL."""
        try:
            d = json.loads(data)
            return LeaseInfo(
                str(d["owner"]),
                str(d["run"]),
                float(d["since"]),
                float(d["renewed"]),
                float(d["ttl_s"]),
            )
        except (ValueError, KeyError, TypeError):
            return LeaseInfo("unknown", "unknown", fallback_time, fallback_time, DEFAULT_TTL_S)


class LeaseHeld(UserError):
    """Another run holds the table's lease (not expired)."""

    def __init__(self, table: str, held: LeaseInfo, waited_s: float = 0.0) -> None:
        now = time.time()
        waited = f" (waited {waited_s:.0f} s)" if waited_s else ""
        super().__init__(
            f"another `unclip embed` run holds the lease on {table}{waited}: {held.owner} "
            f"(run {held.run[:12]}) since {_utc(held.since)}, last heartbeat "
            f"{max(now - held.renewed, 0):.0f} s ago, expires {_utc(held.expires)} unless "
            "renewed; let that run finish, or pass --lease-wait SECONDS to wait for it "
            f"(a killed run's lease is taken over once it expires; it is {fs.join(table, LEASE_NAME)})"
        )
        self.held = held


class LeaseLost(UserError):
    """This run's lease was taken over by another run (it was not renewed in time)."""


def _utc(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---------------------------------------------------------------------------- storage
class _Store:
    """Create-if-absent, read, compare-and-swap and delete of one small object."""

    def create(self, data: bytes) -> bool: ...
    def read(self) -> tuple[bytes, float, str] | None: ...  # (data, mtime, version)
    def swap(self, data: bytes, version: str) -> bool: ...
    def delete(self, version: str) -> bool: ...


class _LocalStore(_Store):
    def __init__(self, table: str) -> None:
        self.dir = table
        self.path = os.path.join(table, LEASE_NAME)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        os.makedirs(self.dir, exist_ok=True)
        fd = os.open(os.path.join(self.dir, LOCK_NAME), os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # released by the kernel if the process dies
            yield
        finally:
            os.close(fd)

    def _read(self) -> tuple[bytes, float, str] | None:
        try:
            with open(self.path, "rb") as f:
                data = f.read()
                mtime = os.fstat(f.fileno()).st_mtime
        except FileNotFoundError:
            return None
        return data, mtime, data.decode("utf-8", "replace")

    def create(self, data: bytes) -> bool:
        with self._locked():
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            return True

    def read(self) -> tuple[bytes, float, str] | None:
        with self._locked():
            return self._read()

    def swap(self, data: bytes, version: str) -> bool:
        with self._locked():
            now = self._read()
            if now is None or now[2] != version:
                return False
            tmp = f"{self.path}.{uuid.uuid4().hex[:8]}"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
            return True

    def delete(self, version: str) -> bool:
        with self._locked():
            now = self._read()
            if now is None or now[2] != version:
                return False
            os.remove(self.path)
            return True


class _S3Store(_Store):
    """Conditional requests through s3fs's client (its endpoint and credentials)."""

    def __init__(self, table: str) -> None:
        fsys, path = fs.get_fs(fs.join(table, LEASE_NAME))
        self.fs = fsys
        self.bucket, _, self.key = path.partition("/")

    def _call(self, method: str, **kw: object) -> dict:
        try:
            return self.fs.call_s3(method, Bucket=self.bucket, Key=self.key, **kw)
        finally:  # s3fs lists through a cache that these raw calls bypass
            if method != "get_object":
                self.fs.invalidate_cache(f"{self.bucket}/{self.key}")

    def create(self, data: bytes) -> bool:
        try:
            self._call("put_object", Body=data, IfNoneMatch="*")
        except FileExistsError:  # s3fs: 412 on If-None-Match
            return False
        return True

    def read(self) -> tuple[bytes, float, str] | None:
        try:
            out = self._call("get_object")
        except FileNotFoundError:
            return None
        data = _read_body(self.fs, out["Body"])
        return data, out["LastModified"].timestamp(), out["ETag"]

    def swap(self, data: bytes, version: str) -> bool:
        try:
            self._call("put_object", Body=data, IfMatch=version)
        except (FileNotFoundError, FileExistsError):
            return False
        except OSError as e:  # s3fs maps 412 (If-Match) to EINVAL
            if e.errno == errno.EINVAL:
                return False
            raise
        return True

    def delete(self, version: str) -> bool:
        try:
            self._call("delete_object", IfMatch=version)
        except FileNotFoundError:
            return False
        except OSError as e:
            if e.errno == errno.EINVAL:
                return False
            raise
        return True


def _read_body(fsys: object, body: object) -> bytes:
    """The bytes of an aiobotocore streaming body, from sync code."""
    from fsspec.asyn import sync

    async def read() -> bytes:
        async with body:  # type: ignore[attr-defined]
            return await body.read()  # type: ignore[attr-defined]

    return sync(fsys.loop, read)  # type: ignore[attr-defined]


def _store(table: str) -> _Store:
    if table.startswith("s3://"):
        return _S3Store(table)
    if fs.is_remote(table):
        raise UserError(f"output {table!r}: only local paths and s3:// are supported")
    return _LocalStore(table)


# ---------------------------------------------------------------------------- lease
class Lease:
    """The lease on ``table`` for this run: ``acquire``, ``start_heartbeat``, ``release``
    (or ``with Lease(...).held(wait_s):``)."""

    def __init__(self, table: str, ttl_s: float = DEFAULT_TTL_S, run: str = "") -> None:
        if ttl_s <= 0:
            raise UserError(f"--lease-ttl must be > 0 seconds, got {ttl_s}")
        self.table = table.rstrip("/")
        self.ttl_s = ttl_s
        self.run = run or uuid.uuid4().hex
        self.owner = f"{socket.gethostname()}:{os.getpid()}"
        self.store = _store(self.table)
        self.info: LeaseInfo | None = None  # as last written by us
        self.version = ""
        self.took_over: LeaseInfo | None = None  # the expired lease this run replaced
        self.lost: LeaseLost | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -------------------------------------------------------------- take / give back
    def try_acquire(self) -> LeaseInfo | None:
        """Take the lease if it is free or expired (None); else return the holder's lease."""
        for _ in range(3):  # the holder may release between our create and our read
            now = time.time()
            mine = LeaseInfo(self.owner, self.run, now, now, self.ttl_s)
            if self.store.create(mine.to_bytes()):
                self._took(mine, None)
                return None
            seen = self.store.read()
            if seen is None:
                continue
            data, mtime, version = seen
            held = LeaseInfo.from_bytes(data, mtime)
            if held.run == self.run:  # our own create, retried by the client after a timeout
                self._took(held, None)
                return None
            if not held.expired(now):
                return held
            if self.store.swap(mine.to_bytes(), version):
                self._took(mine, held)
                return None
            # another run took the expired lease over first: it is the holder now
        seen = self.store.read()
        return LeaseInfo.from_bytes(seen[0], seen[1]) if seen else self.try_acquire()

    def _took(self, mine: LeaseInfo, replaced: LeaseInfo | None) -> None:
        seen = self.store.read()
        if seen is None or LeaseInfo.from_bytes(seen[0], seen[1]).run != self.run:
            raise LeaseLost(f"the lease on {self.table} was taken over at once; run again")
        self.info, self.version, self.took_over = mine, seen[2], replaced

    def acquire(
        self, wait_s: float = 0.0, sleep: Callable[[float], None] = time.sleep
    ) -> LeaseInfo:
        """Take the lease, waiting up to ``wait_s`` seconds for the holder to end or its
        lease to expire; raise :class:`LeaseHeld` after that."""
        t0 = time.monotonic()
        while True:
            held = self.try_acquire()
            if held is None:
                assert self.info is not None
                return self.info
            waited = time.monotonic() - t0
            if waited >= wait_s:
                raise LeaseHeld(self.table, held, waited if wait_s else 0.0)
            until_expiry = held.expires - time.time()
            sleep(
                max(
                    0.05,
                    min(
                        WAIT_POLL_S,
                        self.ttl_s / HEARTBEATS_PER_TTL,
                        wait_s - waited,
                        until_expiry + 0.05,
                    ),
                )
            )

    def release(self) -> None:
        """Stop the heartbeat and delete the lease if it is still ours."""
        self.stop_heartbeat()
        if self.info is not None and self.lost is None:
            self.store.delete(self.version)
        self.info = None

    # -------------------------------------------------------------- heartbeat
    def renew(self) -> None:
        """Rewrite the lease with a new heartbeat time; raise LeaseLost if it is not ours."""
        if self.info is None:
            raise LeaseLost(f"no lease held on {self.table}")
        new = replace(self.info, renewed=time.time())
        if not self.store.swap(new.to_bytes(), self.version):
            seen = self.store.read()
            holder = LeaseInfo.from_bytes(seen[0], seen[1]) if seen else None
            if holder is not None and holder.run == self.run and holder.renewed == new.renewed:
                pass  # our own swap, retried by the client: it did land
            else:
                who = f"{holder.owner} (run {holder.run[:12]})" if holder else "nobody"
                self.lost = LeaseLost(
                    f"this run lost its lease on {self.table} (not renewed for "
                    f"{self.ttl_s:g} s: was the process frozen?); now held by {who}; "
                    "the parts committed so far are kept, run again to finish"
                )
                raise self.lost
        seen = self.store.read()
        self.info, self.version = new, seen[2] if seen else self.version

    def start_heartbeat(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="lease-heartbeat", daemon=True)
        self._thread.start()

    def stop_heartbeat(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl_s / HEARTBEATS_PER_TTL):
            try:
                self.renew()
            except LeaseLost:
                return
            except OSError:  # storage hiccup: try again at the next beat, before expiry
                continue

    def check(self) -> None:
        """Raise LeaseLost if the heartbeat found the lease taken over."""
        if self.lost is not None:
            raise self.lost

    def check_held(self) -> None:
        """Ask the storage now: raise LeaseLost if another run holds the lease."""
        self.check()
        try:
            check_holder(self.table, self.run)
        except LeaseLost as e:
            self.lost = e
            raise

    @contextlib.contextmanager
    def held(self, wait_s: float = 0.0) -> Iterator[Lease]:
        self.acquire(wait_s)
        self.start_heartbeat()
        try:
            yield self
        finally:
            self.release()


def read_lease(table: str) -> LeaseInfo | None:
    """The lease on ``table`` as stored now (None if nobody holds it)."""
    seen = _store(table.rstrip("/")).read()
    return LeaseInfo.from_bytes(seen[0], seen[1]) if seen else None


def check_holder(table: str, run: str) -> None:
    """Raise LeaseLost unless run ``run`` holds the lease on ``table`` (checked by a
    writer just before it commits a part)."""
    holder = read_lease(table)
    if holder is None or holder.run != run:
        who = f"{holder.owner} (run {holder.run[:12]})" if holder else "nobody"
        raise LeaseLost(
            f"this run no longer holds the lease on {table} (held by {who}); nothing more "
            "is committed; run again to finish"
        )
