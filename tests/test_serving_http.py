"""The Serve application over real HTTP on 127.0.0.1: deployed once per module from
``serving/config.yaml`` (through ``serving.cli.serve_config`` + ``deploy``, what
``unclip serve`` runs) with a tiny random bundle on S3."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from PIL import Image
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from serving.cli import deploy as deploy_config
from serving.cli import load_config, serve_config
from serving.limits import Limits
from tests.conftest import free_port
from tests.http_raw import post_chunked
from tests.serving_cdp import Browser, find_chromium
from tests.tiny import make_tiny_bundle
from unclip import manipulations
from unclip.pipeline import UnclipPipeline

TEST_LIMITS = {
    "max_num_images": 4,
    "max_steps": 12,
    "max_candidates": 3,
    "max_prompt_chars": 80,
    "max_image_bytes": 100_000,
    "max_image_pixels": 256 * 256,
    "stage_timeout_s": 30.0,
    "max_request_cost": 400,
}
STAGES = {"text_encoder", "image_encoder", "prior", "decoder", "upsampler1"}


@dataclass(frozen=True)
class Served:
    url: str
    bundle: str

    def post(self, path: str, timeout: float = 60, **kw: Any) -> requests.Response:
        return requests.post(self.url + path, timeout=timeout, **kw)

    def generate(self, **body: Any) -> dict[str, Any]:
        r = self.post("/v1/generate", json=body)
        assert r.status_code == 200, r.text
        return r.json()


@pytest.fixture(scope="module")
def served(ray_session: None, s3_server: str) -> Iterator[Served]:
    """The app serving a tiny bundle from S3 (moto over HTTP); the replicas get the S3
    settings through the application's runtime_env, as on a cluster."""
    import boto3
    from ray import serve

    bucket = f"served-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)
    bundle = make_tiny_bundle(f"s3://{bucket}/tiny")
    config = load_config()
    app = config["applications"][0]
    app["args"]["limits"].update(TEST_LIMITS)
    env = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    app["runtime_env"] = {"env_vars": {**env, "PYTHONPATH": os.getcwd()}}
    port = free_port()
    deploy_config(serve_config(config, bundle, port=port), timeout_s=300)
    yield Served(f"http://127.0.0.1:{port}", bundle)
    serve.shutdown()


@pytest.fixture(scope="module")
def pipeline(served: Served) -> UnclipPipeline:
    return UnclipPipeline.from_bundle(served.bundle)


def decode(images: list[str]) -> np.ndarray:
    return np.stack([np.asarray(Image.open(io.BytesIO(base64.b64decode(b)))) for b in images])


def assert_close(a: np.ndarray, b: np.ndarray) -> None:
    """Same images up to float noise: different processes may use other BLAS kernels."""
    assert a.shape == b.shape
    diff = np.abs(a.astype(int) - b.astype(int))
    assert diff.mean() < 0.5 and diff.max() <= 8, (diff.mean(), diff.max())


def png_b64(w: int, h: int) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (10, 200, 90)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


# ---------------------------------------------------------------------- generation
def test_generate_returns_pngs_seed_and_stage_timings(served: Served) -> None:
    out = served.generate(prompt="a small red circle", num_images=2, seed=5, decoder_steps=4)
    images = decode(out["images"])
    assert images.shape == (2, 32, 32, 3)  # 16 px decoder, x2 upsampler
    assert out["seed"] == 5
    assert {"text_encoder", "prior", "decoder", "upsampler1", "total"} <= set(out["timings"])
    assert all(v >= 0 for v in out["timings"].values())
    assert out["warnings"] == []


def test_a_prompt_beyond_the_clip_context_is_generated_with_a_warning(served: Served) -> None:
    prompt = "a small red circle " * 4  # 76 characters (limit 80), past the 16-token context
    out = served.generate(prompt=prompt.strip(), seed=5, decoder_steps=4)
    assert len(decode(out["images"])) == 1
    assert len(out["warnings"]) == 1 and "CLIP context of 16 tokens" in out["warnings"][0]


