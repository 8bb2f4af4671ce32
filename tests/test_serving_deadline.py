"""The request deadline over real HTTP, with the client headers Serve's proxy reads.

Ray Serve's proxy honours ``x-request-timeout-seconds`` (0 switches its own timeout off) and
``x-request-disconnect-disabled: ?1`` (it keeps the request running after the client
leaves) before the ingress sees the request. The ingress's own deadline
(``limits.request_timeout_s``) must still end the request with a 504 and stop its stages'
work. Deployed here with a short deadline and steps allowed far beyond it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import requests

from serving.cli import deploy as deploy_config
from serving.cli import load_config, serve_config
from tests.conftest import free_port
from tests.tiny import make_tiny_bundle

DEADLINE_S = 3.0
LIMITS = {
    "max_steps": 1000,
    "max_num_images": 4,
    "request_timeout_s": DEADLINE_S,
    "stage_timeout_s": 60.0,
    "max_request_cost": 10**8,
}
# far more work than the deadline allows (tens of seconds on a 2-core CPU)
LONG = {"prompt": "a red circle", "num_images": 4, "seed": 1, "decoder_steps": 1000}
SMALL = {**LONG, "num_images": 1, "decoder_steps": 2}  # well within the deadline
SWITCH_OFF = {"x-request-timeout-seconds": "0", "x-request-disconnect-disabled": "?1"}

# its own Serve deployment (~30 s): in make test-slow, to keep make test under 20 minutes
pytestmark = [pytest.mark.slow, pytest.mark.extended]


@pytest.fixture(scope="module")
def url(ray_session: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from ray import serve

    bundle = make_tiny_bundle(str(tmp_path_factory.mktemp("deadline") / "tiny"))
    config = load_config()
    config["applications"][0]["args"]["limits"].update(LIMITS)
    port = free_port()
    deploy_config(serve_config(config, bundle, port=port), timeout_s=300)
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def _generate(url: str, body: dict, headers: dict | None = None) -> requests.Response:
    return requests.post(f"{url}/v1/generate", json=body, headers=headers or {}, timeout=120)


def test_client_headers_cannot_switch_the_request_deadline_off(url: str) -> None:
    # the same work within the deadline is served, so a 504 below is the deadline's
    short = _generate(url, SMALL)
    assert short.status_code == 200, short.text

    for headers in (SWITCH_OFF, {"x-request-timeout-seconds": "3600"}):
        r = _generate(url, LONG, headers)
        assert r.status_code == 504, (headers, r.status_code, r.text[:300])
        assert "deadline" in r.json()["detail"], r.text
        # the abandoned work stopped at its next sampling step: a small request right
        # after fits in its own deadline instead of queueing behind tens of seconds
        after = _generate(url, SMALL)
        assert after.status_code == 200, (headers, after.text)


def test_a_client_that_leaves_with_disconnect_disabled_does_not_keep_the_stages_busy(
    url: str,
) -> None:
    with pytest.raises(requests.Timeout):
        requests.post(f"{url}/v1/generate", json=LONG, headers=SWITCH_OFF, timeout=0.5)
    # the request runs on without its client (the header's point) until its deadline, then
    # its stages stop: once the deadline has passed, a small request is served at once
    time.sleep(DEADLINE_S)
    r = _generate(url, SMALL)
    assert r.status_code == 200, r.text
