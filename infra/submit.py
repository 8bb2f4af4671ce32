"""`unclip submit --address URL -- <unclip command>`: the same command as a Ray job.

The command is validated locally first (a typo fails here, not on the cluster), then
submitted through the Ray Jobs API with this project's code as the job's working_dir.
Ray 2.60 dashboards require a token: set ``RAY_AUTH_TOKEN`` (or ``~/.ray/auth_token``, as
written by ``ray get-auth-token --generate`` on the head); this module turns token auth on
for the client side. Logs stream until the job ends; the exit code follows the job status.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import sys
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
EXCLUDES = [
    ".venv",
    ".git",
    "work",
    "runs",
    "data",
    "out",
    "bench/results",
    "*.safetensors",
    "*.pt",
    "*.parquet",
    "__pycache__",
    ".pytest_cache",
    ".ruff_cache",
]
TERMINAL = {"SUCCEEDED", "STOPPED", "FAILED"}
AGENT_WAIT_S = 90.0  # a freshly started head answers "No available agent" for a while


def job_entrypoint(command: list[str]) -> str:
    """The shell entrypoint of the job for an unclip command (validated locally)."""
    from unclip.cli import build_parser
    from unclip.errors import UserError

    if command and command[0] == "--":
        command = command[1:]
    if command and command[0] == "unclip":
        command = command[1:]
    if not command:
        raise UserError("nothing to submit: unclip submit --address URL -- <unclip command>")
    if command[0] == "submit":
        raise UserError("a submitted job cannot itself submit a job")
    try:
        build_parser().parse_args(command)
    except SystemExit:
        raise UserError(f"not a valid unclip command: {shlex.join(command)}") from None
    return "python -m unclip.cli " + shlex.join(command)


def runtime_env() -> dict:
    return {"working_dir": str(PROJECT_ROOT), "excludes": EXCLUDES}


def client(address: str):  # -> JobSubmissionClient
    from unclip.errors import UserError

    os.environ.setdefault("RAY_AUTH_MODE", "token")
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except Exception as e:  # noqa: BLE001 - Ray raises ConnectionError/RuntimeError/auth errors
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "uthenticat" in msg:
            msg = (
                "authentication required; set RAY_AUTH_TOKEN to the head's token "
                "(`ray get-auth-token` on the head prints it)"
            )
        elif "connect" in msg.lower():
            msg += " (is the head running? `ray start --head --dashboard-host=...`)"
        raise UserError(f"cannot use the Ray job API at {address}: {msg}") from None


def submit_when_ready(c, entrypoint: str, wait_s: float = AGENT_WAIT_S) -> str:
    """Submit, retrying while the head's job agent is still starting (transient 500)."""
    from unclip.errors import UserError

    deadline = time.monotonic() + wait_s
    while True:
        try:
            return c.submit_job(
                entrypoint=entrypoint,
                runtime_env=runtime_env(),
                metadata={"unclip_command": entrypoint},
            )
        except RuntimeError as e:
            if "No available agent" not in str(e):
                raise
            if time.monotonic() > deadline:
                raise UserError(
                    f"the head's job agent did not become available in {wait_s:.0f}s; "
                    "check `ray status` on the head and its dashboard_agent log (another Ray on the same "
                    "machine may hold the agent port: `ray start --dashboard-agent-listen-port=...`)"
                ) from None
            time.sleep(2.0)


async def _follow(c, job_id: str) -> None:
    async for lines in c.tail_job_logs(job_id):
        sys.stdout.write(lines)
        sys.stdout.flush()


def run(args: argparse.Namespace) -> int:
    entrypoint = job_entrypoint(list(args.rest))
    c = client(args.address)
    job_id = submit_when_ready(c, entrypoint)
    print(f"submitted {job_id}: {entrypoint}")
    print(f"follow with: ray job logs --address {args.address} --follow {job_id}")
    if args.no_wait:
        return 0
    asyncio.run(_follow(c, job_id))
    status = str(c.get_job_status(job_id))
    status = status.split(".")[-1]
    print(f"job {job_id}: {status}")
    return 0 if status == "SUCCEEDED" else 1
