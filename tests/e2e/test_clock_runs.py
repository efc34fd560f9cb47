"""The simulated clock in real runs: the Ray engine with 1 and 2 client actors gives the same
stragglers and availability (the clock's arithmetic: ``tests/engine/test_clock.py``).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from sylva_ray.engine.resolve import load_config

DEADLINE_RUN = [
    "federation.rounds=2",
    "layer_selection.enabled=false",
    "evaluation.autoattack=false",
    "evaluation.sanity_checks=false",
    "system.devices=[jetson_agx_orin@wifi, raspberry_pi5@4g, jetson_orin_nano@wifi, phone_midrange@4g]",
    "system.availability=true",
    "federation.deadline_s=0.2",
]


@pytest.fixture(scope="module")
def runs(ray_cluster, tmp_path_factory):
    from sylva_ray.distributed.launcher import run

    out = {}
    for actors in (1, 2):
        run_dir = tmp_path_factory.mktemp(f"clock{actors}")
        cfg = load_config("smoke", overrides=[*DEADLINE_RUN, f"runtime.num_actors={actors}"])
        out[actors] = run_dir, run(cfg, run_dir)
    return out


CLOCK_COLUMNS = ["round", "client", "online", "straggler", "sim_compute_s", "sim_download_s", "sim_upload_s"]


def test_stragglers_and_availability_do_not_depend_on_the_actor_count(runs):
    (one, _), (two, _) = runs[1], runs[2]
    a, b = (pd.read_csv(d / "metrics.csv").sort_values(["round", "client"]) for d in (one, two))
    pd.testing.assert_frame_equal(a[CLOCK_COLUMNS].reset_index(drop=True), b[CLOCK_COLUMNS].reset_index(drop=True))
    assert a["straggler"].any() and not a["straggler"].all()


def test_a_straggler_is_not_aggregated_and_rounds_last_until_the_deadline(runs):
    run_dir, summary = runs[2]
    metrics = pd.read_csv(run_dir / "metrics.csv")
    late = metrics[metrics["straggler"].fillna(False).astype(bool)]
    assert (late["sim_total_s"] > 0.2).all() and not late["participated"].any() and (late["bytes_up"] == 0).all()
    assert late["agg_weight"].isna().all() if "agg_weight" in late else True
    on_time = metrics[metrics["participated"].fillna(False).astype(bool)]
    assert (on_time["sim_total_s"] <= 0.2).all()
    rounds = pd.read_csv(run_dir / "rounds.csv")
    with_late = rounds["stragglers"] > 0
    assert (rounds.loc[with_late, "sim_round_s"] == 0.2).all()
    assert np.allclose(rounds["sim_clock_s"], rounds["sim_round_s"].cumsum())
    assert summary["simulated"]["straggler_client_rounds"] == len(late)
    assert summary["simulated"]["hours"] == pytest.approx(rounds["sim_round_s"].sum() / 3600)


def test_the_run_directory_records_devices_and_plots(runs):
    run_dir, summary = runs[2]
    devices = pd.read_csv(run_dir / "devices.csv")
    needed = {
        "client",
        "profile",
        "flops_per_s",
        "efficiency",
        "downlink_mbps",
        "uplink_mbps",
        "latency_s",
        "memory_gb",
    }
    assert needed <= set(devices.columns) and len(devices) == 4
    assert devices["profile"].tolist() == DEADLINE_RUN[4].split("=", 1)[1].strip("[]").split(", ")
    assert (run_dir / "accuracy_vs_sim_time.png").is_file() and (run_dir / "sim_time_by_device.png").is_file()
    assert {"time_to_90pct_robust_acc_s", "time_to_95pct_robust_acc_s"} <= set(summary["simulated"])
