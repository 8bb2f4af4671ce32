"""GPU placement without a Ray cluster: the device from assigned ids, and the GPU configs.

What Ray actually grants on a cluster with declared GPUs is tested in
``tests/test_multinode.py`` (``test_gpu_scheduling``).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import yaml
from ray.serve.schema import ServeDeploySchema

from serving.cli import (
    CONFIG_PATH,
    CPU_CONFIG_PATH,
    default_config_path,
    gpu_deployments,
    load_config,
    serve_config,
)
from unclip.devices import GpuUnavailableError, assigned_device
from unclip.errors import UserError

MODEL_STAGES = ("TextEncoder", "ImageEncoder", "Prior", "Decoder", "Upsampler1")


# ---------------------------------------------------------------------- device from ids
def test_no_assigned_gpu_means_the_cpu_even_where_cuda_is_visible(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert assigned_device([]) == torch.device("cpu")


@pytest.mark.parametrize(
    "ids,visible,expected",
    [
        (["3"], "2,3", 1),  # torch numbers the visible devices from 0
        ([1], "1", 0),  # Ray's usual case: only the own GPU is visible
        (["3"], "", 3),  # no CUDA_VISIBLE_DEVICES (RAY_EXPERIMENTAL_NOSET_...): node numbers
        (["GPU-5f1c"], "GPU-aa,GPU-5f1c", 1),  # UUIDs
    ],
)
def test_the_device_is_the_assigned_gpu(monkeypatch, ids, visible, expected) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert assigned_device(ids, visible=visible) == torch.device("cuda", expected)


def test_an_assigned_gpu_torch_cannot_see_is_an_error(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(GpuUnavailableError, match="does not see it"):
        assigned_device(["1"], visible="0")


def test_an_assigned_gpu_without_cuda_is_one_clear_error(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(GpuUnavailableError) as e:
        assigned_device(["0"], what="a test worker")
    msg = str(e.value)
    assert "\n" not in msg
    assert "Ray granted GPU 0 to a test worker" in msg
    assert "CUDA is not available" in msg and "--gpus-per-worker 0" in msg


# ---------------------------------------------------------------------- Serve configs
def _deployments(cfg: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {d["name"]: d for d in cfg["applications"][0]["deployments"]}


def _min_replicas(d: dict[str, Any]) -> int:
    auto = d.get("autoscaling_config")
    return int(auto["min_replicas"]) if auto else int(d.get("num_replicas", 1))


def _rayservice_config() -> dict[str, Any]:
    with open("infra/kuberay/rayservice.yaml") as f:
        doc = yaml.safe_load(f)
    return yaml.safe_load(doc["spec"]["serveConfigV2"])


@pytest.mark.parametrize("source", ["serving", "rayservice"])
def test_gpu_configs_request_gpus_replicas_memory_and_drain_past_the_deadline(source) -> None:
    cfg = load_config(CONFIG_PATH) if source == "serving" else _rayservice_config()
    ServeDeploySchema.model_validate(cfg)  # still what `serve deploy` / KubeRay accept
    deps = _deployments(cfg)
    limits = cfg["applications"][0]["args"]["limits"]
    deadline = max(limits["request_timeout_s"], limits["stage_timeout_s"])
    for name in MODEL_STAGES:
        assert deps[name]["ray_actor_options"]["num_gpus"] > 0, name
    assert not deps["Ingress"]["ray_actor_options"].get("num_gpus")
    for name in ("Ingress", "TextEncoder", "ImageEncoder"):  # every request passes them
        assert _min_replicas(deps[name]) >= 2, name
    for name, d in deps.items():
        assert d["graceful_shutdown_timeout_s"] > deadline, name
        assert d["ray_actor_options"]["memory"] >= 2**30, name


def test_rayservice_has_the_gpus_its_minimum_replicas_request() -> None:
    with open("infra/kuberay/rayservice.yaml") as f:
        doc = yaml.safe_load(f)
    deps = _deployments(yaml.safe_load(doc["spec"]["serveConfigV2"]))
    need = sum(_min_replicas(d) * d["ray_actor_options"].get("num_gpus", 0) for d in deps.values())
    have = 0
    for group in doc["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
        for c in group["template"]["spec"]["containers"]:
            have += group["minReplicas"] * int(c["resources"]["limits"].get("nvidia.com/gpu", 0))
    assert have >= need > 0


def test_cpu_config_requests_no_gpu_and_is_the_default_without_gpus() -> None:
    cpu = load_config(CPU_CONFIG_PATH)
    ServeDeploySchema.model_validate(cpu)
    assert gpu_deployments(cpu) == []
    assert default_config_path(0.0) == CPU_CONFIG_PATH and load_config() == cpu
    assert default_config_path(2.0) == CONFIG_PATH
    assert load_config(None, gpus=2.0) == load_config(CONFIG_PATH)
    # apart from resources, replicas and draining, the same application on either
    gpu = load_config(CONFIG_PATH)
    assert cpu["applications"][0]["args"] == gpu["applications"][0]["args"]
    assert set(_deployments(cpu)) == set(_deployments(gpu))


def test_a_gpu_config_on_a_cluster_without_gpus_is_refused(tmp_path) -> None:
    with pytest.raises(UserError, match="requests GPUs .*Decoder 0.5.* has none"):
        serve_config(load_config(CONFIG_PATH), str(tmp_path), gpus=0.0)
