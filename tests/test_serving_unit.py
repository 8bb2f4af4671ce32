"""Serving pieces that need no Ray cluster: the Serve config, limits, image checks, request
models, and the HTTP guards (API key, body size) over real HTTP with uvicorn."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
import requests
import torch
from PIL import Image
from pydantic import ValidationError
from ray.serve.schema import ServeDeploySchema

from serving.admission import Admission, Overloaded
from serving.api import GenerateResponse, RequestModels, make_api
from serving.app import AppArgs, upsampler_names
from serving.batching import (
    DecodeJob,
    PriorJob,
    batch_rows,
    cat_text,
    group_deadline,
    run_grouped,
    split_rows,
)
from serving.cli import CONFIG_PATH, CPU_CONFIG_PATH, check_exposure, load_config, serve_config
from serving.cost import check_cost, request_cost
from serving.deployments import Decoder, ImageEncoder, Prior, TextEncoder, _Stage
from serving.guards import read_api_keys
from serving.images import RequestError, decode_image
from serving.ingress import Ingress
from serving.limits import Limits
from tests.conftest import free_port
from tests.http_raw import post_chunked
from tests.tiny import make_tiny_bundle, save_tiny_clip, tiny_configs
from unclip.checkpoint import make_bundle, save_stage
from unclip.conditioning import TextCond
from unclip.config import ConfigError, SamplingSettings
from unclip.errors import UserError
from unclip.models import build_model
from unclip.pipeline import DeadlineExceeded, sample_decoder, stop_at


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_tiny_bundle(str(tmp_path_factory.mktemp("unit")))


def png_b64(w: int, h: int, color: tuple[int, int, int] = (200, 30, 30)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def png_header_b64(w: int, h: int) -> str:
    """A PNG whose (valid, CRC-checked) header claims w x h pixels, with 10 bytes of pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
    idat = chunk(b"IDAT", zlib.compress(b"\0" * 10))
    return base64.b64encode(b"\x89PNG\r\n\x1a\n" + ihdr + idat).decode()


# ---------------------------------------------------------------------- Serve config
@pytest.mark.parametrize("path", [CONFIG_PATH, CPU_CONFIG_PATH], ids=["gpu", "cpu"])
def test_config_yaml_is_a_valid_serve_deploy_config(path: Any) -> None:
    schema = ServeDeploySchema.model_validate(load_config(path))
    app = schema.applications[0]
    assert app.import_path == "serving.app:build_app"
    assert schema.http_options.host == "127.0.0.1"
    assert schema.http_options.request_timeout_s
    AppArgs.model_validate(app.args)  # the args are what build_app accepts
    Limits.from_sources(app.args["limits"], env={})
    names = {d.name for d in app.deployments}
    code = {Ingress.name, TextEncoder.name, ImageEncoder.name, Prior.name, Decoder.name}
    assert names == code | set(upsampler_names(1))
    for d in app.deployments:
        batch = d.user_config.get("max_batch_size", 1) if isinstance(d.user_config, dict) else 1
        assert d.max_ongoing_requests >= batch, d.name
        assert d.max_queued_requests >= 64, d.name  # bounded queues: shed, never pile up


def test_serve_config_fills_in_the_bundle(bundle: str, tmp_path: Any) -> None:
    schema = serve_config(load_config(), bundle, host="127.0.0.1", port=8123, require_api_key=True)
    app = schema.applications[0]
    assert app.args["bundle"] == bundle and schema.http_options.port == 8123
    assert app.runtime_env["env_vars"] == {"UNCLIP_API_KEY_REQUIRED": "1"}  # never the key
    assert "Upsampler1" in {d.name for d in app.deployments}

    # a bundle without upsamplers: the Upsampler1 entry goes; with GPUs, each model gets a share
    clip = save_tiny_clip(f"{tmp_path}/clip")
    paths = []
    for cfg in tiny_configs(clip)[:2]:
        save_stage(f"{tmp_path}/{cfg.stage}", cfg, build_model(cfg).state_dict())
        paths.append(f"{tmp_path}/{cfg.stage}")
    make_bundle(f"{tmp_path}/b0", f"{tmp_path}/clip", paths[0], paths[1], [])
    schema = serve_config(load_config(), f"{tmp_path}/b0", gpus=1.0)
    deps = {d.name: d for d in schema.applications[0].deployments}
    assert "Upsampler1" not in deps
    assert deps["Decoder"].ray_actor_options.num_gpus == 0.25
    assert not deps["Ingress"].ray_actor_options.num_gpus


