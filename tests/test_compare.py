"""`sylva-ray compare` on the session's real Ray cluster: runs in parallel, one table, resumable."""

from __future__ import annotations

import pandas as pd
import pytest
import yaml

from sylva_ray.base.config import ConfigError
from sylva_ray.cli import main
from sylva_ray.engine.resolve import raw_config
from sylva_ray.experiments.compare import plan_runs

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


def _args(out, *extra):
    sets = [item for s in TINY for item in ("--set", s)]
    return [
        "compare",
        "--preset",
        "smoke",
        *sets,
        "--algorithms",
        "sylva-no_phase2,fat",
        "--seeds",
        "2",
        "--reference",
        "fat",
        "--out",
        str(out),
        *extra,
    ]


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
    md = (out / "comparison.md").read_text()
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
