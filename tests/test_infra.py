"""Cluster configs validate against Ray's own schemas."""

from __future__ import annotations

import copy

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config


def load(path: str) -> dict:
    with open(path) as f:
        return yaml.safe_load(f)


def test_ray_cluster_yaml_validates_against_ray_schema() -> None:
    cfg = load("ray_cluster.yaml")
    full = prepare_config(copy.deepcopy(cfg))
    validate_config(full)
    assert set(full["available_node_types"]) == {"head", "cpu_worker", "gpu_worker"}
    starts = " ".join(full["head_start_ray_commands"] + full["worker_start_ray_commands"])
    assert "RAY_AUTH_MODE=token" in starts  # auth stays on
    assert "~/.ray/auth_token" in full["file_mounts"]


def test_schema_validation_catches_a_broken_config() -> None:
    cfg = load("ray_cluster.yaml")
    cfg["available_node_types"]["gpu_worker"]["max_workers"] = "four"
    with pytest.raises(Exception, match="four|not of type"):
        validate_config(prepare_config(cfg))


# ---------------------------------------------------------------------- KubeRay manifests
KUBERAY = "infra/kuberay"


def _manifest(name: str) -> dict:
    doc = load(f"{KUBERAY}/{name}")
    assert doc["apiVersion"] == "ray.io/v1"
    return doc


def _cluster_specs(doc: dict) -> list[dict]:
    spec = doc["spec"]
    found = [spec] if doc["kind"] == "RayCluster" else []
    found += [spec["rayClusterConfig"]] if "rayClusterConfig" in spec else []
    found += [spec["jobTemplate"]["rayClusterSpec"]] if "jobTemplate" in spec else []
    return found


@pytest.mark.parametrize(
    "name,kind",
    [
        ("raycluster.yaml", "RayCluster"),
        ("rayjob-train.yaml", "RayJob"),
        ("raycronjob-embed.yaml", "RayCronJob"),
        ("rayservice.yaml", "RayService"),
    ],
)
def test_kuberay_manifests_match_this_ray_and_keep_auth_on(name: str, kind: str) -> None:
    import ray

    doc = _manifest(name)
    assert doc["kind"] == kind
    for cluster in _cluster_specs(doc):
        assert cluster["rayVersion"] == ray.__version__  # the image's Ray is the one we test
        assert cluster["authOptions"] == {"mode": "token"}
        groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
        for group in groups:
            for container in group["template"]["spec"]["containers"]:
                assert container["image"].startswith("REGISTRY/unclip-ray:")
        for group in cluster["workerGroupSpecs"]:
            assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]


@pytest.mark.parametrize(
    "name,path",
    [("rayjob-train.yaml", ("spec",)), ("raycronjob-embed.yaml", ("spec", "jobTemplate"))],
)
def test_kuberay_job_entrypoints_are_valid_unclip_commands(name: str, path: tuple) -> None:
    import shlex

    from unclip.cli import build_parser

    spec = _manifest(name)
    for key in path:
        spec = spec[key]
    argv = shlex.split(spec["entrypoint"])
    assert argv[0] == "unclip"
    args = build_parser().parse_args(argv[1:])  # argparse exits on a flag that does not exist
    assert args.command in ("train", "embed")


def test_rayservice_serves_the_serving_config_with_its_bundle() -> None:
    from ray.serve.schema import ServeDeploySchema

    doc = _manifest("rayservice.yaml")
    served = yaml.safe_load(doc["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(served)  # what KubeRay hands to Serve must be valid
    local = load("serving/config.yaml")
    assert served["http_options"]["host"] == "0.0.0.0"  # reachable through the pod's service
    assert served["applications"][0]["args"]["bundle"].startswith("s3://")
    # apart from the bundle and the host, the same application as `unclip serve` deploys
    for cfg in (served, local):
        cfg["http_options"].pop("host")
        cfg["applications"][0]["args"].pop("bundle")
    assert served == local


def test_rayservice_probes_use_liveness_and_readiness() -> None:
    """Kubernetes restarts a pod on the cheap liveness route only; traffic follows readiness."""
    for cluster in _cluster_specs(_manifest("rayservice.yaml")):
        for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
            for container in group["template"]["spec"]["containers"]:
                assert container["livenessProbe"]["httpGet"] == {"path": "/v1/health", "port": 8000}
                assert container["startupProbe"]["httpGet"]["path"] == "/v1/health"
                assert container["readinessProbe"]["httpGet"] == {"path": "/v1/ready", "port": 8000}


def test_the_kubernetes_ingress_refuses_bodies_over_the_api_limit() -> None:
    """Serve's proxy buffers request bodies without a limit, so the Ingress in front of it
    carries the API's own body limit (for rayservice.yaml's limits) and points at its
    Serve service, with a read timeout above the request deadline."""
    from serving.limits import Limits

    ingress = load(f"{KUBERAY}/ingress.yaml")
    served = yaml.safe_load(_manifest("rayservice.yaml")["spec"]["serveConfigV2"])
    limits = Limits.from_sources(served["applications"][0]["args"]["limits"], env={})
    notes = ingress["metadata"]["annotations"]
    assert int(notes["nginx.ingress.kubernetes.io/proxy-body-size"]) == limits.max_body_bytes
    assert int(notes["nginx.ingress.kubernetes.io/proxy-read-timeout"]) > limits.request_timeout_s
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    name = _manifest("rayservice.yaml")["metadata"]["name"]
    assert backend == {"name": f"{name}-serve-svc", "port": {"number": 8000}}
