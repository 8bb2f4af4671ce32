"""Shared fixtures: one real local Ray per session, one real S3 server (moto) per session."""

from __future__ import annotations

import os
import socket
import tempfile
import uuid
from collections.abc import Iterator

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))
# numerics probes cache their choices per machine: tests keep theirs out of the user's cache
os.environ["UNCLIP_CACHE_DIR"] = tempfile.mkdtemp(prefix="unclip-test-cache-")
# tests compare pixels across processes (library, CLI, Serve replicas): on a busy test machine
# each process's sampling probe could choose differently, so sampling runs fp32 unless a test
# asks for another setting (tests/test_sampling_numerics.py tests the probe itself)
os.environ.setdefault("UNCLIP_SAMPLING_NUMERICS", "fp32")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """A real local Ray (2 CPUs), started once per test session."""
    import ray

    if not ray.is_initialized():
        from serving.cli import set_serve_env_defaults

        set_serve_env_defaults()
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
            runtime_env={"env_vars": {"PYTHONPATH": os.getcwd()}},
        )
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """A real S3 API over HTTP on 127.0.0.1 (moto's ThreadedMotoServer).

    Sets the standard AWS variables so s3fs, pyarrow and boto3 all talk to it.
    Yields the endpoint URL.
    """
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield endpoint
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture()
def s3_bucket(s3_server: str) -> str:
    """A fresh bucket; returns ``s3://bucket``."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return f"s3://{name}"
