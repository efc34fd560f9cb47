"""Feature shift, the room-to-help check and the heterogeneity study: transforms, records, arithmetic,
without Ray (the preset end to end and a study: ``tests/e2e/test_shift_runs.py``)."""

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from sylva_ray.base.config import ConfigError
from sylva_ray.engine.resolve import load_config, raw_config
from sylva_ray.experiments.room import (
    Gain,
    best_learning_rates,
    check_room,
    differs_measurably,
    paired_at,
    paired_gain,
    verdict,
)
from sylva_ray.experiments.study import paired_difference, setting_overrides
from sylva_ray.method.data import Partition, client_data, global_test_set, load_source, make_partition
from sylva_ray.method.pretrained import embedded_cache_key
from sylva_ray.method.shift import SHIFT_KINDS, domain_levels, shift_client_images, shift_images

#: The shift preset at the smoke preset's size: a whole run in seconds.
SMOKE_SIZED = [
    "data.num_clients=8",
    "model.pretrain_epochs=40",
    "attack.train_steps=2",
    "attack.eval_steps=5",
    "attack.eval_max_samples=32",
    "train.local_steps=2",
    "federation.rounds=2",
    "layer_selection.finetune_steps=3",
    "layer_selection.coalition_steps=2",
    "evaluation.autoattack=false",
    "evaluation.sanity_samples=8",
    "evaluation.sanity_long_steps=10",
]
#: The unit tests' shift: IFCA's quarter turns, which move pixels without changing them.
QUARTER_TURNS = ["data.shift=rotation", "data.shift_strength=1.0"]


def _shift_cfg(*overrides):
    return load_config("shift", overrides=[*SMOKE_SIZED, *overrides])


def _setup(*overrides):
    cfg = _shift_cfg(*QUARTER_TURNS, *overrides)
    source = load_source(cfg.data)
    return cfg, source, make_partition(source, cfg.data, cfg.runtime.seed)


# --- transforms ------------------------------------------------------------------------------------


def test_quarter_turns_are_lossless_and_keep_the_stored_pixels():
    images = np.arange(2 * 3 * 8 * 8, dtype=np.uint8).reshape(2, 3, 8, 8) % 17
    turned, scale = shift_images(images, 16.0, "rotation", 1 / 3, np.random.default_rng(0))  # 90 degrees
    assert turned.dtype == np.uint8 and scale == 16.0
    np.testing.assert_array_equal(turned, np.rot90(images, 1, axes=(2, 3)))
    four, _ = shift_images(images, 16.0, "rotation", 4 / 3, np.random.default_rng(0))  # 360 degrees
    np.testing.assert_array_equal(four, images)


@pytest.mark.parametrize("kind", [k for k in SHIFT_KINDS if k not in ("none", "mixed")])
def test_every_kind_changes_images_and_domain_zero_is_untouched(kind):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 17, size=(6, 3, 8, 8)).astype(np.uint8)
    levels = domain_levels(kind, 1.0, 4)
    first_kind, first_level = levels[0]
    same, _ = shift_images(images, 16.0, first_kind, first_level, np.random.default_rng(0))
    if kind == "stroke":  # stroke's domains run from thinnest to thickest: none is untouched
        assert first_level == -1.0 and levels[-1][1] == 1.0
    else:
        np.testing.assert_array_equal(same, images)
    shifted, scale = shift_images(images, 16.0, *levels[-1], np.random.default_rng(0))
    unit = shifted.astype(np.float32) / scale
    assert unit.min() >= 0 and unit.max() <= 1
    assert not np.allclose(unit, images.astype(np.float32) / 16.0)


def test_eight_bit_pools_stay_eight_bit_after_a_shift():
    images = np.random.default_rng(2).integers(0, 256, size=(3, 3, 8, 8)).astype(np.uint8)
    shifted, scale = shift_images(images, 255.0, "blur", 1.0, np.random.default_rng(0))
    assert shifted.dtype == np.uint8 and scale == 255.0


def test_mixed_gives_each_domain_another_kind_and_the_first_none():
    levels = domain_levels("mixed", 0.5, 4)
    assert levels[0] == ("none", 0.0)
    assert len({kind for kind, _ in levels}) == 4 and all(level == 0.5 for _, level in levels[1:])


