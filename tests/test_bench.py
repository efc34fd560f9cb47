"""The benchmarks run (no timing thresholds: only that they measure what they say)."""

import numpy as np
import pandas as pd
import pytest

from sylva_ray.engine.resolve import load_config
from sylva_ray.experiments.bench import run_bench


def test_comm_bench_counts_real_bytes(tmp_path):
    frame = run_bench("comm", load_config("smoke"), tmp_path)
    assert list(frame["model"]) == ["vit_pico_patch4_16", "vit_base_patch16_224"]
    vit_b = frame.iloc[1]
    assert vit_b["lora_params"] == 12 * 8 * (768 + 2304)  # 12 blocks x r8 x (in + out) of attn.qkv
    assert vit_b["adapter_bytes"] >= 4 * vit_b["lora_params"]
    assert vit_b["full_over_adapter"] > 200
    assert (tmp_path / "bench_comm.csv").is_file()


@pytest.mark.slow
def test_engine_bench_runs_three_variants_side_by_side(ray_cluster, tmp_path):
    frame = run_bench("engine", load_config("smoke", overrides=["federation.rounds=1"]), tmp_path)
    assert list(frame["variant"]) == ["plain in-process loop", "ray engine, 1 actor", "ray engine, 2 actors"]
    assert (frame["rounds_s"] > 0).all() and frame["vs_plain"].iloc[0] == 1.0
    assert pd.read_csv(tmp_path / "bench_engine.csv").shape[0] == 3


def test_clock_bench_costs_sylva_and_fat_on_every_mix(tmp_path):
    from sylva_ray.experiments.clock_bench import MIXES

    frame = run_bench("clock", load_config("smoke"), tmp_path)
    assert set(frame["algorithm"]) == {"sylva", "fat"} and set(frame["mix"]) == set(MIXES)
    sylva, fat = (frame[frame["algorithm"] == a] for a in ("sylva", "fat"))
    assert (sylva["round_vs_sylva"] == 1.0).all()
    assert (fat["bytes_each_way"] > 10 * sylva["bytes_each_way"].max()).all()  # the full model vs the adapter
    for _, group in frame.groupby(["algorithm", "mix"]):
        assert group["round_s"].iloc[0] >= group["total_s"].max()  # the slowest client is at least its profile's mean
        assert np.allclose(group["total_s"], group["compute_s"] + group["download_s"] + group["upload_s"])
    deadline = pd.read_csv(tmp_path / "bench_clock_deadline.csv")
    assert (deadline["straggler"] == (deadline["sim_total_s"] > deadline["deadline_s"])).all()
    assert deadline.groupby("deadline_quantile")["straggler"].sum().is_monotonic_decreasing
