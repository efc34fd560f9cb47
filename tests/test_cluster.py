"""Cluster files: validated with Ray's own cluster-config schema (AWS itself cannot be reached here)."""

from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"


@pytest.mark.parametrize("name", ["aws.yaml", "local.yaml"])
def test_cluster_yaml_passes_rays_validator(name):
    validate_config(prepare_config(yaml.safe_load((CLUSTER / name).read_text())))


def test_validator_would_catch_a_broken_file():
    broken = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    broken["available_node_types"]["head"]["nodeconfig"] = broken["available_node_types"]["head"].pop("node_config")
    with pytest.raises(Exception, match="node_config"):
        validate_config(prepare_config(broken))


def test_aws_cluster_promises():
    cfg = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    nodes = cfg["available_node_types"]
    assert nodes[cfg["head_node_type"]]["resources"] == {"CPU": 0}  # the head takes no trials
    markets = {n: c["node_config"].get("InstanceMarketOptions", {}).get("MarketType", "on-demand") for n, c in nodes.items() if n != "head"}
    assert set(markets.values()) == {"spot", "on-demand"}
    assert all(c["node_config"]["InstanceType"].startswith(("g", "p")) for n, c in nodes.items() if n != "head")
    assert any(target.endswith("sylva_ray") for target in cfg["file_mounts"])
    assert all("--dashboard-host=127.0.0.1" in c for c in cfg["head_start_ray_commands"] if "ray start" in c)
    assert any("cluster/requirements.txt" in c for c in cfg["setup_commands"])


def test_cluster_pins_satisfy_the_project_dependencies():
    """Every runtime dependency is pinned for the cluster, at a version pyproject.toml accepts."""
    import tomllib

    from packaging.requirements import Requirement

    project = tomllib.loads((CLUSTER.parent / "pyproject.toml").read_text())["project"]["dependencies"]
    wanted = {Requirement(r).name.lower(): Requirement(r).specifier for r in project}
    pins = {}
    for line in (CLUSTER / "requirements.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            requirement = Requirement(line)
            pins[requirement.name.lower()] = next(iter(requirement.specifier)).version
    assert set(wanted) <= set(pins), sorted(set(wanted) - set(pins))
    for name, pinned in pins.items():
        assert wanted.get(name) is None or wanted[name].contains(pinned), f"{name}=={pinned} outside pyproject's {wanted[name]}"
