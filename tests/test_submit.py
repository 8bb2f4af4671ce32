"""`unclip submit`: a real Ray head with token auth, a real job, real output."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from infra.submit import job_entrypoint
from tests.ray_head import ray_head
from tests.tiny import make_tiny_bundle
from unclip.errors import UserError


def unclip(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "unclip.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def test_entrypoint_is_validated_locally() -> None:
    assert job_entrypoint(["--", "unclip", "shapes", "--out", "/tmp/x y"]) == (
        "python -m unclip.cli shapes --out '/tmp/x y'"
    )
    with pytest.raises(UserError, match="nothing to submit"):
        job_entrypoint(["--"])
    with pytest.raises(UserError, match="not a valid unclip command"):
        job_entrypoint(["--", "shapes", "--nope"])
    with pytest.raises(UserError, match="cannot itself submit"):
        job_entrypoint(["submit", "--address", "x"])


@pytest.mark.slow
def test_submit_requires_the_token_and_runs_the_job(tmp_path) -> None:
    bundle = make_tiny_bundle(str(tmp_path / "models"))
    out_png = tmp_path / "job_out.png"
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    base_env["PYTHONPATH"] = os.getcwd()
    base_env["HOME"] = str(tmp_path / "client_home")  # no ~/.ray/auth_token here
    with ray_head(tmp_path / "head") as head:
        cmd = [
            "submit",
            "--address",
            head.address,
            "--",
            "generate",
            "a small red circle",
            "--bundle",
            bundle,
            "-n",
            "1",
            "-o",
            str(out_png),
        ]
        denied = unclip(*cmd, env=base_env)
        assert denied.returncode == 1
        assert "Traceback" not in denied.stderr
        assert "authentication required" in denied.stderr and "RAY_AUTH_TOKEN" in denied.stderr
        assert len(denied.stderr.strip().splitlines()) == 1

        ok = unclip(*cmd, env={**base_env, "RAY_AUTH_TOKEN": head.token})
        assert ok.returncode == 0, ok.stdout + ok.stderr
        assert "SUCCEEDED" in ok.stdout and "wrote" in ok.stdout
        assert np.asarray(Image.open(out_png)).shape == (32, 32, 3)

        failing = unclip(
            "submit",
            "--address",
            head.address,
            "--",
            "generate",
            "x",
            "--bundle",
            str(tmp_path / "nope"),
            "-o",
            str(tmp_path / "n.png"),
            env={**base_env, "RAY_AUTH_TOKEN": head.token},
        )
        assert failing.returncode == 1 and "FAILED" in failing.stdout
        assert "not a bundle" in failing.stdout