def test_same_seed_same_images_as_the_in_process_pipeline(
    served: Served, pipeline: UnclipPipeline
) -> None:
    req = {"prompt": "a blue square", "num_images": 3, "seed": 11, "decoder_steps": 5}
    a, b = served.generate(**req), served.generate(**req)
    assert a["images"] == b["images"]  # byte-identical PNGs
    other = served.generate(**{**req, "seed": 12})
    assert other["images"] != a["images"]
    settings = pipeline.resolve(decoder_steps=5)
    local = pipeline.generate("a blue square", 3, 11, settings)
    assert_close(decode(a["images"]), local.images)

    # no seed: one is chosen and returned, and it reproduces the images
    c = served.generate(prompt="a blue square", decoder_steps=5)
    d = served.generate(prompt="a blue square", decoder_steps=5, seed=c["seed"])
    assert 0 <= c["seed"] < 2**32 and d["images"] == c["images"]


def test_images_do_not_depend_on_batch_composition(served: Served) -> None:
    reqs = [
        {"prompt": f"a {c} triangle", "num_images": 1 + i % 3, "seed": 100 + i, "decoder_steps": 4}
        for i, c in enumerate(["red", "green", "blue", "grey", "pink", "black"])
    ]
    alone = [served.generate(**r)["images"] for r in reqs]
    with ThreadPoolExecutor(len(reqs)) as pool:
        together = list(pool.map(lambda r: served.generate(**r)["images"], reqs))
    for a, t in zip(alone, together, strict=True):
        assert_close(decode(a), decode(t))


def test_variations_follow_the_paper_and_are_reproducible(
    served: Served, pipeline: UnclipPipeline
) -> None:
    src = served.generate(prompt="a yellow circle", seed=3, decoder_steps=4)["images"][0]
    req = {"image": src, "num_images": 2, "seed": 7, "eta": 0.5}
    a, b = (served.post("/v1/variations", json=req) for _ in range(2))
    assert a.status_code == 200, a.text
    assert a.json()["images"] == b.json()["images"] and a.json()["seed"] == 7
    assert {"image_encoder", "inversion", "decoder", "upsampler1"} <= set(a.json()["timings"])
    img = Image.open(io.BytesIO(base64.b64decode(src)))
    local = manipulations.variations(pipeline, img, 2, 0.5, 7)
    assert_close(decode(a.json()["images"]), local.images)


def test_interpolation_and_text_diff_match_the_in_process_manipulations(
    served: Served, pipeline: UnclipPipeline
) -> None:
    a = served.generate(prompt="a red circle", seed=1, decoder_steps=4)["images"][0]
    b = served.generate(prompt="a blue square", seed=2, decoder_steps=4)["images"][0]
    pil = [Image.open(io.BytesIO(base64.b64decode(x))) for x in (a, b)]

    r = served.post("/v1/interpolate", json={"image_a": a, "image_b": b, "frames": 3, "seed": 5})
    assert r.status_code == 200, r.text
    assert {"image_encoder", "inversion", "decoder", "upsampler1"} <= set(r.json()["timings"])
    local = manipulations.interpolate(pipeline, pil[0], pil[1], frames=3, seed=5)
    assert_close(decode(r.json()["images"]), local.images)

    # fixed_noise holds x_T at image_a's, in Serve as in the library
    req = {"image_a": a, "image_b": b, "frames": 3, "seed": 5, "fixed_noise": True}
    r = served.post("/v1/interpolate", json=req)
    assert r.status_code == 200, r.text
    local = manipulations.interpolate(pipeline, pil[0], pil[1], frames=3, seed=5, fixed_noise=True)
    assert_close(decode(r.json()["images"]), local.images)

    body = {"image": a, "to_text": "a green square", "frames": 3, "max_strength": 0.4}
    r = served.post("/v1/text-diff", json={**body, "seed": 6})
    assert r.status_code == 200, r.text
    local = manipulations.text_diff(
        pipeline, pil[0], "a green square", frames=3, max_strength=0.4, seed=6
    )
    assert_close(decode(r.json()["images"]), local.images)


