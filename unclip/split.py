"""The train / held-out split of an embedding table: a stable hash of the row id.

Training, validation metrics and evaluation all use this one rule, so held-out captions are
never trained on, whatever the file layout or the number of workers.
"""

from __future__ import annotations

import hashlib

HELDOUT_FRACTION = 0.02


def heldout_score(row_id: str) -> float:
    """A uniform number in [0, 1) fixed by the id."""
    digest = hashlib.blake2b(row_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


def is_heldout(row_id: str, fraction: float = HELDOUT_FRACTION) -> bool:
    return heldout_score(row_id) < fraction
