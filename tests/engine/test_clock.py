"""The simulated clock (engine/clock.py, method/devices.py, method/cost.py): arithmetic by hand,
FLOPs by hand, seeded assignment and availability, refusals (stragglers in real runs:
``tests/e2e/test_clock_runs.py``)."""

import json

import pandas as pd
import pytest
import torch
from torch import nn

from sylva_ray.base.config import ConfigError
from sylva_ray.engine.clock import SimulatedClock, assign_profiles, time_to_share
from sylva_ray.engine.resolve import load_config
from sylva_ray.experiments.comparison_report import RunSpec, summary_row
from sylva_ray.method.cost import batch_sequence, count_step_flops, step_flops_by_batch
from sylva_ray.method.devices import DEVICE_CLASSES, NETWORK_CLASSES

#: A toy device and link whose numbers make the hand computation short.
TOY = [
    "system.device_classes={toy: {flops_per_s: 1.0e9, memory_gb: 1, efficiency: 0.5, availability: 0.5}}",
    "system.network_classes={slow: {downlink_mbps: 8, uplink_mbps: 4, latency_s: 0.1}}",
    "system.devices=[toy@slow, toy@slow]",
    "data.num_clients=2",
    "train.batch_size=10",
    "train.local_epochs=1",
    "train.local_steps=null",
]


def _toy_clock(*extra: str, num_train=None, memory_gb=None) -> SimulatedClock:
    cfg = load_config("smoke", overrides=[*TOY, *extra])
    return SimulatedClock(cfg, num_train or {0: 10, 1: 25}, {10: 10**9, 5: 5 * 10**8}, memory_gb)


def test_clock_arithmetic_against_hand_computed_values():
    clock = _toy_clock()
    # client 0: one batch of 10 -> 1e9 FLOPs / (1e9 x 0.5) = 2 s; client 1: 10 + 10 + 5 -> 2.5e9 -> 5 s
    assert clock.flops == {0: 10**9, 1: 25 * 10**8}
    # 1e6 bytes down: 8e6 bits / 8e6 bit/s + 0.1 = 1.1 s; 1e6 up at 4 Mbps: 2 + 0.1 = 2.1 s
    times = clock.times(1, 10**6, 10**6)
    assert times == pytest.approx(
        {"sim_compute_s": 5.0, "sim_download_s": 1.1, "sim_upload_s": 2.1, "sim_total_s": 8.2}
    )
    plan = clock.plan(0, [0, 1], 10**6)
    assert plan.stragglers == [] and plan.takers == [0, 1]
    assert clock.round_seconds(plan, {c: plan.times[c]["sim_total_s"] for c in plan.takers}) == pytest.approx(8.2)


def test_a_deadline_makes_the_slow_client_a_straggler_and_fixes_the_round_length():
    clock = _toy_clock("federation.deadline_s=6")
    plan = clock.plan(0, [0, 1], 10**6)  # client 0: 2 + 1.1 + 2.1 = 5.2 s; client 1: 8.2 s
    assert plan.stragglers == [1] and plan.takers == [0]
    assert clock.round_seconds(plan, {0: plan.times[0]["sim_total_s"]}) == 6.0


def test_memory_flag_compares_the_estimate_with_the_device():
    assert _toy_clock(memory_gb=0.5).short_of_memory == []
    assert _toy_clock(memory_gb=2.0).short_of_memory == [0, 1]
    assert not _toy_clock(memory_gb=2.0).devices_frame()["fits_memory"].any()


def test_batch_sequence_follows_the_local_loop():
    assert batch_sequence(25, 10, 2, None) == [10, 10, 5, 10, 10, 5]
    assert batch_sequence(25, 10, 2, 4) == [10, 10, 5, 10]
    assert batch_sequence(7, 10, 1, None) == [7]


def test_profile_assignment_is_seeded_and_proportional():
    cfg = load_config("default", overrides=["system.devices={jetson_orin_nano@wifi: 0.7, phone_midrange@4g: 0.3}"])
    first = assign_profiles(cfg.system, 10, seed=0)
    assert first == assign_profiles(cfg.system, 10, seed=0)
    assert first.count("jetson_orin_nano@wifi") == 7 and first.count("phone_midrange@4g") == 3
    assert first != assign_profiles(cfg.system, 10, seed=1)  # another seed, another permutation (10 choose 3 ways)


def test_availability_is_drawn_per_round_and_client_from_the_seed():
    clock = _toy_clock("system.availability=true", num_train={c: 10 for c in range(2)})
    plans = [clock.plan(r, [0, 1], 1000) for r in range(40)]
    again = [clock.plan(r, [0, 1], 1000) for r in range(40)]
    assert [p.offline for p in plans] == [p.offline for p in again]
    offline = sum(len(p.offline) for p in plans) / 80
    assert 0.3 < offline < 0.7  # availability 0.5


def _linear_cfg(steps: int):
    return load_config("smoke", overrides=[f"attack.train_steps={steps}", "algorithm.name=sylva"])


@pytest.mark.parametrize("steps", [1, 3])
def test_flops_of_one_linear_layer_match_a_hand_count(steps):
    """Linear(d -> C) at batch B: a PGD step is a forward (2BdC) and an input gradient (2BdC); training
    does f forwards (f = 2 with Sylva's benign branch) and their weight gradients (2BdC each)."""
    batch, side, classes = 6, 4, 10
    d = 3 * side * side
    with torch.device("meta"):
        model = nn.Sequential(nn.Flatten(), nn.Linear(d, classes))
    cfg = _linear_cfg(steps)
    forwards = 2
    expected = 4 * batch * d * classes * (steps + forwards)
    assert count_step_flops(model, cfg, batch, (3, side, side), classes) == expected


