"""``unclip serve``: deploy the Serve config for a bundle and block until Ctrl-C.

The config is ``serving/config.yaml`` (GPU stages request ``num_gpus``) when the Ray cluster
has GPUs and ``serving/config.cpu.yaml`` when it has none, unless ``--config`` names one.
It does what ``serve run CONFIG`` does (``serve_start`` with the config's ``http_options``,
then ``deploy_apps``), after filling the config in for this bundle (``serve_config``).
Tests deploy through the same two functions.
"""

from __future__ import annotations

import argparse
import copy
import ipaddress
import os
import shlex
import signal
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from serving.app import upsampler_names
from serving.guards import API_KEY_ENV, API_KEY_FILE_ENV, API_KEY_REQUIRED_ENV, read_api_keys
from unclip.checkpoint import read_bundle_spec
from unclip.errors import UserError

CONFIG_PATH = Path(__file__).parent / "config.yaml"  # a GPU cluster's
CPU_CONFIG_PATH = Path(__file__).parent / "config.cpu.yaml"  # no GPU: laptop, CI, the demo
APP_NAME = "unclip"
INGRESS = "Ingress"


def default_config_path(gpus: float) -> Path:
    """The shipped config for a Ray cluster with ``gpus`` GPUs in all."""
    return CONFIG_PATH if gpus > 0 else CPU_CONFIG_PATH


def load_config(path: str | os.PathLike[str] | None = None, gpus: float = 0.0) -> dict[str, Any]:
    """The config at ``path``, else the shipped one for ``gpus`` (``default_config_path``)."""
    p = Path(path) if path else default_config_path(gpus)
    try:
        data = yaml.safe_load(p.read_text())
    except FileNotFoundError:
        raise UserError(f"Serve config {str(p)!r} does not exist") from None
    except yaml.YAMLError as e:
        raise UserError(f"Serve config {str(p)!r} is not valid YAML: {e}") from None
    if not isinstance(data, dict) or not data.get("applications"):
        raise UserError(f"Serve config {str(p)!r} has no applications")
    return data


def serve_config(
    config: dict[str, Any],
    bundle: str,
    host: str | None = None,
    port: int | None = None,
    require_api_key: bool = False,
    gpus: float = 0.0,
) -> Any:
    """The config for this bundle, as a validated ``ServeDeploySchema``.

    Sets the unclip application's ``args.bundle`` (made absolute if local) and the HTTP host
    and port; keeps only the ``UpsamplerN`` entries the bundle has; with ``require_api_key``
    the ingress refuses to start without a key in its environment (the key itself is never
    put in the config: the dashboard shows it); with ``gpus`` > 0 gives each model
    deployment without ``num_gpus`` an equal share of one GPU; with ``gpus`` == 0 (a cluster
    without GPUs) refuses a config that requests them: its replicas would wait forever.
    """
    from ray.serve.schema import ServeDeploySchema

    if gpus == 0 and (wanting := gpu_deployments(config)):
        raise UserError(
            f"the Serve config requests GPUs ({', '.join(wanting)}) but the Ray cluster has "
            f"none: use {CPU_CONFIG_PATH.name} (the default without GPUs), or deploy it with "
            "`serve deploy` on a cluster that adds GPU nodes"
        )
    cfg = copy.deepcopy(config)
    apps = [a for a in cfg["applications"] if a.get("name") == APP_NAME]
    if len(apps) != 1:
        raise UserError(f"the Serve config needs exactly one application named {APP_NAME!r}")
    app = apps[0]
    if "://" not in bundle:
        bundle = os.path.abspath(bundle)
    spec = read_bundle_spec(bundle)
    app.setdefault("args", {})["bundle"] = bundle
    http = cfg.setdefault("http_options", {})
    if host is not None:
        http["host"] = host
    if port is not None:
        http["port"] = port
    keep = set(upsampler_names(len(spec.stages) - 2))
    app["deployments"] = [
        d
        for d in app.get("deployments", [])
        if not d["name"].startswith("Upsampler") or d["name"] in keep
    ]
    if require_api_key:
        env = app.setdefault("runtime_env", {}).setdefault("env_vars", {})
        env[API_KEY_REQUIRED_ENV] = "1"
    if gpus > 0:
        models = [d for d in app["deployments"] if d["name"] != INGRESS]
        share = round(1.0 / max(1, len(models)), 3)
        for d in models:
            d.setdefault("ray_actor_options", {}).setdefault("num_gpus", share)
    try:
        return ServeDeploySchema.model_validate(cfg)
    except Exception as e:  # noqa: BLE001 - pydantic's ValidationError, shown as one line
        raise UserError(f"invalid Serve config: {e}") from None


def gpu_deployments(config: dict[str, Any]) -> list[str]:
    """``"Name num_gpus"`` of each deployment of the config that requests GPUs."""
    found = []
    for app in config.get("applications", []):
        for d in app.get("deployments", []):
            n = float((d.get("ray_actor_options") or {}).get("num_gpus") or 0)
            if n > 0:
                found.append(f"{d['name']} {n:g}")
    return found