def test_serve_config_errors_are_one_line(bundle: str, tmp_path: Any) -> None:
    with pytest.raises(UserError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(Exception, match="not a bundle"):
        serve_config(load_config(), str(tmp_path))
    bad = load_config()
    bad["applications"][0]["deployments"][0]["max_ongoing_requests"] = "many"
    with pytest.raises(UserError, match="invalid Serve config"):
        serve_config(bad, bundle)


# ---------------------------------------------------------------------- limits
def test_limits_sources_and_errors() -> None:
    assert Limits.from_sources({}, env={}) == Limits()
    env = {"UNCLIP_MAX_NUM_IMAGES": "3", "UNCLIP_STAGE_TIMEOUT_S": "2.5"}
    lim = Limits.from_sources({}, env=env)
    assert lim.max_num_images == 3 and lim.stage_timeout_s == 2.5
    assert Limits.from_sources({"max_num_images": 5}, env=env).max_num_images == 5  # args win
    with pytest.raises(ConfigError, match="max_num_imgs"):
        Limits.from_sources({"max_num_imgs": 5}, env={})
    with pytest.raises(ConfigError, match="UNCLIP_MAX_STEPS"):
        Limits.from_sources({}, env={"UNCLIP_MAX_STEPS": "many"})
    with pytest.raises(ConfigError, match="max_steps must be > 0"):
        Limits.from_sources({"max_steps": 0}, env={})


# ---------------------------------------------------------------------- images
def test_decode_image_accepts_images_and_data_urls() -> None:
    lim = Limits()
    assert decode_image(png_b64(7, 5), lim).size == (7, 5)
    assert decode_image("data:image/png;base64," + png_b64(4, 4), lim).mode == "RGB"


@pytest.mark.parametrize(
    ("text", "status", "words"),
    [
        ("", 422, "empty"),
        ("not base64 at all!", 422, "base64"),
        (base64.b64encode(b"hello, not an image").decode(), 422, "not an image"),
        (png_b64(100, 100), 413, "10000 pixels"),  # limit below: 64 * 64
        (png_header_b64(20000, 20000), 413, "pixels"),  # PIL's bomb check, header only
        (png_header_b64(60, 60), 422, "could not be decoded"),  # header fine, no pixel data
        (base64.b64encode(b"\0" * 5000).decode(), 413, "bytes"),
    ],
)
def test_decode_image_rejects_bad_images(text: str, status: int, words: str) -> None:
    lim = Limits(max_image_pixels=64 * 64, max_image_bytes=4000)
    with pytest.raises(RequestError) as e:
        decode_image(text, lim)
    assert e.value.status == status and e.value.field == "image"
    assert words in str(e.value) and str(e.value).startswith("image: ")


# ---------------------------------------------------------------------- request models
def test_request_models_follow_the_limits() -> None:
    m = RequestModels(Limits(max_num_images=4, max_steps=20, max_prompt_chars=10))
    assert m.generate.model_validate({"prompt": "a circle", "num_images": 4}).num_images == 4
    for bad, field in [
        ({"prompt": "  \t"}, "prompt"),
        ({"prompt": "x" * 11}, "prompt"),
        ({"prompt": "a", "num_images": 5}, "num_images"),
        ({"prompt": "a", "num_images": "2"}, "num_images"),  # strict: no string coercion
        ({"prompt": "a", "decoder_steps": 21}, "decoder_steps"),
        ({"prompt": "a", "prior_guidance_scale": -1}, "prior_guidance_scale"),
        ({"prompt": "a", "seed": 2**32}, "seed"),
        ({"prompt": "a", "colour": "red"}, "colour"),
    ]:
        with pytest.raises(ValidationError) as e:
            m.generate.model_validate(bad)
        assert e.value.errors()[0]["loc"] == (field,), bad
    assert m.variations.model_validate({"image": "abc", "eta": 1}).eta == 1.0
    assert m.text_diff.model_validate({"image": "a", "to_text": "b", "frames": 2}).frames == 2
    for bad, field in [
        ({"image": "a", "to_text": " ", "frames": 2}, "to_text"),
        ({"image": "a", "to_text": "b", "frames": 1}, "frames"),
        ({"image": "a", "to_text": "b", "frames": 3, "max_strength": 0}, "max_strength"),
        ({"image": "a", "to_text": "b"}, "frames"),
        ({"image": "a", "to_text": "b", "frames": 2, "latent_steps": 21}, "latent_steps"),
    ]:
        with pytest.raises(ValidationError) as e:
            m.text_diff.model_validate(bad)
        assert e.value.errors()[0]["loc"] == (field,), bad
    # the bipartite latent's steps: per request on every manipulation, within max_steps
    assert m.variations.model_validate({"image": "a", "latent_steps": 20}).latent_steps == 20
    assert (
        m.interpolate.model_validate({"image_a": "a", "image_b": "b", "frames": 2}).latent_steps
        is None
    )
    for model in (m.variations, m.interpolate):
        with pytest.raises(ValidationError) as e:
            model.model_validate(
                {"image": "a", "image_a": "a", "image_b": "b", "frames": 2, "latent_steps": 0}
            )
        assert ("latent_steps",) in [err["loc"] for err in e.value.errors()]


# ---------------------------------------------------------------------- batching helpers
def test_run_grouped_runs_each_settings_group_once_in_order() -> None:
    s1, s2 = SamplingSettings(prior_steps=4), SamplingSettings(prior_steps=8)
    text = TextCond(torch.randn(1, 3))
    jobs = [PriorJob(text, [i], s) for i, s in enumerate([s1, s2, s1, s2, s1])]
    calls: list[list[int]] = []

    def run(group: list[PriorJob]) -> list[int]:
        calls.append([j.seeds[0] for j in group])
        return [j.seeds[0] * 10 for j in group]

    assert run_grouped(jobs, PriorJob.key, run) == [0, 10, 20, 30, 40]
    assert calls == [[0, 2, 4], [1, 3]]
    a = TextCond(torch.randn(2, 3), torch.randn(2, 4, 5), torch.ones(2, 4, dtype=torch.bool))
    b = TextCond(torch.randn(1, 3), torch.randn(1, 4, 5), torch.ones(1, 4, dtype=torch.bool))
    both = cat_text([a, b])
    assert both.emb.shape == (3, 3) and both.states is not None and both.states.shape == (3, 4, 5)
    assert [t.shape[0] for t in split_rows(both.emb, [2, 1])] == [2, 1]
    with_text = DecodeJob(torch.randn(1, 3), a, [0], s1)
    assert with_text.key() != DecodeJob(torch.randn(1, 3), None, [0], s1).key()


# ---------------------------------------------------------------------- HTTP guards
class _EchoService:
    """Stands in for the ingress so the HTTP layer can be tested on its own."""

    async def generate(self, req: Any) -> GenerateResponse:
        img = np.zeros((2, 2, 3), np.uint8)
        from serving.images import encode_png_b64

        return GenerateResponse(images=[encode_png_b64(img)], seed=req.seed or 0, timings={})

    async def variations(self, req: Any) -> GenerateResponse:
        raise RequestError("image", "never mind")

    async def interpolate(self, req: Any) -> GenerateResponse:
        raise RuntimeError("a bug")

    async def readiness(self) -> tuple[bool, dict[str, str]]:
        return True, {"echo": "ok"}


@pytest.fixture(scope="module")
def guarded_url() -> Iterator[str]:
    import uvicorn

    keys = read_api_keys(env={"UNCLIP_API_KEY": "s3cret, next-key\n"})
    app = make_api(_EchoService(), Limits(max_image_bytes=1000), api_keys=keys)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


def test_api_key_is_required_except_on_open_paths(guarded_url: str) -> None:
    body = {"prompt": "a circle", "seed": 3}
    r = requests.post(f"{guarded_url}/v1/generate", json=body, timeout=10)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert r.json()["detail"].startswith("authorization:")
    wrong = {"Authorization": "Bearer nope"}
    assert requests.post(f"{guarded_url}/v1/generate", json=body, headers=wrong).status_code == 401
    ok = {"Authorization": "Bearer s3cret"}
    r = requests.post(f"{guarded_url}/v1/generate", json=body, headers=ok, timeout=10)
    assert r.status_code == 200 and r.json()["seed"] == 3
    for path in ("/v1/health", "/v1/ready", "/", "/docs", "/openapi.json"):
        assert requests.get(guarded_url + path, timeout=10).status_code == 200, path
    r = requests.post(f"{guarded_url}/v1/variations", json={"image": "x"}, headers=ok, timeout=10)
    assert r.status_code == 422 and r.json()["detail"] == "image: never mind"
    # a second key (rotation) is accepted too; a prefix or a padded key is not
    for key, status in [("next-key", 200), ("next", 401), ("s3cret,next-key", 401)]:
        auth = {"Authorization": f"Bearer {key}"}
        r = requests.post(f"{guarded_url}/v1/generate", json=body, headers=auth, timeout=10)
        assert r.status_code == status, key


def test_stage_health_check_fails_while_a_model_call_is_stuck() -> None:
    stage = _Stage()
    stage.stuck_after_s = 0.3
    stage.check_health()

    async def main() -> None:
        call = asyncio.create_task(stage._compute(lambda: time.sleep(1.0)))
        await asyncio.sleep(0.6)
        with pytest.raises(RuntimeError, match="stuck"):
            stage.check_health()
        await call
        stage.check_health()  # healthy again once the call returns

    asyncio.run(main())


def test_an_unexpected_error_is_a_json_500(guarded_url: str) -> None:
    ok = {"Authorization": "Bearer s3cret"}
    body = {"image_a": "a", "image_b": "b", "frames": 2}
    r = requests.post(f"{guarded_url}/v1/interpolate", json=body, headers=ok, timeout=10)
    assert r.status_code == 500 and r.headers["content-type"] == "application/json"
    assert r.json()["detail"].startswith("internal error (RuntimeError)")
    assert requests.get(f"{guarded_url}/v1/nope", timeout=10).json()["detail"]  # 404 too


def test_api_keys_are_stripped_and_several_are_accepted(tmp_path: Any) -> None:
    assert read_api_keys(env={}) == ()
    assert read_api_keys(env={"UNCLIP_API_KEY": "let-me-in\n"}) == ("let-me-in",)
    assert read_api_keys(env={"UNCLIP_API_KEY": " a, b ,,a"}) == ("a", "b")
    secret = tmp_path / "api_key"
    secret.write_text("old-key\nnew-key\n")  # a mounted Secret: one key per line
    env = {"UNCLIP_API_KEY_FILE": str(secret)}
    assert read_api_keys("from-args", env) == ("from-args", "old-key", "new-key")
    with pytest.raises(ConfigError, match="UNCLIP_API_KEY_FILE.*cannot read"):
        read_api_keys(env={"UNCLIP_API_KEY_FILE": str(tmp_path / "missing")})
    with pytest.raises(ConfigError, match="API key is required"):
        read_api_keys(env={"UNCLIP_API_KEY_REQUIRED": "1", "UNCLIP_API_KEY": "\n"})


def test_serving_beyond_loopback_needs_a_key_or_an_explicit_opt_out() -> None:
    for host in ("127.0.0.1", "localhost", "::1"):
        check_exposure(host, has_key=False, insecure_no_api_key=False)
    for host in ("0.0.0.0", "::", "10.1.2.3", "serve.example.com"):
        with pytest.raises(UserError, match="--insecure-no-api-key"):
            check_exposure(host, has_key=False, insecure_no_api_key=False)
        check_exposure(host, has_key=True, insecure_no_api_key=False)
        check_exposure(host, has_key=False, insecure_no_api_key=True)


def test_oversized_body_is_413_before_parsing(guarded_url: str) -> None:
    ok = {"Authorization": "Bearer s3cret"}
    big = {"image": "A" * 100_000}
    r = requests.post(f"{guarded_url}/v1/variations", json=big, headers=ok, timeout=10)
    assert r.status_code == 413 and r.json()["detail"].startswith("body:")


def test_chunked_body_is_counted_as_received_and_refused_past_the_limit(
    guarded_url: str,
) -> None:
    ok = {"Authorization": "Bearer s3cret"}
    limit = Limits(max_image_bytes=1000).max_body_bytes
    status, body, sent = post_chunked(guarded_url, "/v1/variations", 64 << 20, ok)
    assert status == 413, body
    assert json.loads(body)["detail"].startswith("body:") and str(limit) in body
    assert sent < 16 << 20  # answered long before the 64 MiB were sent
    # a chunked body within the limit goes through to the route
    r = requests.post(
        f"{guarded_url}/v1/generate",
        data=iter([b'{"prompt": "a circle",', b' "seed": 4}']),
        headers={**ok, "Content-Type": "application/json"},
        timeout=10,
    )
    assert r.status_code == 200 and r.json()["seed"] == 4
    # no key: 401 before any of the body is read
    status, body, _ = post_chunked(guarded_url, "/v1/variations", 64 << 20, {})
    assert status == 401, body


# ---------------------------------------------------------------------- cost and deadline
def test_request_cost_counts_rows_steps_candidates_and_guidance() -> None:
    s = SamplingSettings(
        prior_steps=10,
        prior_guidance_scale=1.0,
        candidates=3,
        decoder_steps=20,
        decoder_guidance_scale=3.0,
        upsampler_steps=5,
        latent_steps=30,
        latent_guidance_scale=1.0,
    )
    cost = request_cost(4, s, upsamplers=2, prior=True)
    assert cost == {"prior": 4 * 3 * 10, "decoder": 4 * 20 * 2, "upsamplers": 4 * 5 * 2}
    # manipulations: the inversion and the decoding of latents run at the latent settings
    assert request_cost(2, s, upsamplers=0, inverted=1) == {"inversion": 30, "decoder": 60}
    guided = replace(s, latent_guidance_scale=2.0)
    assert request_cost(2, guided, upsamplers=0, inverted=1) == {"inversion": 60, "decoder": 120}
    check_cost(cost, ["num_images"], budget=sum(cost.values()))
    with pytest.raises(RequestError) as e:
        check_cost(cost, ["num_images", "decoder_steps"], budget=100)
    assert e.value.status == 422
    assert str(e.value).startswith("num_images, decoder_steps: this request needs 320 ")
    assert "budget of 100" in str(e.value)


def test_sampling_stops_at_the_next_step_once_the_deadline_passed(tmp_path: Any) -> None:
    clip = save_tiny_clip(str(tmp_path / "clip"))
    cfg = tiny_configs(clip, text_states=False)[1]
    decoder = build_model(cfg).eval()
    emb = torch.nn.functional.normalize(torch.randn(2, 32), dim=-1)
    s = SamplingSettings(decoder_steps=6)
    with torch.no_grad(), pytest.raises(DeadlineExceeded, match="after 1 of 6"):
        sample_decoder(decoder, emb, None, [1, 2], s, progress=stop_at(time.time() - 1))
    with torch.no_grad():
        out = sample_decoder(decoder, emb, None, [1, 2], s, progress=stop_at(time.time() + 600))
    assert out.shape[0] == 2
    jobs = [DecodeJob(emb, None, [0], s, deadline=d) for d in (5.0, 9.0)]
    assert group_deadline(jobs) == 9.0  # the group runs while anyone still waits
    assert group_deadline([*jobs, DecodeJob(emb, None, [0], s)]) is None


def test_admission_sheds_what_could_not_finish_before_the_deadline() -> None:
    now = [0.0]
    adm = Admission(deadline_s=10.0, cold_cost=250, clock=lambda: now[0])
    adm.admit(100)
    adm.admit(100)  # no rate measured yet: admitted up to one budget (cold_cost) in flight
    with pytest.raises(Overloaded, match="measuring"):
        adm.admit(100)
    now[0] = 2.0
    adm.release(100, completed=True)  # 100 units in 2 s while busy
    assert adm.rate == 50.0
    adm.admit(300)  # (100 + 300) / 50 = 8 s, within the deadline
    with pytest.raises(Overloaded) as e:
        adm.admit(200)  # (400 + 200) / 50 = 12 s: shed now rather than time out
    assert e.value.retry_after_s == 8  # the 400 in flight drain in 8 s
    assert adm.in_flight == 400
    adm.release(100, completed=False)
    adm.release(300, completed=False)
    assert adm.in_flight == 0 and adm.rate == 50.0
    adm.admit(10_000)  # an idle service admits any request (the cost budget bounds it)
    now[0] = 2.5
    adm.release(10_000, completed=True)  # a whole busy period is a sample, however short
    assert adm.rate == pytest.approx(0.7 * 50.0 + 0.3 * 10_000 / 0.5)


def test_overload_and_stage_errors_are_json_503_with_retry_after() -> None:
    import uvicorn

    class Busy(_EchoService):
        async def text_diff(self, req: Any) -> GenerateResponse:
            raise Overloaded(retry_after_s=7, wait_s=40.0)

    app = make_api(Busy(), Limits())
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        body = {"image": "a", "to_text": "b", "frames": 2}
        r = requests.post(f"http://127.0.0.1:{port}/v1/text-diff", json=body, timeout=10)
        assert r.status_code == 503 and r.headers["retry-after"] == "7"
        assert r.json()["detail"].startswith("overloaded: ")
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_docs_work_offline_and_declare_the_bearer_scheme(guarded_url: str) -> None:
    html = requests.get(f"{guarded_url}/docs", timeout=10).text
    assert "swagger" in html.lower() and "https://" not in html and "http://" not in html
    assert 'src="/docs/static/swagger-ui-bundle.js"' in html
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css"):  # open, like /docs itself
        r = requests.get(f"{guarded_url}/docs/static/{asset}", timeout=10)
        assert r.status_code == 200 and len(r.content) > 100_000, asset
    ok = {"Authorization": "Bearer s3cret"}
    assert requests.get(f"{guarded_url}/redoc", headers=ok, timeout=10).status_code == 404
    schema = requests.get(f"{guarded_url}/openapi.json", timeout=10).json()
    schemes = schema["components"]["securitySchemes"]
    assert [s["scheme"] for s in schemes.values()] == ["bearer"]
    assert schema["paths"]["/v1/generate"]["post"]["security"] == [{name: []} for name in schemes]


def test_a_batch_is_sized_in_image_rows_not_in_jobs() -> None:
    s = SamplingSettings()
    text = TextCond(torch.randn(1, 3))
    jobs = [PriorJob(text, list(range(n)), s) for n in (3, 4, 1)]
    assert batch_rows(jobs) == 8 and batch_rows(jobs[:2]) == 7
    assert batch_rows([jobs[1]]) == 1  # one job always fits: it runs alone if larger
    assert batch_rows([torch.zeros(2, 3, 8, 8), torch.zeros(5, 3, 8, 8)]) == 7
    assert batch_rows(["a prompt", "another"]) == 2 and batch_rows([]) == 0
    decode = DecodeJob(torch.randn(2, 3), None, [0, 1], s)
    assert batch_rows([decode, decode]) == 4