def test_flops_grow_with_the_batch_and_the_attack():
    cfg = load_config("smoke")
    counts = step_flops_by_batch(cfg, (3, 8, 8), 10, [4, 8])
    assert counts[8] == 2 * counts[4]  # every product in a ViT is linear in the batch
    stronger = step_flops_by_batch(load_config("smoke", overrides=["attack.train_steps=4"]), (3, 8, 8), 10, [4])
    assert stronger[4] > counts[4]


def test_time_to_share_reads_the_first_round_that_reaches_it():
    rounds = pd.DataFrame({"robust_acc": [0.2, 0.5, 0.58, 0.6], "sim_clock_s": [10.0, 20.0, 30.0, 40.0]})
    assert time_to_share(rounds) == {"time_to_90pct_robust_acc_s": 30.0, "time_to_95pct_robust_acc_s": 30.0}


@pytest.mark.parametrize(
    "override, named",
    [
        ("system.devices={nokia_3310@4g: 1}", "nokia_3310"),
        ("system.devices={jetson_orin_nano@carrier_pigeon: 1}", "carrier_pigeon"),
        ("system.devices=[jetson_orin_nano@wifi]", "system.devices lists 1"),
        ("system.devices={jetson_orin_nano: 1}", "<device>@<network>"),
        ("system.device_classes={toy: {memory_gb: 1}}", "system.device_classes.toy"),
    ],
)
def test_bad_system_settings_are_refused_by_name(override, named):
    with pytest.raises(ConfigError, match="system") as caught:
        load_config("smoke", overrides=[override])
    assert named in str(caught.value)


def test_a_deadline_without_the_clock_is_refused():
    with pytest.raises(ConfigError, match="federation.deadline_s"):
        load_config("smoke", overrides=["system.clock=false", "federation.deadline_s=5"])


def test_built_in_profiles_are_complete():
    for name, device in DEVICE_CLASSES.items():
        assert device.peak("fp32") > 0 and 0 < device.efficiency <= 1 and 0 < device.availability <= 1, name
    for name, network in NETWORK_CLASSES.items():
        assert network.downlink_mbps > 0 and network.uplink_mbps > 0 and network.latency_s >= 0, name


def test_compare_rows_carry_the_simulated_time(tmp_path):
    summary = json.loads(json.dumps(_SUMMARY))
    row = summary_row(RunSpec("sylva", 0, load_config("smoke"), tmp_path), summary, None)
    assert row["sim_hours"] == 0.5 and row["sim_round_s"] == 180.0
    assert row["sim_compute_s"] == pytest.approx(15.0) and row["sim_network_s"] == pytest.approx(5.0)
    assert row["sim_time_to_95pct_robust_h"] == pytest.approx(0.25)


_SUMMARY = {
    "final": {"clean_acc": 0.9, "robust_acc": 0.5},
    "communication": {"rounds": 10, "bytes_up": 1000, "bytes_down": 1000},
    "per_client": [{}, {}],
    "sanity": {"majority_rate": 0.2, "warnings": []},
    "simulated": {
        "hours": 0.5,
        "mean_round_s": 180.0,
        "time_to_95pct_robust_acc_s": 900.0,
        "by_device": [
            {"profile": "a", "sim_compute_s": 10.0, "sim_network_s": 4.0},
            {"profile": "b", "sim_compute_s": 20.0, "sim_network_s": 6.0},
        ],
    },
}


def test_flops_read_off_the_line_equal_counting_every_batch_shape():
    from sylva_ray.method.cost import meta_model

    cfg = load_config("smoke")
    sizes = [2, 5, 7, 11, 32]
    model = meta_model(cfg, 10)
    counted = {b: count_step_flops(model, cfg, b, (3, 8, 8), 10) for b in sizes}
    assert step_flops_by_batch(cfg, (3, 8, 8), 10, sizes) == counted


def test_flops_are_counted_for_a_bf16_run_too():
    """Autocast has no meta device: the count runs in fp32 (FLOPs do not depend on the dtype)."""
    bf16 = step_flops_by_batch(load_config("smoke", overrides=["runtime.precision=bf16"]), (3, 8, 8), 10, [4])
    assert bf16 == step_flops_by_batch(load_config("smoke"), (3, 8, 8), 10, [4])


def test_nothing_to_send_costs_no_time():
    from sylva_ray.engine.clock import transfer_seconds

    assert transfer_seconds(0, 8.0, 0.1) == 0.0 and transfer_seconds(10**6, 8.0, 0.1) == pytest.approx(1.1)


@pytest.mark.parametrize(
    "override",
    [
        "system.device_classes={toy: {flops_per_s: {bf16: 1.0e12}, memory_gb: 1}}",
        "system.device_classes={toy: {flops_per_s: 0, memory_gb: 1}}",
        "system.network_classes={slow: {downlink_mbps: 0, uplink_mbps: 1, latency_s: 0}}",
    ],
)
def test_impossible_custom_classes_are_refused(override):
    with pytest.raises(ConfigError, match="system"):
        load_config("smoke", overrides=[override])