def deploy(schema: Any, timeout_s: float = 600.0, progress: bool = False) -> None:
    """Start Serve with the config's HTTP options and deploy it; wait until it runs.

    Raises ``UserError`` with Serve's message if the application fails to deploy.
    """
    from ray.serve._private import api as serve_api
    from ray.serve.config import gRPCOptions

    client = serve_api.serve_start(
        http_options=schema.http_options.model_dump(),
        proxy_location=schema.proxy_location,
        grpc_options=gRPCOptions(**schema.grpc_options.model_dump()),
    )
    client.deploy_apps(schema)
    wait_running([a.name for a in schema.applications], timeout_s, progress)


def wait_running(names: list[str], timeout_s: float, progress: bool = False) -> None:
    from ray import serve

    deadline = time.monotonic() + timeout_s
    last = ""
    while True:
        apps = serve.status().applications
        states = {n: apps[n].status if n in apps else "NOT_STARTED" for n in names}
        failed = [n for n, s in states.items() if s in ("DEPLOY_FAILED", "UNHEALTHY")]
        if failed:
            app = apps[failed[0]]
            why = [app.message] + [
                f"{name}: {d.message}" for name, d in app.deployments.items() if d.message
            ]
            raise UserError(f"Serve application {failed[0]!r} failed: {' | '.join(why)}")
        if all(s == "RUNNING" for s in states.values()):
            return
        if time.monotonic() > deadline:
            raise UserError(f"Serve applications not running after {timeout_s:.0f} s: {states}")
        summary = ", ".join(f"{n} {getattr(s, 'value', s)}" for n, s in states.items())
        if progress and summary != last:
            print(f"  waiting for deployments: {summary}", flush=True)
            last = summary
        time.sleep(0.5)


def usage(url: str, api_key: bool) -> str:
    """How to call the service (printed by ``unclip serve``)."""
    auth = f' -H "Authorization: Bearer ${API_KEY_ENV}"' if api_key else ""
    body = '{"prompt": "a small red circle", "num_images": 1, "seed": 0}'
    save = (
        "python3 -c 'import sys, json, base64; "
        'open("out.png", "wb").write(base64.b64decode(json.load(sys.stdin)["images"][0]))\''
    )
    return "\n".join(
        [
            f"  web page:  {url}/",
            f"  API docs:  {url}/docs",
            f"  health:    curl {url}/v1/health   (readiness: {url}/v1/ready)",
            f"  generate:  curl -s {url}/v1/generate -H 'Content-Type: application/json'{auth} "
            f"-d {shlex.quote(body)} | {save}",
        ]
    )


# Serve gives a new HTTP proxy 5 s to report ready, then kills it; a loaded 2-core machine
# (training beside it, CI) can take longer. Read by Serve's actors, so set before ray.init
# starts the local cluster (workers inherit this environment).
SERVE_ENV_DEFAULTS = {
    "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "30",
    "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "30",
}


def set_serve_env_defaults() -> None:
    for key, value in SERVE_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: may resolve to any interface


def check_exposure(host: str, has_key: bool, insecure_no_api_key: bool) -> None:
    """Refuse to serve beyond this machine without an API key, unless told to."""
    from unclip.cli import UserError

    if has_key or insecure_no_api_key or is_loopback(host):
        return
    raise UserError(
        f"--host {host} makes the API reachable from other machines, and no API key is set: "
        f"set {API_KEY_ENV} (or {API_KEY_FILE_ENV}), or pass --insecure-no-api-key to serve "
        "without one"
    )


def run(args: argparse.Namespace) -> int:
    import ray
    from ray import serve
    from ray.serve._private.constants import SERVE_NAMESPACE

    config = load_config(args.config)  # the host to check; reloaded below for the GPUs
    api_key = bool(read_api_keys())  # the replicas of our local Ray inherit this environment
    host = args.host or config.get("http_options", {}).get("host") or "127.0.0.1"
    check_exposure(host, api_key, args.insecure_no_api_key)
    bundle = args.bundle
    spec = read_bundle_spec(bundle if "://" in bundle else os.path.abspath(bundle))
    started_ray = not ray.is_initialized()
    if started_ray:
        set_serve_env_defaults()
        if os.environ.get("RAY_ADDRESS"):
            from infra import local_ray

            local_ray.init(namespace=SERVE_NAMESPACE, log_to_driver=False)
        else:
            from infra import local_ray

            local_ray.init(namespace=SERVE_NAMESPACE, include_dashboard=False, log_to_driver=False)
    gpus = float(ray.cluster_resources().get("GPU", 0.0))
    if not args.config:  # the shipped config for this cluster: GPU stages only where GPUs are
        config = load_config(None, gpus)
    schema = serve_config(config, bundle, args.host, args.port, api_key, gpus)
    print(
        f"unclip serve: deploying bundle {bundle} (stages {', '.join(spec.stages)}; "
        f"{f'{gpus:g} GPU' if gpus else 'CPU'}; config {args.config or default_config_path(gpus)})",
        flush=True,
    )

    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        deploy(schema, progress=True)
        host = schema.http_options.host
        shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        url = f"http://{shown}:{schema.http_options.port}"
        print(f"\nserving at {url} (bound to {host})", flush=True)
        print(usage(url, bool(api_key)), flush=True)
        if api_key:
            print(
                f"  API key:   required (from ${API_KEY_ENV} / ${API_KEY_FILE_ENV}); "
                "/v1/health, /v1/ready and / stay open"
            )
        print("Ctrl-C to stop.", flush=True)
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        print("shutting down Serve ...", flush=True)
        serve.shutdown()
        if started_ray:
            ray.shutdown()
    print("stopped.", flush=True)
    return 0