def test_noise_is_seeded_per_client_and_split_and_repeats():
    record = {
        "kind": "noise",
        "strength": 1.0,
        "assignment": "round_robin",
        "seed": 3,
        "domains": [{"kind": "noise", "level": 1.0}],
        "client_domain": [0, 0],
    }
    images = np.full((4, 3, 8, 8), 8, dtype=np.uint8)
    a, _ = shift_client_images(images, 16.0, record, 0, "train")
    again, _ = shift_client_images(images, 16.0, record, 0, "train")
    other_client, _ = shift_client_images(images, 16.0, record, 1, "train")
    other_split, _ = shift_client_images(images, 16.0, record, 0, "test")
    np.testing.assert_array_equal(a, again)
    assert not np.array_equal(a, other_client) and not np.array_equal(a, other_split)


# --- partitions ------------------------------------------------------------------------------------


def test_clients_are_dealt_to_domains_round_robin_or_shuffled():
    _, _, partition = _setup()
    assert partition.shift["client_domain"] == [c % 4 for c in range(8)]
    assert [d["level"] for d in partition.shift["domains"]] == pytest.approx([0, 1 / 3, 2 / 3, 1], abs=1e-6)
    random = _setup("data.shift_assignment=random")[2].shift["client_domain"]
    assert sorted(random) == sorted(partition.shift["client_domain"]) and random != partition.shift["client_domain"]


#: Every kind once, noise and a bilinear 135-degree turn among them: what a round trip could lose.
EVERY_KIND = ["data.shift=mixed", "data.shift_domains=7", "data.shift_strength=0.5"]


def test_a_saved_record_redoes_every_clients_images_exactly(tmp_path):
    cfg, source, partition = _setup(*EVERY_KIND)
    assert {d["kind"] for d in partition.shift["domains"]} == set(SHIFT_KINDS) - {"mixed"}
    partition.save(tmp_path / "partition.json")
    loaded = Partition.load(tmp_path / "partition.json", expected_fingerprint=source.fingerprint())
    fresh = make_partition(source, cfg.data, cfg.runtime.seed)  # another process would make this one
    for client in range(8):
        before = client_data(source, fresh, client)
        for other in (partition, loaded):
            after = client_data(source, other, client)
            np.testing.assert_array_equal(before.train.images, after.train.images)
            np.testing.assert_array_equal(before.test.images, after.test.images)


def test_a_shifted_client_sees_its_own_pool_rows_turned():
    _, source, partition = _setup()
    client = 1  # domain 1: a quarter turn
    plain = source.private.subset(partition.train[client])
    np.testing.assert_array_equal(
        client_data(source, partition, client).train.images, np.rot90(plain.images, 1, axes=(2, 3))
    )
    untouched = source.private.subset(partition.train[0]).images  # domain 0
    np.testing.assert_array_equal(client_data(source, partition, 0).train.images, untouched)


def test_the_public_slice_and_the_pretraining_key_ignore_the_shift():
    cfg, source, partition = _setup()
    plain_cfg, plain_source, _ = _setup("data.shift=none")
    np.testing.assert_array_equal(source.public.images, plain_source.public.images)
    for client in range(8):
        client_data(source, partition, client)
    np.testing.assert_array_equal(source.public.images, plain_source.public.images)  # nothing shifted in place
    assert embedded_cache_key(cfg.model, cfg.data, 10) == embedded_cache_key(plain_cfg.model, plain_cfg.data, 10)


