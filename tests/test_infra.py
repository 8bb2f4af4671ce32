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
