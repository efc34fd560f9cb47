"""`sylva-ray compare` on the session's real Ray cluster: runs in parallel, one table, resumable."""

from __future__ import annotations

import pandas as pd
import pytest
import yaml

from sylva_ray.base.config import ConfigError
from sylva_ray.cli import main
from sylva_ray.engine.resolve import raw_config
from sylva_ray.experiments.compare import ThreatGrid, plan_runs, plan_threat_runs

TINY = [
    "federation.rounds=1",
    "data.num_clients=3",
    "train.local_steps=2",
    "attack.eval_max_samples=8",
    "evaluation.autoattack_max_samples=4",
    "evaluation.sanity_samples=4",
    "evaluation.sanity_long_steps=6",
    "attack.autoattack_steps=2",
    "attack.autoattack_square_queries=10",
    "runtime.client_resources={num_cpus: 1}",
]


def _compare(out, *options):
    """``sylva-ray compare --preset smoke`` with the TINY settings, into ``out``."""
    return ["compare", "--preset", "smoke", *[item for s in TINY for item in ("--set", s)], "--out", str(out), *options]


def _args(out, *extra):
    return _compare(out, "--algorithms", "sylva-no_phase2,fat", "--seeds", "2", "--reference", "fat", *extra)


@pytest.mark.slow
def test_compare_writes_the_table_plots_and_resumes(ray_cluster, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(_args(out)) == 0
    frame = pd.read_csv(out / "comparison.csv")
    assert sorted(zip(frame["algorithm"], frame["seed"])) == [
        ("fat", 0),
        ("fat", 1),
        ("sylva-no_phase2", 0),
        ("sylva-no_phase2", 1),
    ]
    assert (frame["status"] == "ok").all()
    fat = frame[frame["algorithm"] == "fat"].iloc[0]
    lora = frame[frame["algorithm"] == "sylva-no_phase2"].iloc[0]
    assert fat["upload_mb_per_round"] > 10 * lora["upload_mb_per_round"]
    assert pd.notna(fat["global_clean_acc"]) and pd.isna(lora["global_clean_acc"])
    assert frame["env.cpu.model"].notna().all() and (frame["env.device"] == "cpu").all()
    md = (out / "comparison.md").read_text()
    assert "Ran on: device cpu" in md
    assert "| fat | 2 |" in md and "## Relative to `fat`" in md and "36.4x" in md
    for plot in ("pareto.png", "accuracy_vs_upload.png", "per_client.png"):
        assert (out / plot).stat().st_size > 0
    # each run is a normal run directory; the same seed shares one partition across algorithms
    for seed in (0, 1):
        parts = {(out / "runs" / a / f"seed{seed}" / "partition.json").read_text() for a in ("fat", "sylva-no_phase2")}
        assert len(parts) == 1
    assert (out / "runs" / "fat" / "seed0" / "checkpoints" / "checkpoint.pt").is_file()
    assert "comparison" in capsys.readouterr().out.lower()

    # resume: finished runs are skipped (their summaries are not rewritten); a missing one is redone
    summary = out / "runs" / "fat" / "seed0" / "summary.json"
    stamp = summary.stat().st_mtime_ns
    (out / "runs" / "fat" / "seed1" / "summary.json").unlink()
    assert main(_args(out)) == 0
    assert summary.stat().st_mtime_ns == stamp
    assert (out / "runs" / "fat" / "seed1" / "summary.json").is_file()

    # the same folder with another request is refused, naming what differs
    assert main(_args(out, "--set", "attack.eps=0.1")) == 2


def test_bad_requests_fail_before_any_work(tmp_path):
    base = raw_config("smoke", None, TINY)
    with pytest.raises(ConfigError, match="unknown algorithm 'fedprox'"):
        plan_runs(base, ["sylva", "fedprox"], 1, tmp_path / "x")
    with pytest.raises(ConfigError, match="does not apply"):
        plan_runs(base, ["fat-no_phase2"], 1, tmp_path / "x")
    with pytest.raises(ConfigError, match="twice"):
        plan_runs(base, ["fat", "fat"], 1, tmp_path / "x")
    assert (
        main(
            [
                "compare",
                "--preset",
                "smoke",
                "--algorithms",
                "sylva",
                "--reference",
                "fat",
                "--out",
                str(tmp_path / "y"),
            ]
        )
        == 2
    )
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_each_seed_gets_its_own_runtime_seed_and_the_algorithm_its_settings(tmp_path):
    specs = plan_runs(raw_config("smoke", None, [*TINY, "runtime.seed=7"]), ["fat", "sylva-fedavg"], 2, tmp_path)
    assert [(s.algorithm, s.seed, s.cfg.runtime.seed) for s in specs] == [
        ("fat", 7, 7),
        ("fat", 8, 8),
        ("sylva-fedavg", 7, 7),
        ("sylva-fedavg", 8, 8),
    ]
    assert specs[0].cfg.federation.aggregation == "fedavg" and specs[2].cfg.algorithm.ablations == ["fedavg"]
    assert specs[2].cfg.loss.benign_weight == 1.0  # the user's Sylva loss is not inherited from FAT's settings
    assert yaml.safe_load(specs[0].cfg.to_yaml())["algorithm"]["name"] == "fat"


def _threat_args(out, *extra):
    return _compare(
        out,
        *("--algorithms", "sylva-no_phase2", "--aggregations", "fedavg,median", "--behaviours", "sign_flip"),
        *("--fractions", "0,0.34", "--seeds", "1", *extra),
    )


@pytest.mark.slow
def test_threat_sweep_runs_each_rule_under_each_attack_with_one_malicious_set(ray_cluster, tmp_path, capsys):
    out = tmp_path / "threat"
    assert main(_threat_args(out)) == 0
    frame = pd.read_csv(out / "comparison.csv")
    assert sorted(zip(frame["aggregation"], frame["behaviour"], frame["malicious_fraction"])) == [
        ("fedavg", "none", 0.0),
        ("fedavg", "sign_flip", 0.34),
        ("median", "none", 0.0),
        ("median", "sign_flip", 0.34),
    ]
    assert (frame["status"] == "ok").all() and frame.set_index("behaviour")["num_malicious"].to_dict() == {
        "none": 0,
        "sign_flip": 1,
    }
    runs = out / "runs" / "sylva-no_phase2"
    sets = {
        rule: yaml.safe_load((runs / rule / "sign_flip-0.34" / "seed0" / "adversary.json").read_text())["clients"]
        for rule in ("fedavg", "median")
    }
    assert sets["fedavg"] == sets["median"] and len(sets["fedavg"]) == 1  # one malicious set across rules
    attacked = pd.read_csv(runs / "median" / "sign_flip-0.34" / "seed0" / "metrics.csv")
    assert attacked.loc[attacked["malicious"], "client"].unique().tolist() == sets["median"]
    assert attacked["agg_weight"].notna().any()
    table = pd.read_csv(out / "threat.csv")
    # the attack-free cell starts every behaviour's line
    assert sorted(zip(table["aggregation"], table["malicious_fraction"])) == [
        ("fedavg", 0.0),
        ("fedavg", 0.34),
        ("median", 0.0),
        ("median", 0.34),
    ]
    clean_rows = table[table["malicious_fraction"] == 0]
    assert (clean_rows["clean_acc_drop_mean"] == 0).all()  # the attack-free run against itself
    attacked_rows = table[table["malicious_fraction"] > 0]
    assert attacked_rows["clean_acc_no_attack_mean"].notna().all()  # scored on the same honest clients
    assert (out / "threat.png").stat().st_size > 0
    assert "# Threat sweep" in capsys.readouterr().out


def test_bad_threat_requests_fail_before_any_work(tmp_path):
    base = raw_config("smoke", None, TINY)  # 3 clients
    grid = ThreatGrid(aggregations=["krum"], behaviours=["alie"], fractions=[0.0, 0.34])
    with pytest.raises(ConfigError, match="krum needs n > 2f"):
        plan_threat_runs(base, ["sylva"], grid, 1, tmp_path / "x")
    bad = ThreatGrid(aggregations=["fedavg", "mean"], behaviours=["alie", "alie"], fractions=[0.0, 1.5])
    with pytest.raises(ConfigError) as caught:
        plan_threat_runs(base, ["sylva"], bad, 1, tmp_path / "x")
    assert "'mean'" in str(caught.value) and "twice" in str(caught.value) and "1.5" in str(caught.value)
    assert main(_threat_args(tmp_path / "y", "--fractions", "0,a")) == 2
    assert main(_threat_args(tmp_path / "y", "--reference", "fedavg")) == 2
    fixed = ThreatGrid(aggregations=["median"], behaviours=["alie"], fractions=[0.0])
    with pytest.raises(ConfigError, match="'fat' fixes federation.aggregation='fedavg'"):
        plan_threat_runs(base, ["fat"], fixed, 1, tmp_path / "x")  # a baseline would silently run FedAvg
    same_count = ThreatGrid(aggregations=["fedavg"], behaviours=["alie"], fractions=[0.0, 0.3, 0.34])
    with pytest.raises(ConfigError, match="same cell twice"):
        plan_threat_runs(base, ["sylva"], same_count, 1, tmp_path / "x")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_threat_runs_share_partitions_and_the_rules_tolerance(tmp_path):
    base = raw_config("smoke", None, [*TINY, "data.num_clients=10"])
    grid = ThreatGrid(aggregations=["fedavg", "krum"], behaviours=["alie", "label_flip"], fractions=[0.0, 0.1, 0.3])
    specs = plan_threat_runs(base, ["sylva"], grid, 2, tmp_path / "x")
    assert len(specs) == 2 * (1 + 2 * 2) * 2
    assert {s.cfg.federation.byzantine_f for s in specs} == {3}  # the largest fraction's count, for every cell
    assert all(s.cfg.federation.aggregation == s.threat.aggregation for s in specs)
    assert {(s.seed, s.cfg.runtime.seed) for s in specs} == {(0, 0), (1, 1)}
    clean = [s for s in specs if s.threat.behaviour == "none"]
    assert {s.cfg.adversary.fraction for s in clean} == {0.0}
    assert len({s.run_dir for s in specs}) == len(specs)
