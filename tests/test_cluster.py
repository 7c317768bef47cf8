"""cluster.yaml is checked against Ray's own autoscaler schema, after Ray fills in its defaults."""

from pathlib import Path

import yaml

CLUSTER = Path(__file__).parent.parent / "cluster.yaml"


def test_cluster_yaml_passes_rays_autoscaler_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(CLUSTER.read_text())
    validate_config(prepare_config(config))  # raises jsonschema.ValidationError on a bad key or type
    nodes = config["available_node_types"]
    assert nodes[config["head_node_type"]]["resources"] == {"CPU": 0}
    gpus = {name: n["resources"].get("GPU", 0) for name, n in nodes.items()}
    assert sorted(gpus.values()) == [0, 1, 8]
    assert all(
        n.get("min_workers", 0) == 0 and n.get("max_workers", 0) >= 1
        for name, n in nodes.items()
        if gpus[name]
    )
    image = config["docker"]["image"]
    assert image.startswith("rayproject/ray:") and "-gpu" in image and "ray-ml" not in image
    assert any("pip install" in c and "/home/ray/iterit" in c for c in config["setup_commands"])


def test_a_wrong_key_fails_the_schema():
    import jsonschema
    import pytest
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(CLUSTER.read_text())
    config["available_node_types"]["gpu_1x"]["min_wokers"] = 0
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(config))