def test_cli_manipulations_give_the_pixels_of_the_endpoints(served: Served, tmp_path) -> None:
    """`unclip vary` / `interpolate` / `text-diff` and the endpoints run the same code:
    same seed and settings, same pixels."""
    from unclip.cli import main

    a = served.generate(prompt="a red circle", seed=1, decoder_steps=4)["images"][0]
    b = served.generate(prompt="a blue square", seed=2, decoder_steps=4)["images"][0]
    paths = [tmp_path / "a.png", tmp_path / "b.png"]
    for path, img in zip(paths, (a, b), strict=True):
        path.write_bytes(base64.b64decode(img))
    calls = [
        (
            "/v1/variations",
            {"image": a, "num_images": 2, "eta": 0.5},
            ["vary", str(paths[0]), "-n", "2", "--eta", "0.5"],
        ),
        (
            "/v1/interpolate",
            {"image_a": a, "image_b": b, "frames": 3},
            ["interpolate", str(paths[0]), str(paths[1]), "--frames", "3"],
        ),
        (
            "/v1/text-diff",
            {"image": a, "to_text": "a green square", "from_text": "a red circle", "frames": 3},
            ["text-diff", str(paths[0]), "--to", "a green square", "--from", "a red circle"]
            + ["--frames", "3"],
        ),
    ]
    for path, body, argv in calls:
        r = served.post(path, json={**body, "seed": 8})
        assert r.status_code == 200, r.text
        out = tmp_path / f"{argv[0]}.png"
        assert main([*argv, "--bundle", served.bundle, "--seed", "8", "-o", str(out)]) == 0
        strip = np.asarray(Image.open(out).convert("RGB"))
        served_images = decode(r.json()["images"])
        n, h, w, _ = served_images.shape
        assert strip.shape == (h, n * w, 3)
        cli_images = strip.reshape(h, n, w, 3).transpose(1, 0, 2, 3)
        assert_close(served_images, cli_images)


def test_health_docs_and_page(served: Served) -> None:
    health = requests.get(served.url + "/v1/health", timeout=30)
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    ready = requests.get(served.url + "/v1/ready", timeout=30)
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready", "stages": dict.fromkeys(STAGES, "ok")}
    schema = requests.get(served.url + "/openapi.json", timeout=30).json()
    paths = {"/v1/generate", "/v1/variations", "/v1/interpolate", "/v1/text-diff", "/v1/health"}
    paths.add("/v1/ready")
    assert paths <= set(schema["paths"])
    gen = schema["components"]["schemas"]["GenerateRequest"]["properties"]["num_images"]
    assert gen["maximum"] == TEST_LIMITS["max_num_images"]  # the configured limits are documented
    assert "swagger" in requests.get(served.url + "/docs", timeout=30).text.lower()
    page = requests.get(served.url + "/", timeout=30)
    assert page.status_code == 200 and "<textarea" in page.text and "//cdn" not in page.text


