"""The benchmarks run (no timing thresholds: only that they measure what they say)."""

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
