"""GPUs as Ray assigns them: the device of the current actor/task, and a check before a job.

``ray_device(what)`` is the torch device of the calling Ray worker from the GPU ids Ray
assigned it (``unclip.devices.assigned_device``): the CPU when it holds no GPU, its own
GPU when it holds one, and ``GpuUnavailableError`` when it holds one on a node without
usable CUDA. The embedding actors, the training workers and the Serve replicas all use it.

``check_gpus(num_gpus, num_cpus, what)`` runs one task with the resources of one GPU worker
before a job starts its actors: on a node without CUDA the job ends at once with that
message as one line (a ``UserError``), instead of a worker group or actor pool that fails,
retries and buries it in a traceback.
"""

from __future__ import annotations

from typing import Any

from unclip.devices import GpuUnavailableError, assigned_device
from unclip.errors import UserError

WAIT_FOR_GPU_S = 600.0  # an autoscaling cluster may need minutes to add a GPU node


def gpu_ids() -> list[str]:
    """The GPU ids Ray assigned to the calling worker (empty on the driver, without GPUs, or
    outside Ray: a deployment class built in-process by a test)."""
    import ray

    if not ray.is_initialized():  # the runtime context would start a Ray of its own
        return []
    return [str(i) for i in ray.get_runtime_context().get_accelerator_ids().get("GPU", [])]


def ray_device(what: str) -> Any:
    """The torch device of the calling Ray worker (see the module docstring)."""
    return assigned_device(gpu_ids(), what)


def _probe(what: str) -> dict[str, Any]:
    import ray

    ids = gpu_ids()
    node = ray.get_runtime_context().get_node_id()
    try:
        return {"ids": ids, "node": node, "device": str(assigned_device(ids, what))}
    except GpuUnavailableError as e:
        return {"ids": ids, "node": node, "error": str(e)}


def check_gpus(
    num_gpus: float, num_cpus: float, what: str, timeout_s: float = WAIT_FOR_GPU_S
) -> dict[str, Any]:
    """Run ``_probe`` with ``num_gpus`` and ``num_cpus``; raise ``UserError`` if the GPU it is
    granted cannot be used or none is granted within ``timeout_s``. Returns the probe."""
    import ray

    probe = ray.remote(_probe).options(num_gpus=num_gpus, num_cpus=num_cpus, max_retries=0)
    ref = probe.remote(what)
    try:
        found = ray.get(ref, timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        ray.cancel(ref, force=True)
        have = ray.cluster_resources().get("GPU", 0.0)
        raise UserError(
            f"no node gave {what} {num_gpus:g} GPU within {timeout_s:.0f} s "
            f"(the cluster has {have:g} GPU in all)"
        ) from None
    if "error" in found:
        raise UserError(found["error"])
    return found
