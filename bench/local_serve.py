"""A Serve application for a bundle on a local Ray, for the serving benchmarks.

``local_serve(bundle)`` starts a 2-CPU local Ray, deploys the shipped Serve config for the
bundle on a free port of 127.0.0.1 (as ``unclip serve`` does) and yields its URL; Serve and
Ray are shut down on the way out.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def local_ray() -> Iterator[None]:
    """A local Ray on 2 CPUs whose workers import this checkout."""
    import ray

    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}},
    )
    try:
        yield
    finally:
        from ray import serve

        serve.shutdown()
        ray.shutdown()


@contextmanager
def local_serve(bundle: str, timeout_s: float = 900) -> Iterator[tuple[str, int]]:
    """(URL, port) of the bundle's Serve application, deployed from the shipped config."""
    from serving.cli import deploy, load_config, serve_config

    with local_ray():
        port = free_port()
        deploy(serve_config(load_config(), bundle, port=port), timeout_s=timeout_s)
        yield f"http://127.0.0.1:{port}", port