# ---------------------------------------------------------------------- bad requests
OK = {"prompt": "a red circle"}
BAD_GENERATE = [
    ({"prompt": ""}, 422, "prompt"),
    ({"prompt": "   \n\t "}, 422, "prompt"),
    ({"prompt": "x" * 81}, 422, "prompt"),
    ({"prompt": 123}, 422, "prompt"),
    ({}, 422, "prompt"),
    ({**OK, "num_images": 0}, 422, "num_images"),
    ({**OK, "num_images": 5}, 422, "num_images"),
    ({**OK, "num_images": "2"}, 422, "num_images"),
    ({**OK, "num_images": 1.5}, 422, "num_images"),
    ({**OK, "prior_steps": 0}, 422, "prior_steps"),
    ({**OK, "decoder_steps": 13}, 422, "decoder_steps"),
    ({**OK, "upsampler_steps": -3}, 422, "upsampler_steps"),
    ({**OK, "decoder_guidance_scale": -0.5}, 422, "decoder_guidance_scale"),
    ({**OK, "prior_guidance_scale": 1e9}, 422, "prior_guidance_scale"),
    ({**OK, "candidates": 4}, 422, "candidates"),
    ({**OK, "seed": -1}, 422, "seed"),
    ({**OK, "seed": True}, 422, "seed"),
    ({**OK, "style": "oil"}, 422, "style"),
    ([OK], 422, "body"),
]
# within every field's limit, but 4 x (3 x 12 x 2) + 4 x 12 x 2 + 4 x 12 = 432 > 400
TOO_COSTLY = {
    **OK,
    "num_images": 4,
    "candidates": 3,
    "prior_steps": 12,
    "decoder_steps": 12,
    "upsampler_steps": 12,
    "prior_guidance_scale": 2.0,
    "decoder_guidance_scale": 3.0,
}
BAD_GENERATE.append((TOO_COSTLY, 422, "num_images, candidates, prior_steps"))
BAD_GENERATE.append((TOO_COSTLY, 422, "budget of 400"))
BAD_VARIATIONS = [
    ({"image": "!!!not base64!!!"}, 422, "image"),
    ({"image": base64.b64encode(b"GIF89a but not really").decode()}, 422, "image"),
    ({"image": base64.b64encode(os.urandom(120_000)).decode()}, 413, "image"),
    ({"image": png_b64(300, 300)}, 413, "image"),  # few bytes, too many pixels
    ({"image": png_b64(8, 8), "eta": 1.5}, 422, "eta"),
    ({"image": png_b64(8, 8), "num_images": 9}, 422, "num_images"),
    ({"image": png_b64(8, 8), "prompt": "x"}, 422, "prompt"),
]
BAD_MANIPULATIONS = [
    ({"image_a": png_b64(8, 8), "frames": 3}, 422, "image_b"),
    ({"image_a": png_b64(8, 8), "image_b": "%%%", "frames": 3}, 422, "image_b"),
    ({"image_a": png_b64(8, 8), "image_b": png_b64(8, 8), "frames": 9}, 422, "frames"),
    ({"image": png_b64(8, 8), "to_text": "", "frames": 3}, 422, "to_text"),
    ({"image": png_b64(8, 8), "to_text": "a", "frames": 3, "max_strength": 2}, 422, "max_strength"),
    ({"image": png_b64(900, 900), "to_text": "a", "frames": 3}, 413, "image"),
]


def _path(body: Any) -> str:
    if "image_a" in body:
        return "/v1/interpolate"
    if "to_text" in body:
        return "/v1/text-diff"
    return "/v1/variations" if "image" in body else "/v1/generate"


@pytest.mark.parametrize(
    ("body", "status", "field"), BAD_GENERATE + BAD_VARIATIONS + BAD_MANIPULATIONS
)
def test_bad_requests_get_4xx_naming_the_field(
    served: Served, body: Any, status: int, field: str
) -> None:
    path = _path(body)
    r = served.post(path, json=body)
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    assert field in detail, detail


def test_malformed_json_and_wrong_content(served: Served) -> None:
    headers = {"Content-Type": "application/json"}
    r = served.post("/v1/generate", data=b'{"prompt": "a circle",', headers=headers)
    assert r.status_code == 400 and r.json()["detail"].startswith("body: malformed JSON")
    r = served.post("/v1/generate", data=b"\xff\xfe", headers=headers)
    assert 400 <= r.status_code < 500
    r = served.post("/v1/generate", data=b"prompt=a", headers={"Content-Type": "text/plain"})
    assert 400 <= r.status_code < 500
    r = served.post("/v1/variations", data=b"x" * 200_000, headers=headers)
    assert r.status_code == 413 and r.json()["detail"].startswith("body:")


