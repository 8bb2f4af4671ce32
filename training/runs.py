"""Run directories shared by every Ray Train stage (CLIP, prior, decoder, upsampler).

A run lives in ``<storage>/<name>`` (``RunConfig(storage_path, name)``) and holds
``checkpoint_<step:08d>/`` directories. Ray registers a reported checkpoint only once its
controller has polled the report; a worker or driver lost in that window would make Ray hand
back an older checkpoint (or none) although a complete newer one is already on storage.
:func:`restored_train_state` therefore continues from whichever is newer.
"""

from __future__ import annotations

import os
import posixpath
import re
from typing import Any

from unclip import fs
from unclip.checkpoint import TRAIN_STATE, load_train_state
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
    """(step, URI) of the newest complete checkpoint of a run, or None."""
    fsys, root = fs.pyarrow_fs(run_dir)
    found = _newest(fsys, root)
    return None if found is None else (found[0], fs.join(run_dir, checkpoint_dir_name(found[0])))


def _newest(fsys: Any, root: str) -> tuple[int, str] | None:
    """(step, path on ``fsys``) of the newest checkpoint directory holding both files."""
    import pyarrow.fs as pafs

    try:
        infos = fsys.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    except OSError:
        return None  # unreadable storage: no checkpoint to offer
    found = []
    for info in infos:
        m = CHECKPOINT_RE.match(posixpath.basename(info.path))
        if m and info.type == pafs.FileType.Directory:
            found.append((int(m.group(1)), info.path))
    for step, path in sorted(found, reverse=True):
        files = fsys.get_file_info([f"{path}/config.json", f"{path}/{TRAIN_STATE}"])
        if all(f.type == pafs.FileType.File for f in files):
            return step, path
    return None


def restored_train_state(persisted: bool) -> dict[str, Any] | None:
    """Inside a train loop: the state to continue from, or None for a fresh start.

    Ray's checkpoint (after a worker failure or ``--resume``), unless the run's storage holds
    a complete newer one. ``persisted`` is False in local mode, which stores nothing. The
    storage is read through Ray's own filesystem object (the driver's credentials), so a
    worker needs no S3 settings of its own.
    """
    import ray.train

    saved: dict[str, Any] | None = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            saved = load_train_state(d)
        if saved is None:
            raise DataError(f"checkpoint {checkpoint.path} has no {TRAIN_STATE}")
    newest = _newest_on_storage() if persisted else None
    if newest is not None and newest[0] > int((saved or {}).get("step", 0)):
        with newest[1].as_directory() as d:
            saved = load_train_state(d)
    return saved


def _newest_on_storage() -> tuple[int, Any] | None:
    """(step, ray.train.Checkpoint) of the newest complete checkpoint in the run directory."""
    import ray.train

    storage = ray.train.get_context().get_storage()
    fsys = storage.storage_filesystem
    found = _newest(fsys, storage.experiment_fs_path)
    return None if found is None else (found[0], ray.train.Checkpoint(found[1], filesystem=fsys))
