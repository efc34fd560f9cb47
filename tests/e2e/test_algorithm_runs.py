"""Every algorithm runs for a round on a tiny config (in-process, ``runtime.engine=inprocess``) and
shows what distinguishes it; the configuration-only checks are in ``tests/method/test_algorithms.py``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sylva_ray.distributed.launcher import run
from sylva_ray.engine.checkpoint import FederationState
from sylva_ray.method.algorithms import ALGORITHMS, algorithm_for
from sylva_ray.method.wire import decode_state
from tests.method.test_algorithms import tiny


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One tiny run per algorithm, shared by the tests below: (config, run dir, summary)."""
    results = {}
    for algorithm in [*ALGORITHMS.registered(), "sylva-no_phase2"]:  # a newly registered baseline runs too
        cfg = tiny(algorithm)
        run_dir = tmp_path_factory.mktemp(algorithm)
        results[algorithm] = (cfg, run_dir, run(cfg, run_dir, progress=False))
    return results


@pytest.mark.parametrize("algorithm", ALGORITHMS.registered())
def test_every_registered_algorithm_runs_a_round_and_reports(runs, algorithm):
    cfg, run_dir, summary = runs[algorithm]
    metrics = _metrics(run_dir)
    assert summary["algorithm"]["name"] == algorithm and summary["communication"]["rounds"] == 1
    assert 0 <= summary["final"]["robust_acc"] <= summary["final"]["clean_acc"] + 0.5
    assert len(summary["per_client"]) == cfg.data.num_clients and (run_dir / "models").is_dir()
    shares = algorithm_for(cfg).scope.name != "local"
    assert summary["algorithm"]["federated"] == shares
    assert (metrics["bytes_up"].fillna(0) > 0).any() == shares  # a scope that shares nothing uploads nothing


def _metrics(run_dir):
    import pandas as pd

    return pd.read_csv(run_dir / "metrics.csv")


def test_fat_uploads_the_whole_model_and_has_a_global_model(runs):
    cfg, run_dir, summary = runs["fat"]
    metrics = _metrics(run_dir)
    full = summary["communication"]["full_model_bytes"]
    assert (metrics["bytes_up"] == full).all() and (metrics["bytes_down"] == full).all()
    assert summary["algorithm"]["scope"] == "full"
    assert summary["global"]["num_clean"] > max(r["num_clean"] for r in summary["per_client"])  # union of client tests
    assert {"autoattack_acc", "long_pgd_acc", "large_eps_acc"} <= set(summary["global"])
    # the saved model is a whole model: every tensor of the backbone, no LoRA factor
    saved = decode_state((run_dir / "models" / "client_0000.safetensors").read_bytes())
    assert not any(".lora_" in k for k in saved) and any("blocks.0.attn.qkv.weight" in k for k in saved)


def test_lora_algorithms_upload_only_the_adapter(runs):
    sizes = {}
    for name in ("sylva", "fedavg_lora_at", "sylva-no_phase2"):
        cfg, run_dir, summary = runs[name]
        metrics = _metrics(run_dir)
        sizes[name] = summary["communication"]["adapter_bytes"]
        assert (metrics["bytes_up"] == sizes[name]).all()
        assert summary["global"] is None  # personal heads: no global form
    assert sizes["sylva"] < runs["fat"][2]["communication"]["full_model_bytes"] / 10


def test_local_at_uploads_nothing_and_keeps_its_own_adapter(runs):
    cfg, run_dir, summary = runs["local_at"]
    metrics = _metrics(run_dir)
    assert summary["communication"]["bytes_up"] == 0 and summary["communication"]["bytes_down"] == 0
    assert (metrics["bytes_up"] == 0).all()
    state = FederationState.load(run_dir / "checkpoints" / "checkpoint.pt")
    adapters = [state.client_states[c].personal for c in range(cfg.data.num_clients)]
    assert all(any("lora_B" in k for k in a) for a in adapters)  # checkpointed, so a resume continues each client's own
    key = next(k for k in adapters[0] if "lora_B" in k)
    assert not torch.equal(adapters[0][key], adapters[1][key])  # not averaged
    assert state.global_adapter == {} and summary["algorithm"]["scope"] == "local"  # nothing shared, never aggregated
    saved = decode_state((run_dir / "models" / "client_0001.safetensors").read_bytes())
    assert torch.equal(saved[key], adapters[1][key])


