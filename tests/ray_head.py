"""An isolated Ray head with token auth, for job-submission tests.

Own HOME (its own ~/.ray/auth_token), own temp dir and ports (agent ports included); started with ``ray start
--head --block`` in its own process group so SIGTERM stops exactly this cluster (``ray stop``
would stop every Ray on the machine, including the test session's).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import free_port

BIN = Path(sys.executable).parent


@dataclass
class Head:
    address: str  # dashboard / job API URL
    token: str
    home: Path


@contextmanager
def ray_head(root: Path, num_cpus: int = 1, timeout: float = 90.0) -> Iterator[Head]:
    home = root / "home"
    home.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "HOME": str(home),
        "RAY_AUTH_MODE": "token",
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": os.getcwd(),
    }
    env.pop("RAY_AUTH_TOKEN", None)
    subprocess.run(
        [str(BIN / "ray"), "get-auth-token", "--generate"],
        env=env,
        check=True,
        capture_output=True,
        timeout=60,
    )
    token = (home / ".ray" / "auth_token").read_text().strip()
    port, dash = free_port(), free_port()
    # AF_UNIX socket paths are limited to 107 bytes: keep Ray's temp dir short
    temp_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")
    log = open(root / "head.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            "--block",
            f"--num-cpus={num_cpus}",
            f"--port={port}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash}",
            f"--temp-dir={temp_dir}",
            "--include-dashboard=true",
            # its own agent ports: another Ray on this machine (the test session's) already
            # holds the defaults, and a head whose agent cannot bind answers job submissions
            # with "No available agent to submit job"
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--metrics-export-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}",
            f"--ray-client-server-port={free_port()}",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + timeout
        while True:
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=2)
                break
            except urllib.error.HTTPError:  # 401: up, and asking for the token
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(
                        f"ray head did not start: {(root / 'head.log').read_text()[-2000:]}"
                    ) from None
                time.sleep(1)
        yield Head(address, token, home)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)
