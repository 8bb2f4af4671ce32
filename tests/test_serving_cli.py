"""``unclip serve`` end to end in its own process (it starts its own local Ray): prints the
URL and a curl example, enforces ``UNCLIP_API_KEY``, and stops cleanly on Ctrl-C."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

from tests.conftest import free_port
from tests.tiny import make_tiny_bundle

ROOT = Path(__file__).resolve().parents[1]


def _unclip(*args: str, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "unclip.cli", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def _lines(proc: subprocess.Popen[str]) -> queue.Queue[str]:
    q: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            q.put(line)

    threading.Thread(target=pump, daemon=True).start()
    return q


def _wait_line(q: queue.Queue[str], text: str, timeout_s: float, seen: list[str]) -> None:
    deadline = time.monotonic() + timeout_s
    while not any(text in line for line in seen):
        try:
            seen.append(q.get(timeout=max(0.1, deadline - time.monotonic())))
        except queue.Empty:
            raise AssertionError(f"no {text!r} after {timeout_s} s:\n{''.join(seen)}") from None


def test_unclip_serve_bad_bundle_is_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = _unclip("serve", "--bundle", str(tmp_path / "missing"), env=env)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1
    assert out.strip().splitlines()[-1].startswith("error: ") and "not a bundle" in out


def test_unclip_serve_on_all_interfaces_without_a_key_is_refused(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("UNCLIP_API_KEY")}
    env["PYTHONPATH"] = str(ROOT)
    proc = _unclip("serve", "--bundle", str(tmp_path), "--host", "0.0.0.0", env=env)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1
    last = out.strip().splitlines()[-1]
    assert last.startswith("error: --host 0.0.0.0") and "--insecure-no-api-key" in last


@pytest.mark.slow
@pytest.mark.extended
def test_unclip_serve_with_api_key_end_to_end(tmp_path: Path) -> None:
    bundle = make_tiny_bundle(str(tmp_path))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray
    # a key as read from a Secret file ends in a newline; a second key for rotation
    env.update(PYTHONPATH=str(ROOT), UNCLIP_API_KEY="let-me-in\n,next-key")
    proc = _unclip("serve", "--bundle", bundle, "--port", str(port), env=env)
    seen: list[str] = []
    try:
        q = _lines(proc)
        _wait_line(q, "Ctrl-C to stop", 600, seen)
        out = "".join(seen)
        url = f"http://127.0.0.1:{port}"
        assert f"serving at {url}" in out and "curl -s " in out
        assert "Authorization: Bearer $UNCLIP_API_KEY" in out

        assert requests.get(f"{url}/v1/health", timeout=30).status_code == 200  # open for probes
        body = {"prompt": "a red circle", "seed": 1, "decoder_steps": 3}
        r = requests.post(f"{url}/v1/generate", json=body, timeout=60)
        assert r.status_code == 401, r.text
        key = {"Authorization": "Bearer let-me-in"}
        r = requests.post(f"{url}/v1/generate", json=body, headers=key, timeout=60)
        assert r.status_code == 200 and len(r.json()["images"]) == 1
        key = {"Authorization": "Bearer next-key"}
        r = requests.post(f"{url}/v1/generate", json=body, headers=key, timeout=60)
        assert r.status_code == 200
        assert requests.get(f"{url}/", timeout=30).status_code == 200
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
    time.sleep(0.5)
    while not q.empty():
        seen.append(q.get())
    assert proc.returncode == 0, "".join(seen)
    assert "stopped." in "".join(seen)
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{port}/v1/health", timeout=5)
