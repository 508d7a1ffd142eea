"""cluster.yaml passes Ray's own cluster-launcher validation, before and after Ray fills in its defaults."""

from __future__ import annotations

from pathlib import Path

import yaml

CLUSTER = Path(__file__).resolve().parents[1] / "cluster.yaml"


def test_cluster_yaml_validates_with_ray():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(CLUSTER.read_text())
    validate_config(config)
    prepared = prepare_config(config)
    validate_config(prepared)
    pools = prepared["available_node_types"]
    assert prepared["head_node_type"] == "head"
    assert pools["gpu_pool"]["resources"]["GPU"] > 0 and "GPU" not in pools["cpu_pool"]["resources"]
    assert all(pools[p]["min_workers"] == 0 < pools[p]["max_workers"] for p in ("cpu_pool", "gpu_pool"))
    assert any("ray-e5[gpu]" in cmd for cmd in prepared["setup_commands"])


def test_ray_rejects_a_broken_cluster_yaml():
    import jsonschema
    import pytest
    from ray.autoscaler._private.util import validate_config

    config = yaml.safe_load(CLUSTER.read_text())
    config["available_node_types"]["gpu_pool"]["min_wrokers"] = 1
    with pytest.raises(jsonschema.ValidationError):
        validate_config(config)