def test_liveness_and_readiness_answer_while_the_stages_are_busy(served: Served) -> None:
    """Neither probe waits in a stage's request queue: liveness asks no stage, readiness
    reads Serve's own (cached) deployment states."""
    bodies = [
        {"prompt": f"busy {i}", "seed": i, "num_images": 4, "decoder_steps": 12} for i in range(8)
    ]
    with ThreadPoolExecutor(len(bodies)) as pool:
        futures = [pool.submit(served.post, "/v1/generate", json=b) for b in bodies]
        time.sleep(0.5)
        live = requests.get(served.url + "/v1/health", timeout=10)
        ready = requests.get(served.url + "/v1/ready", timeout=10)
        busy = sum(not f.done() for f in futures)
        statuses = [f.result().status_code for f in futures]
    assert live.status_code == 200 and live.json() == {"status": "ok"}
    assert ready.status_code == 200 and set(ready.json()["stages"]) == STAGES
    assert busy > 0, "the stages were idle: this test did not test anything"
    assert statuses == [200] * len(bodies)


def test_replicas_stay_healthy_after_bad_requests(served: Served) -> None:
    assert requests.get(served.url + "/v1/health", timeout=30).status_code == 200
    assert len(served.generate(prompt="a green star", seed=1)["images"]) == 1


# ---------------------------------------------------------------------- slow: fuzzing, browser
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_openapi_fuzzing_finds_no_server_errors(served: Served, mode: str) -> None:
    """Schemathesis against /openapi.json: schema-valid and schema-invalid requests to every
    operation; no answer may be a 5xx, and the service stays healthy."""
    schema = schemathesis.openapi.from_url(served.url + "/openapi.json")

    @given(case=schema.as_strategy(GenerationMode(mode)))
    @settings(
        max_examples=60,
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.generate],  # bounded time: no shrinking
        suppress_health_check=list(HealthCheck),
    )
    def fuzz(case: Any) -> None:
        r = case.call_and_validate(base_url=served.url, checks=[not_a_server_error], timeout=60)
        statuses.append(r.status_code)

    statuses: list[int] = []
    fuzz()
    print(f"{mode}: {len(statuses)} requests, status codes {sorted(set(statuses))}")
    assert (200 if mode == "positive" else 422) in statuses  # the fuzzing reached both sides
    assert requests.get(served.url + "/v1/health", timeout=30).status_code == 200


@pytest.mark.slow
def test_web_page_generates_in_headless_chromium(served: Served) -> None:
    exe = find_chromium()
    if exe is None:
        pytest.skip("no chromium found (apt-get install -y chromium; see infra/ci_setup.sh)")
    with Browser(exe) as page:
        page.navigate(served.url + "/")
        page.type_into("#prompt", "a small red circle")
        page.type_into("#num_images", "2")
        page.type_into("#seed", "4")
        page.click("#generate")
        n = page.wait_for(
            "document.querySelectorAll('#images img').length === 2 && "
            "[...document.querySelectorAll('#images img')].every(i => i.complete && "
            "i.naturalWidth === 32) && document.querySelectorAll('#images img').length",
            context="document.getElementById('status').textContent + ' | ' + "
            "document.getElementById('error').textContent",
        )
        assert n == 2
        status = page.eval("document.getElementById('status').textContent")
        assert "seed 4" in status and "warning" not in status
        # a warning from the API (prompt truncated to the CLIP context) is shown
        page.type_into("#prompt", "a small red circle " * 4)
        page.click("#generate")
        status = page.wait_for(
            "document.getElementById('status').textContent.includes('warning') && "
            "document.getElementById('status').textContent"
        )
        assert "CLIP context" in status
        # errors from the API are shown, not swallowed
        page.type_into("#prompt", "   ")
        page.click("#generate")
        err = page.wait_for("document.getElementById('error').textContent")
        assert err.startswith("422") and "prompt" in err


