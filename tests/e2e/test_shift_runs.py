"""The shift preset end to end with one and two actors, and a study of two settings (the shifts
themselves, the room check and the study's arithmetic: ``tests/method/test_shift.py``).
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from sylva_ray.base.config import ConfigError
from sylva_ray.distributed.launcher import run
from sylva_ray.engine.resolve import raw_config
from tests.method.test_shift import EVERY_KIND, SMOKE_SIZED, _shift_cfg

TIMING = ["train_seconds", "actor_rss_mb", "actor_pid", "actor_node", "seconds"]


@pytest.fixture(scope="module")
def shift_runs(ray_cluster, tmp_path_factory):
    """The preset as it is (two actors), and every kind of shift with one and with two actors."""
    folder = tmp_path_factory.mktemp("shift")
    runs = {}
    for name, overrides in (
        ("preset", ["runtime.num_actors=2"]),
        (1, [*EVERY_KIND, "runtime.num_actors=1"]),
        (2, [*EVERY_KIND, "runtime.num_actors=2"]),
    ):
        run_dir = folder / str(name)
        run_dir.mkdir()
        runs[name] = (run_dir, run(_shift_cfg(*overrides), run_dir))
    return runs


def _metrics(run_dir):
    frame = pd.read_csv(run_dir / "metrics.csv")
    return frame.drop(columns=[c for c in TIMING if c in frame]).sort_values(["round", "client"]).reset_index(drop=True)


def test_the_shift_preset_runs_end_to_end_and_records_its_domains(shift_runs):
    run_dir, summary = shift_runs["preset"]
    assert summary["phase2"] and np.isfinite(summary["final"]["robust_acc"])
    partition = json.loads((run_dir / "partition.json").read_text())
    assert partition["shift"]["kind"] == "stroke" and len(partition["shift"]["client_domain"]) == 8
    levels = [d["level"] for d in partition["shift"]["domains"]]
    assert levels == pytest.approx([-0.75, -0.25, 0.25, 0.75])
    assert summary["partition"]["mean_feature_distance"] > 0


def test_shifted_runs_are_identical_with_one_and_two_actors(shift_runs):
    (one, _), (two, _) = shift_runs[1], shift_runs[2]
    pd.testing.assert_frame_equal(_metrics(one), _metrics(two))
    assert (one / "partition.json").read_text() == (two / "partition.json").read_text()
    for client in range(8):
        a = load_file(str(one / "models" / f"client_{client:04d}.safetensors"))
        b = load_file(str(two / "models" / f"client_{client:04d}.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_a_study_runs_each_setting_and_sets_them_side_by_side(ray_cluster, tmp_path):
    from sylva_ray.experiments.study import run_study

    raw = raw_config("shift", None, [*SMOKE_SIZED, "data.num_clients=4", "federation.rounds=1"])
    table = run_study(raw, ["iid", "shift"], ["local_at", "fedavg_lora_at"], 1, tmp_path / "study")
    assert set(table["setting"]) == {"iid", "shift"} and set(table["status"]) == {"ok"}
    for setting in ("iid", "shift"):
        assert (tmp_path / "study" / setting / "seed0" / "comparison.csv").is_file()
    shifted = json.loads(
        (tmp_path / "study" / "shift" / "seed0" / "runs" / "local_at" / "seed0" / "partition.json").read_text()
    )
    plain = json.loads(
        (tmp_path / "study" / "iid" / "seed0" / "runs" / "local_at" / "seed0" / "partition.json").read_text()
    )
    assert shifted["shift"]["kind"] == "stroke" and "shift" not in plain
    text = (tmp_path / "study" / "study.md").read_text()
    assert "fedavg_lora_at" in text and "Minus `local_at`" in text and (tmp_path / "study" / "study.png").is_file()
    with pytest.raises(ConfigError, match="other arguments"):
        run_study(raw, ["iid"], ["local_at"], 1, tmp_path / "study")
