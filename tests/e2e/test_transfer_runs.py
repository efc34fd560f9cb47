"""Transfer attacks end to end on a real local Ray cluster: the outputs, both final-model paths
(Phase 2's and Phase 1's), identical with one and two actors, and the public source's head for
checkpoint weights (in-process). The unit level: ``tests/method/test_transfer.py``.
"""

from __future__ import annotations

import dataclasses
import json

import pandas as pd
import pytest
from safetensors.torch import save_file

from sylva_ray.distributed.launcher import run
from sylva_ray.engine.resolve import load_config
from sylva_ray.method.pretrained import build_pretrained_model

#: Small runs: 4 clients, the smoke preset's weak attacks, no AutoAttack.
SMALL = ["evaluation.autoattack=false", "attack.eval_max_samples=16", "evaluation.sanity_samples=8"]
EVERY_SOURCE = "evaluation.transfer=[public,global,peers]"


@pytest.fixture(scope="module")
def transfer_runs(ray_cluster, tmp_path_factory):
    """Sylva with Phase 2 on one and on two actors; Phase 1's final models (FedAvg-LoRA-AT, and
    local-only, which has no global model) on two."""
    folder = tmp_path_factory.mktemp("transfer")
    runs = {}
    for name, overrides in (
        ("phase2-1", ["runtime.num_actors=1"]),
        ("phase2-2", ["runtime.num_actors=2"]),
        ("fedavg", ["algorithm.name=fedavg_lora_at", "layer_selection.enabled=false", "runtime.num_actors=2"]),
        ("local", ["algorithm.name=local_at", "layer_selection.enabled=false", "runtime.num_actors=2"]),
        ("fat", ["algorithm.name=fat", "layer_selection.enabled=false", "runtime.num_actors=2"]),
    ):
        run_dir = folder / name
        run_dir.mkdir()
        runs[name] = (run_dir, run(load_config("smoke", overrides=[*SMALL, EVERY_SOURCE, *overrides]), run_dir))
    return runs


def test_a_run_with_transfer_attacks_writes_its_table_matrix_and_figures(transfer_runs):
    run_dir, summary = transfer_runs["phase2-2"]
    table = pd.read_csv(run_dir / "transfer.csv")
    assert list(table.columns) == [
        "victim",
        "source",
        "kind",
        "attacker",
        "attack",
        "samples",
        "accuracy",
        "se",
        "source_detail",
    ]
    assert len(table) == 4 * (1 + 1 + 3) * 2  # 4 victims x (public, global, 3 peers) x 2 attacks
    assert (table["victim"] != table["attacker"]).all()  # nobody attacks themselves
    assert table.loc[table["kind"] == "public", "source_detail"].str.contains("pre-training head").all()
    assert table.loc[table["kind"] == "peers", "source_detail"].str.contains("Phase 2").all()
    assert (run_dir / "transfer_matrix.png").stat().st_size > 0
    for row in summary["per_client"]:
        own = table[table["victim"] == row["client"]]
        assert row["transfer_worst_acc"] == pytest.approx(own["accuracy"].min())
        assert row["transfer_worst_source"] in {f"{s}|{a}" for s, a in zip(own["source"], own["attack"])}
        assert row["strongest_attack_acc"] <= min(row["robust_acc"], row["transfer_worst_acc"])
        assert row["strongest_attack_acc"] <= row["strongest_whitebox_acc"]
    for figure in ("transfer_public_acc", "transfer_global_acc", "transfer_peers_acc", "strongest_whitebox_acc"):
        assert 0 <= summary["final"][figure] <= 1 and f"{figure}_se" in summary["final"]


def test_transfer_results_are_identical_with_one_and_two_actors(transfer_runs):
    one, two = (pd.read_csv(transfer_runs[k][0] / "transfer.csv") for k in ("phase2-1", "phase2-2"))
    pd.testing.assert_frame_equal(one, two)
    figures = ("strongest_attack_acc", "transfer_worst_acc", "transfer_peers_acc")
    for a, b in zip(transfer_runs["phase2-1"][1]["per_client"], transfer_runs["phase2-2"][1]["per_client"]):
        assert [a[k] for k in figures] == [b[k] for k in figures]


def test_phase1_final_models_are_attacked_too_and_local_training_has_no_global_source(transfer_runs):
    fedavg = pd.read_csv(transfer_runs["fedavg"][0] / "transfer.csv")
    assert set(fedavg["kind"]) == {"public", "global", "peers"}
    assert fedavg.loc[fedavg["kind"] == "peers", "source_detail"].str.contains("Phase-1").all()
    local = pd.read_csv(transfer_runs["local"][0] / "transfer.csv")
    assert set(local["kind"]) == {"public", "peers"}
    metrics = pd.read_csv(transfer_runs["local"][0] / "metrics.csv")
    assert metrics["transfer_worst_acc"].notna().sum() == 4  # the final evaluation's rows only


def test_full_model_insiders_hold_the_victims_model_so_their_transfer_is_the_white_box_attack(transfer_runs):
    run_dir, summary = transfer_runs["fat"]
    table = pd.read_csv(run_dir / "transfer.csv")
    assert set(table["kind"]) == {"public", "global", "peers"}
    for row in summary["per_client"]:
        inside = table[(table["victim"] == row["client"]) & (table["kind"] != "public")]
        # one model for everyone: an insider's PGD differs from the white-box PGD by its random start only
        pgd = inside.loc[inside["attack"] == "pgd", "accuracy"]
        assert (pgd - row["robust_acc"]).abs().max() <= 2 / row["num_robust"] + 1e-9


def test_phase2_on_a_protocol_scored_phase1_run_reports_only_its_own_protocol_figures(transfer_runs):
    from sylva_ray.distributed.launcher import run_phase2

    _, summary = run_phase2(transfer_runs["fedavg"][0], ["evaluation.transfer=[]", "algorithm.name=sylva"])
    for row in summary["per_client"]:
        assert not any(k.startswith("transfer_") for k in row) and "strongest_whitebox_acc" not in row


@pytest.mark.slow
def test_checkpoint_weights_get_a_linear_public_head_from_the_public_share_or_a_train_split(tmp_path):
    cfg = load_config("smoke", overrides=["data.num_clients=2"])
    source_cfg = dataclasses.replace(cfg.model, pretrained="none")
    from sylva_ray.method.data import load_source

    base = build_pretrained_model(source_cfg, cfg.data, load_source(cfg.data))
    weights = tmp_path / "backbone.safetensors"
    save_file({k: v.contiguous() for k, v in base.backbone.state_dict().items() if "head" not in k}, str(weights))
    common = [
        *SMALL,
        "data.num_clients=2",
        "federation.rounds=1",
        "layer_selection.enabled=false",
        "evaluation.transfer=[public]",
        "evaluation.sanity_checks=false",
        "runtime.engine=inprocess",
        "model.pretrained=checkpoint",
        f"model.checkpoint={weights}",
    ]
    for name, extra, words in (
        ("public", [], "linear head fit on the public share"),
        ("no-public", ["data.public_fraction=0"], "linear head fit on client"),
    ):
        run_dir = tmp_path / name
        run(load_config("smoke", overrides=[*common, *extra]), run_dir)
        table = pd.read_csv(run_dir / "transfer.csv")
        assert table["source_detail"].str.contains(words).all(), table["source_detail"].tolist()
        assert json.loads((run_dir / "summary.json").read_text())["final"]["transfer_public_acc"] >= 0