@pytest.mark.slow
def test_web_page_manipulates_images_in_headless_chromium(served: Served, tmp_path) -> None:
    exe = find_chromium()
    if exe is None:
        pytest.skip("no chromium found (apt-get install -y chromium; see infra/ci_setup.sh)")
    a = served.generate(prompt="a red circle", seed=1, decoder_steps=4)["images"][0]
    b = served.generate(prompt="a blue square", seed=2, decoder_steps=4)["images"][0]
    paths = [tmp_path / "a.png", tmp_path / "b.png"]
    for path, img in zip(paths, (a, b), strict=True):
        path.write_bytes(base64.b64decode(img))
    shown = (
        "document.querySelectorAll('#images img').length === {n} && "
        "[...document.querySelectorAll('#images img')].every(i => i.complete && "
        "i.naturalWidth === 32) && [...document.querySelectorAll('#images img')].map(i => i.src)"
    )
    context = (
        "document.getElementById('status').textContent + ' | ' + "
        "document.getElementById('error').textContent"
    )
    with Browser(exe) as page:
        page.navigate(served.url + "/")
        page.set_files("#image_a", [str(paths[0])])
        page.set_files("#image_b", [str(paths[1])])
        page.type_into("#seed", "4")
        page.type_into("#num_images", "2")
        page.type_into("#eta", "0.5")
        page.click("#vary")
        srcs = page.wait_for(shown.format(n=2), timeout_s=120, context=context)
        # the page's variations are the API's for the same request
        api = served.post(
            "/v1/variations", json={"image": a, "num_images": 2, "eta": 0.5, "seed": 4}
        ).json()["images"]
        assert [s.removeprefix("data:image/png;base64,") for s in srcs] == api

        page.type_into("#frames", "3")
        page.click("#interpolate")
        page.wait_for(
            shown.format(n=3) + " && document.querySelector('#images img').alt.includes('interp')",
            timeout_s=120,
            context=context,
        )
        page.type_into("#to_text", "a green square")
        page.click("#text_diff")
        page.wait_for(
            shown.format(n=3) + " && document.querySelector('#images img').alt.includes('text')",
            timeout_s=120,
            context=context,
        )
        # a text diff without a target text is refused by the API, and the page says why
        page.type_into("#to_text", "")
        page.click("#text_diff")
        err = page.wait_for("document.getElementById('error').textContent", context=context)
        assert err.startswith("422") and "to_text" in err


# ---------------------------------------------------------------------- slow: load, failure
def _timed_post(served: Served, body: dict[str, Any], timeout: float) -> tuple[int, float]:
    t0 = time.monotonic()
    try:
        r = served.post("/v1/generate", json=body, timeout=timeout)
        assert r.headers["content-type"] == "application/json", (r.status_code, r.text)
        if r.status_code == 503:
            assert int(r.headers["retry-after"]) >= 1, r.headers
        return r.status_code, time.monotonic() - t0
    except requests.RequestException as e:
        return -1 if isinstance(e, requests.Timeout) else -2, time.monotonic() - t0


@pytest.mark.slow
def test_64_concurrent_generate_requests_get_images_or_a_503_before_the_deadline(
    served: Served,
) -> None:
    """Load shedding: what the service cannot finish in time it refuses (503 JSON with
    Retry-After, checked in _timed_post) instead of answering 504 at the deadline."""
    bodies = [{"prompt": f"shape {i}", "seed": i, "decoder_steps": 4} for i in range(64)]
    with ThreadPoolExecutor(64) as pool:
        results = list(pool.map(lambda b: _timed_post(served, b, 120), bodies))
    statuses = [s for s, _ in results]
    assert set(statuses) <= {200, 503} and 200 in statuses, statuses
    deadline = Limits.from_sources(TEST_LIMITS, env={}).request_timeout_s
    assert max(t for _, t in results) < deadline, results


