"""Cluster files: validated with Ray's own cluster-config schema (AWS itself cannot be reached here)."""

import sys
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER = Path(__file__).resolve().parents[2] / "cluster"


@pytest.mark.parametrize("name", ["aws.yaml", "local.yaml"])
def test_cluster_yaml_passes_rays_validator(name):
    validate_config(prepare_config(yaml.safe_load((CLUSTER / name).read_text())))


def test_validator_would_catch_a_broken_file():
    broken = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    broken["available_node_types"]["head"]["nodeconfig"] = broken["available_node_types"]["head"].pop("node_config")
    with pytest.raises(Exception, match="node_config"):
        validate_config(prepare_config(broken))


def test_aws_cluster_promises():
    text = (CLUSTER / "aws.yaml").read_text()
    cfg = yaml.safe_load(text)
    nodes = cfg["available_node_types"]
    assert nodes[cfg["head_node_type"]]["resources"] == {"CPU": 0}  # the head takes no client actors
    markets = {
        n: c["node_config"].get("InstanceMarketOptions", {}).get("MarketType", "on-demand")
        for n, c in nodes.items()
        if n != "head"
    }
    assert set(markets.values()) == {"spot", "on-demand"}
    assert all(c["node_config"]["InstanceType"].startswith(("g", "p")) for n, c in nodes.items() if n != "head")
    assert any(target.endswith("sylva_ray") for target in cfg["file_mounts"])
    assert all("--dashboard-host=127.0.0.1" in c for c in cfg["head_start_ray_commands"] if "ray start" in c)
    assert any("cluster/requirements.txt" in c for c in cfg["setup_commands"])
    assert cfg["provider"]["security_group"]["GroupName"]  # a group the README says to create with SSH restricted


def test_aws_cluster_boots_a_current_image_not_rays_2020_default():
    """``latest_dlami`` is Ray's hard-coded Ubuntu 18.04 DLAMI v71 (CUDA 11.2): never again."""
    text = (CLUSTER / "aws.yaml").read_text()
    cfg = yaml.safe_load(text)
    assert "latest_dlami" not in text
    amis = {c["node_config"]["ImageId"] for c in cfg["available_node_types"].values()}
    assert len(amis) == 1 and (amis.pop().startswith(("resolve:ssm:/aws/service/deeplearning/", "ami-")))
    image = cfg["docker"]["image"]
    repository, tag = image.split(":")
    ray_pin = next(
        line.split("==")[1]
        for line in (CLUSTER / "requirements.txt").read_text().splitlines()
        if line.startswith("ray[")
    )
    assert repository == "rayproject/ray" and tag.startswith(f"{ray_pin}-py311-"), (
        image,
        ray_pin,
    )  # pinned, = the pinned Ray
    assert (
        tag.endswith(("-gpu", "-cu121", "-cu128")) and "head_image" not in cfg["docker"]
    )  # one CUDA image on every node
    assert "--gpus all" in cfg["docker"]["worker_run_options"]


def test_aws_head_has_boto3_for_the_autoscaler():
    cfg = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    assert any("pip install" in c and "boto3" in c for c in cfg["head_setup_commands"])


@pytest.mark.parametrize("name", ["aws.yaml", "local.yaml"])
def test_token_authentication_is_set_up_for_head_and_workers(name):
    cfg = yaml.safe_load((CLUSTER / name).read_text())
    env = " ".join(cfg.get("docker", {}).get("run_options", []))
    for commands in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in cfg[commands] if "ray start" in c]
        assert starts and all("RAY_AUTH_MODE=token" in c or "RAY_AUTH_MODE=token" in env for c in starts), commands
    assert any("get-auth-token --generate" in c for c in cfg["head_setup_commands"])  # generated on the head
    assert any("~/.ray/auth_token" in c for c in cfg["worker_setup_commands"])  # copied to every worker
    auth_mount = next(target for target, source in cfg["file_mounts"].items() if source == "./cluster/auth")
    assert any(auth_mount in c for c in cfg["worker_setup_commands"])
    ignored = (CLUSTER / "auth" / ".gitignore").read_text().splitlines()
    assert "*" in ignored  # a token copied into cluster/auth/ is never committed


def test_the_token_commands_generate_once_and_hand_the_same_token_on(tmp_path):
    """The head's and a worker's setup commands, run for real with the `ray` CLI in a temporary home."""
    import os
    import subprocess

    cfg = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    mount = next(target for target, source in cfg["file_mounts"].items() if source == "./cluster/auth")
    shared = tmp_path / "synced"
    shared.mkdir()

    def run_as(home: Path, commands: list[str]) -> None:
        home.mkdir(exist_ok=True)
        env = dict(os.environ, HOME=str(home), PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
        env.pop("RAY_AUTH_TOKEN", None)
        for command in commands:
            subprocess.run(["bash", "-c", command.replace(mount, str(shared))], env=env, check=True, timeout=120)

    head_commands = [c for c in cfg["head_setup_commands"] if "boto3" not in c]
    run_as(tmp_path / "head", head_commands)
    token = (tmp_path / "head" / ".ray" / "auth_token").read_text().strip()
    assert len(token) >= 32 and (shared / "auth_token").read_text().strip() == token
    assert oct((tmp_path / "head" / ".ray" / "auth_token").stat().st_mode & 0o777) == "0o600"
    run_as(tmp_path / "head", head_commands)  # a second `ray up` keeps the cluster's token
    assert (shared / "auth_token").read_text().strip() == token
    run_as(tmp_path / "worker", cfg["worker_setup_commands"])
    assert (tmp_path / "worker" / ".ray" / "auth_token").read_text().strip() == token


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
        assert wanted.get(name) is None or wanted[name].contains(pinned), (
            f"{name}=={pinned} outside pyproject's {wanted[name]}"
        )