def test_the_global_test_set_holds_every_clients_shifted_test_split_in_pool_order():
    _, source, partition = _setup(*EVERY_KIND)
    pooled = global_test_set(source, partition)
    _, _, plain = _setup("data.shift=none")
    unshifted = global_test_set(source, plain)
    np.testing.assert_array_equal(pooled.labels, unshifted.labels)  # the same rows, in pool order
    owner = {int(i): c for c in range(8) for i in partition.test[c]}
    order = np.sort(np.concatenate(partition.test))
    for position in (0, 1, len(order) // 2, len(order) - 1):  # each row as its own client sees it
        client = owner[int(order[position])]
        row = int(np.flatnonzero(partition.test[client] == order[position])[0])
        expected = client_data(source, partition, client).test.pixels(row)
        assert torch.equal(pooled.pixels(position), expected)
    first = {owner[int(i)] for i in order[:32]}
    assert len(first) > 3  # the attacked first samples mix the clients


def test_feature_distances_see_the_shift_and_not_the_label_skew():
    _, _, shifted = _setup()
    _, _, plain = _setup("data.shift=none")
    assert "feature_distance" in shifted.heterogeneity["clients"][0]
    assert "mean_feature_distance" not in (plain.heterogeneity or {})
    from sylva_ray.method.heterogeneity import feature_distances

    source = load_source(_shift_cfg().data)
    unshifted = feature_distances([client_data(source, plain, c) for c in range(8)], 10)["mean_feature_distance"]
    assert shifted.heterogeneity["mean_feature_distance"] > 2 * unshifted


# --- the room-to-help check's arithmetic ---------------------------------------------------------------


def test_paired_gain_on_a_hand_made_case():
    # one seed, three clients: differences 10, 20, 30 points -> mean 20, SE = std(ddof=1) 10 / sqrt(3)
    gain = paired_gain([0.6, 0.7, 0.8], [0.5, 0.5, 0.5], [0, 0, 0])
    assert gain.gain == pytest.approx(20.0) and gain.se == pytest.approx(10 / math.sqrt(3))
    assert gain.pooled == pytest.approx(70.0) and gain.local == pytest.approx(50.0)
    # two seeds of two clients: seed means 10 and 0 -> mean 5, SE = std(ddof=1) 7.071 / sqrt(2) = 5
    two = paired_gain([0.6, 0.6, 0.5, 0.5], [0.5, 0.5, 0.5, 0.5], [0, 0, 1, 1])
    assert two.gain == pytest.approx(5.0) and two.se == pytest.approx(5.0) and two.seeds == 2
    with pytest.raises(ValueError):
        paired_gain([0.5], [0.5, 0.4], [0])


def test_the_verdict_needs_both_room_and_heterogeneity():
    distances = {
        "mean_hellinger": 0.14,
        "iid_mean_hellinger": 0.14,
        "mean_feature_distance": 0.25,
        "iid_mean_feature_distance": 0.08,
    }
    gain = Gain(pooled=60, local=50, gain=10, se=1, clients=20, seeds=1)
    assert verdict(gain, distances, threshold=5)["passes"]
    assert not verdict(gain, distances, threshold=12)["passes"]
    homogeneous = {**distances, "mean_feature_distance": 0.08}
    result = verdict(gain, homogeneous, threshold=5)
    assert result["room_to_help"] and not result["clients_differ"] and not result["passes"]
    assert differs_measurably(0.16, 0.1) and not differs_measurably(0.14, 0.1)


def test_each_arm_is_judged_at_its_own_best_learning_rate():
    rows = []
    for lr, local, pooled in ((0.05, 0.5, 0.1), (0.01, 0.4, 0.7)):  # pooled collapses at 0.05
        for client in range(2):
            rows.append(
                {
                    "seed": 0,
                    "lr": lr,
                    "client": client,
                    "local_robust": local + 0.1 * client,
                    "pooled_robust": pooled,
                    "local_clean": 0.9,
                    "pooled_clean": 0.9,
                }
            )
    table = pd.DataFrame(rows)
    rates = best_learning_rates(table)
    assert rates == {"local": 0.05, "pooled": 0.01}
    gain = paired_at(table, rates, "robust")  # pooled 0.7 against local 0.5 and 0.6 -> +15 points
    assert gain.gain == pytest.approx(15.0) and gain.local == pytest.approx(55.0)


def test_the_room_check_runs_both_arms_and_writes_its_verdict(tmp_path):
    raw = raw_config("shift", None, [*SMOKE_SIZED, "data.num_clients=4", "federation.rounds=1"])
    result = check_room(raw, seeds=1, out=tmp_path / "room", learning_rates=[0.05, 0.01], progress=False)
    table = pd.read_csv(tmp_path / "room" / "room.csv")
    assert len(table) == 8 and set(table["seed"]) == {0} and set(table["lr"]) == {0.05, 0.01}
    expected = paired_at(table, best_learning_rates(table), "robust")
    assert result["robust"]["gain"] == pytest.approx(expected.gain)
    saved = json.loads((tmp_path / "room" / "room.json").read_text())
    assert saved["passes"] == result["passes"] and saved["distances"]["mean_feature_distance"] > 0
    with pytest.raises(ConfigError, match="not empty"):
        check_room(raw, seeds=1, out=tmp_path / "room", progress=False)


# --- the study's settings and pairing --------------------------------------------------------------


def test_setting_names_become_data_overrides():
    base = {"data": {"shift": "rotation"}}
    assert setting_overrides("iid", base) == {"data.shift": "none", "data.partition": "iid"}
    assert setting_overrides("shift+alpha0.5", base) == {
        "data.shift": "rotation",
        "data.partition": "dirichlet",
        "data.alpha": 0.5,
    }
    assert setting_overrides("shift", {})["data.shift"] == "rotation"
    for bad, words in (("alpha-1", "positive"), ("iid+alpha0.1", "twice"), ("tilt", "unknown part"), ("", "empty")):
        with pytest.raises(ConfigError, match=words):
            setting_overrides(bad, base)


def test_paired_difference_pairs_by_seed():
    frame = pd.DataFrame(
        {
            "algorithm": ["a", "a", "b", "b", "b"],
            "seed": [0, 1, 0, 1, 2],
            "robust_acc_unweighted": [0.7, 0.6, 0.5, 0.6, 0.9],
        }
    )
    mean, se, pairs = paired_difference(frame, "a", "b", "robust_acc_unweighted")
    assert pairs == 2 and mean == pytest.approx(10.0) and se == pytest.approx(10.0)


# --- bad input is refused before any work ------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, words",
    [
        (["study", "--settings", "iid,tilt"], "unknown part 'tilt'"),
        (["study", "--settings", "iid,iid"], "twice"),
        (["study", "--baseline", "fedprox"], "--baseline"),
        (["study", "--settings", "alpha0.1", "--set", "data.shift_domains=0"], "shift_domains"),
        (["room", "--lrs", "0.05,fast"], "--lrs"),
        (["room", "--lrs", "0.05,0.05"], "--lrs"),
        (["room", "--set", "data.shift=tilt"], "data.shift"),
    ],
)
def test_bad_study_and_room_arguments_are_refused_with_the_field(argv, words, tmp_path, caplog):
    from sylva_ray.cli import main

    assert main([*argv, "--out", str(tmp_path / "out")]) == 2
    assert words in caplog.text
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_the_deep_pico_vit_has_eight_blocks_for_eight_players():
    from sylva_ray.engine.client import ClientWorker

    cfg = _shift_cfg("model.pretrained=none", "model.name=vit_pico_deep_patch4_16")
    source = load_source(cfg.data)
    worker = ClientWorker(cfg, source, make_partition(source, cfg.data, 0))
    assert worker.player_names() == [f"backbone.blocks.{i}." for i in range(8)]
    shallow = ClientWorker(_shift_cfg("model.pretrained=none"), source, make_partition(source, cfg.data, 0))
    assert len(shallow.player_names()) == 4
    assert worker.full_model_bytes > 1.8 * shallow.full_model_bytes