def _replica_pids(deployment: str) -> list[int]:
    """PIDs of the live replica actors of a deployment (from the GCS actor table)."""
    from ray._private.state import actors

    cls = f"ServeReplica:unclip:{deployment}"
    return [
        a["Pid"] for a in actors().values() if a["ActorClassName"] == cls and a["State"] == "ALIVE"
    ]


@pytest.mark.slow
def test_a_replica_killed_mid_request_is_retried_once(served: Served) -> None:
    """Stage calls are deterministic given the seeds, so the ingress sends a call whose
    replica died once more: the requests in flight still get their images."""
    before = _replica_pids("Decoder")
    bodies = [
        {"prompt": f"retry {i}", "seed": i, "num_images": 4, "decoder_steps": 12} for i in range(4)
    ]
    expected = [served.generate(**b)["images"] for b in bodies]
    with ThreadPoolExecutor(len(bodies)) as pool:
        futures = [pool.submit(served.post, "/v1/generate", json=b) for b in bodies]
        time.sleep(0.3)
        os.kill(before[0], signal.SIGKILL)
        answers = [f.result() for f in futures]
    # without the retry a call in flight on the killed replica answers 503 (ActorDiedError);
    # with it, the call waits for the replacement replica: images, or 504 if the replacement
    # takes longer than the stage timeout (a loaded machine)
    statuses = [r.status_code for r in answers]
    assert set(statuses) <= {200, 504}, [r.text for r in answers]
    for r, images in zip(answers, expected, strict=True):
        if r.status_code == 200:
            assert_close(decode(r.json()["images"]), decode(images))
    _wait_until_ready(served, before[0])


def _wait_until_ready(served: Served, killed: int) -> None:
    """Until Serve has replaced the killed Decoder replica and the service is ready."""
    deadline = time.monotonic() + 180
    while True:
        pids = _replica_pids("Decoder")
        ready = requests.get(served.url + "/v1/ready", timeout=30).status_code
        if pids and killed not in pids and ready == 200:
            return
        assert time.monotonic() < deadline, (pids, ready)
        time.sleep(1)


@pytest.mark.slow
def test_killed_replica_is_restarted_and_no_request_hangs(served: Served) -> None:
    before = _replica_pids("Decoder")
    assert before
    timeout = 45.0
    bodies = [
        {"prompt": f"load {i}", "seed": i, "num_images": 4, "decoder_steps": 12} for i in range(64)
    ]
    with ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(_timed_post, served, b, timeout) for b in bodies]
        while sum(f.done() for f in futures) < 4:  # kill mid-load
            time.sleep(0.05)
        os.kill(before[0], signal.SIGKILL)
        done_before_kill = sum(f.done() for f in futures)
        results = [f.result() for f in futures]
    statuses = [s for s, _ in results]
    print(f"killed Decoder pid {before[0]} after {done_before_kill}/64 requests; {statuses}")
    assert done_before_kill < 64
    assert -1 not in statuses and -2 not in statuses, statuses  # nothing hung or was dropped
    assert set(statuses) <= {200, 503, 504}, statuses  # never a 500
    assert max(t for _, t in results) < timeout
    assert 200 in statuses

    # Serve replaces the replica; the service is ready again and serves requests
    _wait_until_ready(served, before[0])
    assert [_timed_post(served, b, 60)[0] for b in bodies[:4]] == [200] * 4


def test_chunked_body_over_the_limit_is_refused_through_the_proxy(served: Served) -> None:
    """The ingress counts what it reads and answers 413 past the limit; Serve's HTTP proxy
    reads ahead of the replica (only what arrives before the answer), so the client is
    stopped before the end of its 64 MiB, not at the limit exactly."""
    status, body, sent = post_chunked(served.url, "/v1/variations", 64 << 20, {})
    assert status == 413, body
    assert json.loads(body)["detail"].startswith("body:")
    assert sent < 64 << 20
    assert requests.get(served.url + "/v1/health", timeout=30).status_code == 200
