"""The torch device of a process from the GPU ids its scheduler assigned (no Ray import).

Ray gives an actor or task GPUs by id (``ray.get_runtime_context().get_accelerator_ids()``)
and sets ``CUDA_VISIBLE_DEVICES`` to the ids of the node that it may see (its own, or with
Ray Train's ``share_cuda_visible_devices`` every worker's on that node). The process's
device is then the position of its first assigned id in that list: never "whichever GPU
is visible", which on a GPU node puts every replica on GPU 0 outside Ray's accounting.

No assigned id means the CPU, even where CUDA is visible. Assigned ids on a node where
CUDA is not usable is an error (``GpuUnavailableError``) with what to do about it: a
process holding a GPU must not quietly compute on the CPU.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence

import torch


class GpuUnavailableError(RuntimeError):
    """A GPU was granted, but this process cannot use it."""


def _visible(env: str | None) -> list[str] | None:
    if env is None or env.strip() in ("", "NoDevFiles"):
        return None
    return [d.strip() for d in env.split(",") if d.strip()]


def _why_no_cuda() -> str:
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    return (
        f"torch {torch.__version__} (CUDA {torch.version.cuda}) finds no usable GPU: "
        "no NVIDIA driver or device on this node"
    )


def assigned_device(
    gpu_ids: Sequence[str | int],
    what: str = "this process",
    visible: str | None = None,
) -> torch.device:
    """The torch device for ``gpu_ids`` (the ids the scheduler gave ``what``).

    ``visible`` is ``CUDA_VISIBLE_DEVICES`` (read from the environment when None). Raises
    ``GpuUnavailableError`` when ids were given but CUDA is absent or does not see them.
    """
    ids = [str(i) for i in gpu_ids]
    if not ids:
        return torch.device("cpu")
    where = f"{what} on {socket.gethostname()} (pid {os.getpid()})"
    granted = f"Ray granted GPU {', '.join(ids)} to {where}"
    if not torch.cuda.is_available():
        raise GpuUnavailableError(
            f"{granted}, but CUDA is not available: {_why_no_cuda()}. Install a CUDA build "
            "of torch and the NVIDIA driver on GPU nodes, or run without GPUs "
            "(--gpus-per-worker 0, no --gpu, or the CPU Serve config serving/config.cpu.yaml)"
        )
    env = os.environ.get("CUDA_VISIBLE_DEVICES") if visible is None else visible
    listed = _visible(env)
    if listed is None:  # ids are the node's device numbers
        index = int(ids[0]) if ids[0].isdigit() else -1
    else:  # torch numbers the visible devices from 0
        index = listed.index(ids[0]) if ids[0] in listed else -1
    count = torch.cuda.device_count()
    if not 0 <= index < count:
        raise GpuUnavailableError(
            f"{granted}, but torch does not see it (CUDA_VISIBLE_DEVICES={env!r}, "
            f"{count} visible device(s)): was CUDA_VISIBLE_DEVICES changed by hand?"
        )
    return torch.device("cuda", index)