def test_fedavg_lora_at_weighs_by_samples_and_skips_phase2(runs):
    cfg, run_dir, summary = runs["fedavg_lora_at"]
    metrics = _metrics(run_dir)
    sizes = np.array(
        [row["num_train"] for row in sorted(summary["per_client"], key=lambda r: r["client"])], dtype=float
    )
    assert np.allclose(metrics.sort_values("client")["agg_weight"], sizes / sizes.sum())
    assert "phase2" not in summary and cfg.loss.benign_weight == 0 and cfg.federation.aggregation == "fedavg"
    sylva = _metrics(runs["sylva"][1]).sort_values("client")
    assert not np.allclose(sylva["agg_weight"], sizes / sizes.sum())  # the ball tree reweighs (same partition)


def test_trades_mart_and_calfat_train_with_their_own_terms(runs):
    for name in ("fedtrades", "fedmart", "calfat"):
        cfg, run_dir, summary = runs[name]
        metrics = _metrics(run_dir)
        assert (metrics["bytes_up"] == summary["communication"]["full_model_bytes"]).all()
        assert (metrics["train_similarity"] > 0).all(), name  # their KL term is live
        assert np.isfinite(metrics["train_loss"]).all()
    assert (_metrics(runs["fedtrades"][1])["train_adversarial"] == 0).all()  # TRADES has no CE on x'


def test_sylva_runs_phase2_and_its_ablation_does_not(runs):
    assert "phase2" in runs["sylva"][2] and "autoattack_acc" in runs["sylva"][2]["final"]
    assert "phase2" not in runs["sylva-no_phase2"][2] and "autoattack_acc" in runs["sylva-no_phase2"][2]["final"]


def test_final_evaluation_reports_protocol_fields_for_every_algorithm(runs):
    for name, (_cfg, _run_dir, summary) in runs.items():
        for row in summary["per_client"]:
            for field in ("autoattack_acc", "long_pgd_acc", "large_eps_acc", "clean_on_robust"):
                assert field in row and 0 <= row[field] <= 1, (name, field)
            assert row["num_autoattack"] == min(4, row["num_clean"])
        assert isinstance(summary["sanity"]["warnings"], list)
        assert math.isfinite(summary["wall_seconds"])


def test_same_seed_means_same_partition_and_start_across_algorithms(runs):
    partitions = {name: (run_dir / "partition.json").read_text() for name, (_, run_dir, _) in runs.items()}
    assert len(set(partitions.values())) == 1
    initial = {name: summary["initial"]["clean_acc"] for name, (_, _, summary) in runs.items()}
    assert len({round(v, 9) for v in initial.values()}) == 1  # the same pre-trained model for all


def test_algorithm_scope_decides_the_shared_tensors(runs):
    for name in ("fat", "sylva"):
        assert algorithm_for(runs[name][0]).scope.name == ("full" if name == "fat" else "lora")


def test_load_client_model_reproduces_each_scopes_saved_accuracy(runs):
    from sylva_ray import load_client_model, load_client_split

    for name in ("fat", "local_at"):
        cfg, run_dir, summary = runs[name]
        row = next(r for r in summary["per_client"] if r["client"] == 1)
        model = load_client_model(run_dir, 1)
        test = load_client_split(run_dir, 1)
        with torch.no_grad():
            accuracy = float((model(test.pixels()).argmax(1).numpy() == test.labels).mean())
        assert accuracy == pytest.approx(row["clean_acc"]), name
