"""Ray Tune: the sweep's smoke mode on the session's local Ray cluster, and its building blocks."""

import importlib.util
from pathlib import Path

import pandas as pd
import pytest

from sylva_ray.base.config import ConfigError
from sylva_ray.distributed.tune import (
    DRIVER_BUNDLE_CPUS,
    check_grid,
    expand,
    parse_grid,
    trial_resources,
)
from sylva_ray.engine.resolve import load_config
from sylva_ray.experiments.sweep_report import heterogeneity_axis
from tests.helpers.event_files import scalars

ROOT = Path(__file__).resolve().parents[2]


def _sweep_module():
    spec = importlib.util.spec_from_file_location("rank_eps", ROOT / "sweeps" / "rank_eps.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_grid_and_heterogeneity_parsing():
    assert parse_grid(["lora.rank=4,8", "attack.eps=0.03"]) == {"lora.rank": [4, 8], "attack.eps": [0.03]}
    axis = heterogeneity_axis("0.1,iid")
    assert axis == {"0.1": {"data.partition": "dirichlet", "data.alpha": 0.1}, "iid": {"data.partition": "iid"}}
    assert expand({"lora.rank": 4, "heterogeneity": "iid"}, {"heterogeneity": axis}) == {
        "lora.rank": 4,
        "data.partition": "iid",
    }
    for bad in (["lora.rank"], ["lora.rank="]):
        with pytest.raises(ConfigError, match="--grid"):
            parse_grid(bad)
    for bad in ("0", "mild", ""):
        with pytest.raises(ConfigError, match="heterogeneity"):
            heterogeneity_axis(bad)


def test_a_bad_grid_value_fails_before_any_trial():
    base = load_config("smoke").to_dict()
    with pytest.raises(ConfigError, match="lora.rank"):
        check_grid(base, {"lora.rank": [4, 0]}, {})


def test_trial_reserves_a_bundle_per_client_actor():
    cfg = load_config(
        "smoke", overrides=["runtime.num_actors=3", "runtime.client_resources={num_cpus: 0.5, num_gpus: 0.25}"]
    )
    bundles = trial_resources(cfg).bundles
    assert bundles[0] == {"CPU": DRIVER_BUNDLE_CPUS}
    assert bundles[1:] == [{"CPU": 0.5, "GPU": 0.25}] * 3


@pytest.mark.slow
def test_smoke_sweep_runs_reports_and_resumes(ray_cluster, tmp_path):
    sweep = _sweep_module()
    # a GPU share on this GPU-less one-machine cluster: dropped from the bundles and in the trial alike
    gpu_share = ["--set", "runtime.client_resources={num_cpus: 1, num_gpus: 0.5}"]
    assert sweep.main(["--smoke-test", "--storage-path", str(tmp_path), *gpu_share]) == 0
    folder = tmp_path / "rank_eps"
    table = pd.read_csv(folder / "trials.csv")
    assert len(table) == 2 and (table["status"] == "OK").all()
    assert sorted(table["lora.rank"]) == [2, 4]
    assert table["final_robust_acc"].between(0, 1).all() and (table["rounds_done"] == 2).all()
    for plot in ("accuracy_vs_rank.png", "tradeoff.png"):
        assert (folder / plot).is_file()
    # the pool is sized from the trial's bundles (1 client actor), not from the cluster (2 CPUs)
    for metrics in folder.glob("*/run/metrics.csv"):
        assert pd.read_csv(metrics)["actor_pid"].dropna().nunique() == 1
    # each trial's run tracks itself; the table says what the trials ran on
    assert len(list(folder.glob("*/run/tb/events.out.tfevents.*"))) == 2
    trial = next(folder.glob("*/run")).parent  # Tune's own event files show the reports under the same names
    assert {"ray/tune/bytes_up", "ray/tune/train_loss"} <= set(scalars(trial))
    assert table["env.torch.version"].notna().all() and (table["env.device"] == "cpu").all()
    assert sweep.main(["--smoke-test", "--storage-path", str(tmp_path), "--resume", *gpu_share]) == 0
    again = pd.read_csv(folder / "trials.csv")
    assert sorted(again["trial"]) == sorted(table["trial"])


def test_trials_share_staged_inputs_unless_the_data_source_or_model_differ():
    from sylva_ray.distributed.tune import inputs_key

    base = load_config("smoke")
    same = [
        load_config("smoke", overrides=o)
        for o in (
            ["data.alpha=0.1"],
            ["data.partition=iid"],
            ["lora.rank=16"],
            ["data.num_clients=3"],
            ["attack.eps=0.1"],
        )
    ]
    assert {inputs_key(c) for c in same} == {inputs_key(base)}  # the split and the training differ, not the inputs
    assert inputs_key(load_config("smoke", overrides=["data.max_samples=500"])) != inputs_key(base)
    assert inputs_key(load_config("smoke", overrides=["model.pretrain_epochs=3"])) != inputs_key(base)


def test_a_trial_does_not_recheck_paths_the_sweeps_main_process_read(tmp_path):
    from sylva_ray.distributed.tune import apply_overrides

    base = load_config("paper", overrides=[f"data.root={tmp_path}"]).to_dict()
    base["data"]["root"] = "/only/on/the/head/cifar10"
    with pytest.raises(ConfigError, match="data.root"):
        apply_overrides(base, {})
    assert apply_overrides(base, {}, check_paths=False).data.root == "/only/on/the/head/cifar10"


def test_a_gpu_share_is_dropped_from_trial_bundles_only_where_no_gpu_can_come():
    cfg = load_config("smoke", overrides=["runtime.client_resources={num_cpus: 1, num_gpus: 0.5}"])
    assert trial_resources(cfg, gpus_available=False).bundles[1:] == [{"CPU": 1.0}]
    assert trial_resources(cfg, gpus_available=True).bundles[1:] == [{"CPU": 1.0, "GPU": 0.5}]
