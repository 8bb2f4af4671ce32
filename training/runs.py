"""Run directories shared by every Ray Train stage (CLIP, prior, decoder, upsampler).

A run lives in ``<storage>/<name>`` (``RunConfig(storage_path, name)``) and holds
``checkpoint_<step:08d>/`` directories. Ray registers a reported checkpoint only once its
controller has polled the report; a worker or driver lost in that window would make Ray hand
back an older checkpoint (or none) although a complete newer one is already on storage.
:func:`restored_train_state` therefore continues from whichever is newer. Only committed
checkpoints count (``unclip.checkpoint.COMMIT``), and one that does not load gives way to the
one before it.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

from unclip import fs
from unclip.checkpoint import COMMIT, TRAIN_STATE, CheckpointError, load_committed_train_state
from unclip.errors import UserError
from unclip.schema import DataError

CHECKPOINT_RE = re.compile(r"^checkpoint_(\d{8})$")
RUN_SUFFIX = ".run"
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train V2's record of a run


def run_location(out: str, storage: str | None) -> tuple[str, str]:
    """(storage path URI, run name) for an output URI: ``<storage>/<basename(out)>.run``."""
    out = out.rstrip("/")
    if fs.is_remote(out):
        scheme, rest = out.split("://", 1)
        parent, base = posixpath.split(rest)
        if not parent or not base:
            raise UserError(f"--out {out!r} needs a key inside the bucket, e.g. {out}/prior")
        parent_uri = f"{scheme}://{parent}"
    else:
        parent_uri, base = os.path.split(os.path.abspath(out))
    return (storage.rstrip("/") if storage else parent_uri), base + RUN_SUFFIX


def refuse_existing_run(run_dir: str, out: str, latest: tuple[int, str] | None) -> None:
    """A new run must not clobber an earlier one or an existing checkpoint."""
    if latest is not None or fs.exists(fs.join(run_dir, RAY_SNAPSHOT)):
        raise UserError(
            f"a run already exists in {run_dir}"
            + (f" (last checkpoint at step {latest[0]})" if latest else "")
            + ": pass --resume to continue it, or remove that directory to start over"
        )
    if fs.exists(fs.join(out, "config.json")):
        raise UserError(f"{out} already holds a stage checkpoint; choose another --out")


def checkpoint_dir_name(step: int) -> str:
    return f"checkpoint_{step:08d}"


def latest_checkpoint(run_dir: str) -> tuple[int, str] | None:
    """(step, URI) of the newest committed checkpoint of a run, or None."""
    fsys, root = fs.pyarrow_fs(run_dir)
    found = _committed(fsys, root)
    return None if not found else (found[0][0], fs.join(run_dir, checkpoint_dir_name(found[0][0])))


def _committed(fsys: Any, root: str) -> list[tuple[int, str]]:
    """(step, path on ``fsys``) of the run's committed checkpoints, newest first.

    Committed: a commit marker (``commit.json``) whose files all exist with the sizes it
    records. A run written before markers existed has none at all: there, as before, a
    checkpoint holding ``config.json`` and ``train_state.pt`` counts.
    """
    import pyarrow.fs as pafs

    try:
        infos = fsys.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    except OSError:
        return []  # unreadable storage: no checkpoint to offer
    found = []
    for info in infos:
        m = CHECKPOINT_RE.match(posixpath.basename(info.path))
        if m and info.type == pafs.FileType.Directory:
            found.append((int(m.group(1)), info.path))
    found.sort(reverse=True)
    markers = fsys.get_file_info([f"{path}/{COMMIT}" for _, path in found])
    if not any(f.type == pafs.FileType.File for f in markers):  # a run from before markers
        legacy = []
        for step, path in found:
            files = fsys.get_file_info([f"{path}/config.json", f"{path}/{TRAIN_STATE}"])
            if all(f.type == pafs.FileType.File for f in files):
                legacy.append((step, path))
        return legacy
    return [
        (step, path)
        for (step, path), marker in zip(found, markers, strict=True)
        if marker.type == pafs.FileType.File and _sizes_match(fsys, path)
    ]


def _sizes_match(fsys: Any, path: str) -> bool:
    import pyarrow.fs as pafs

    try:
        with fsys.open_input_stream(f"{path}/{COMMIT}") as f:
            files = json.loads(f.read())["files"]
        infos = fsys.get_file_info([f"{path}/{name}" for name in files])
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return all(
        i.type == pafs.FileType.File and i.size == files[posixpath.basename(i.path)]["size"]
        for i in infos
    )


def newest_loadable(
    candidates: list[tuple[int, str, Callable[[], AbstractContextManager[str]]]],
) -> dict[str, Any] | None:
    """The train state of the newest candidate (step, name, opener giving a local directory)
    that passes its commit check and loads; a damaged one is skipped with a warning naming
    it. None without candidates; ``DataError`` if none loads."""
    failures = []
    seen = set()
    for step, name, opener in sorted(candidates, key=lambda c: c[0], reverse=True):
        if name in seen:
            continue
        seen.add(name)
        try:
            with opener() as d:
                return load_committed_train_state(d)
        except CheckpointError as e:
            failures.append(str(e))
            warnings.warn(
                f"checkpoint at step {step} cannot be resumed from ({e}); trying the one before it",
                stacklevel=2,
            )
    if failures:
        raise DataError("no checkpoint of this run can be resumed from: " + "; ".join(failures))
    return None


def restored_train_state(persisted: bool) -> dict[str, Any] | None:
    """Inside a train loop: the state to continue from, or None for a fresh start.

    The newest of Ray's checkpoint (after a worker failure or ``--resume``) and the committed
    ones on the run's storage that loads: a damaged newest checkpoint falls back to the one
    before it, with a warning. ``persisted`` is False in local mode, which stores nothing.
    The storage is read through Ray's own filesystem object (the driver's credentials), so
    a worker needs no S3 settings of its own.
    """
    import ray.train

    candidates = []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        m = CHECKPOINT_RE.match(posixpath.basename(checkpoint.path.rstrip("/")))
        step = int(m.group(1)) if m else -1
        candidates.append((step, posixpath.basename(checkpoint.path), checkpoint.as_directory))
    if persisted:
        storage = ray.train.get_context().get_storage()
        fsys = storage.storage_filesystem
        for step, path in _committed(fsys, storage.experiment_fs_path):
            ckpt = ray.train.Checkpoint(path, filesystem=fsys)
            candidates.append((step, posixpath.basename(path), ckpt.as_directory))
    return newest_loadable(candidates)