def test_failed_runs_stay_in_the_csv_and_out_of_the_tables(tmp_path):
    from sylva_ray.experiments.study import write_study

    failed = pd.DataFrame({"algorithm": ["a"], "seed": [0], "status": ["failed"], "error": ["boom"], "setting": ["s"]})
    write_study(tmp_path, [failed], ["s"], ["a"], None)  # nothing finished: no table to write, no error
    assert (tmp_path / "study.csv").is_file() and not (tmp_path / "study.md").exists()
    finished = pd.DataFrame(
        {
            "algorithm": ["a", "b", "a"],
            "seed": [0, 0, 1],
            "status": ["ok", "ok", "failed"],
            "clean_acc_unweighted": [0.9, 0.8, np.nan],
            "robust_acc_unweighted": [0.5, 0.4, np.nan],
            "setting": ["s", "s", "s"],
        }
    )
    write_study(tmp_path, [finished], ["s"], ["a", "b"], "b")
    text = (tmp_path / "study.md").read_text()
    assert "| a | 90.0 / 50.0 |" in text and "+10.0 / +10.0" in text


def test_the_pretraining_bench_trains_both_pico_vits_into_a_fresh_cache(tmp_path):
    from sylva_ray.base.storage import default_cache_dir
    from sylva_ray.experiments.bench import run_bench

    before = (
        sorted((default_cache_dir() / "pretrained").glob("*")) if (default_cache_dir() / "pretrained").exists() else []
    )
    frame = run_bench("pretrain", _shift_cfg("model.pretrain_epochs=1"), tmp_path / "bench")
    assert list(frame["blocks"]) == [4, 8] and frame["parameters"].iloc[1] > 1.9 * frame["parameters"].iloc[0]
    assert (frame["seconds"] > 0).all() and frame["seconds_vs_first"].iloc[0] == 1.0
    assert (tmp_path / "bench" / "bench_pretrain.csv").is_file()
    after = (
        sorted((default_cache_dir() / "pretrained").glob("*")) if (default_cache_dir() / "pretrained").exists() else []
    )
    assert after == before  # nothing was cached or reused
