"""Run directories shared by every Ray Train stage (CLIP, prior, decoder, upsampler).

A run lives in ``<storage>/<name>`` (``RunConfig(storage_path, name)``) and holds
``checkpoint_<step:08d>/`` directories. Ray registers a reported checkpoint only once its
controller has polled the report; a worker or driver lost in that window would make Ray hand
back an older checkpoint (or none) although a complete newer one is already on storage.
:func:`restored_train_state` therefore continues from whichever is newer.
"""

from __future__ import annotations

import re
from typing import Any

from unclip import fs
from unclip.checkpoint import TRAIN_STATE, load_train_state
from unclip.schema import DataError

CHECKPOINT_RE = re.compile(r"^checkpoint_(\d{8})$")


def checkpoint_dir_name(step: int) -> str:
    return f"checkpoint_{step:08d}"


def latest_checkpoint(run_dir: str) -> tuple[int, str] | None:
    """(step, URI) of the newest complete checkpoint of a run, or None."""
    if not fs.exists(run_dir):
        return None
    steps = [int(m.group(1)) for m in map(CHECKPOINT_RE.match, fs.listdir(run_dir)) if m]
    for step in sorted(steps, reverse=True):
        uri = fs.join(run_dir, checkpoint_dir_name(step))
        if fs.exists(fs.join(uri, "config.json")) and fs.exists(fs.join(uri, TRAIN_STATE)):
            return step, uri
    return None


def restored_train_state(run_dir: str | None) -> dict[str, Any] | None:
    """Inside a train loop: the state to continue from, or None for a fresh start.

    Ray's checkpoint (after a worker failure or ``--resume``), unless ``run_dir`` (None in
    local mode, which persists nothing) holds a complete newer one.
    """
    import ray.train

    saved: dict[str, Any] | None = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            saved = load_train_state(d)
        if saved is None:
            raise DataError(f"checkpoint {checkpoint.path} has no {TRAIN_STATE}")
    newest = latest_checkpoint(run_dir) if run_dir else None
    if newest is not None and newest[0] > int((saved or {}).get("step", 0)):
        saved = load_train_state(newest[1])
    return saved
