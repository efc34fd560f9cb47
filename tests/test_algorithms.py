"""Every algorithm runs for a round on a tiny config and shows what distinguishes it.

Runs are in-process (``runtime.engine=inprocess``): the engine's Ray path is the same Federation
and is covered by test_engine / test_compare.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sylva_ray.base.config import ConfigError
from sylva_ray.distributed.launcher import run
from sylva_ray.engine.federation import FederationState
from sylva_ray.engine.resolve import build_config, load_config
from sylva_ray.method.algorithms import ALGORITHMS, algorithm_for, parse_algorithm
from sylva_ray.method.losses import calfat_loss, class_prior, mart_loss
from sylva_ray.method.models import decode_state
from sylva_ray.method.objectives import CalibratedLogits

TINY = [
    "runtime.engine=inprocess",
    "data.num_clients=3",
    "federation.rounds=1",
    "train.local_steps=2",
    "attack.eval_max_samples=8",
    "evaluation.autoattack_max_samples=4",
    "evaluation.sanity_samples=4",
    "evaluation.sanity_long_steps=6",
    "attack.autoattack_steps=2",
    "attack.autoattack_square_queries=10",
    "layer_selection.finetune_steps=2",
    "layer_selection.coalition_steps=1",
    "layer_selection.top_k=1",
]


def tiny(algorithm: str, *extra: str):
    name, ablations = parse_algorithm(algorithm)
    return load_config("smoke", overrides=[*TINY, f"algorithm.name={name}", f"algorithm.ablations={ablations}", *extra])


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


# --- losses by hand -----------------------------------------------------------------------------
def test_calfat_loss_equals_a_hand_computed_value():
    adversarial = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.3, 1.2]])
    benign = torch.tensor([[2.5, 0.0, -0.5], [0.0, 1.0, 0.8]])
    labels = torch.tensor([0, 2])
    counts = np.array([6, 3, 1])
    tau, scale = 0.1, 10.0
    log_prior = class_prior(counts).log()

    def log_softmax(row):
        row = np.asarray(row, dtype=np.float64)
        return row - np.log(np.exp(row).sum())

    pi = counts / counts.sum()
    ce, kl = 0.0, 0.0
    for adv_row, ben_row, y in zip(adversarial.numpy(), benign.numpy(), labels.numpy()):
        adv_cal, ben_cal = adv_row + tau * np.log(pi), ben_row + tau * np.log(pi)
        ce += -log_softmax(adv_cal)[y]
        p = np.exp(log_softmax(ben_cal))
        kl += float((p * (np.log(p) - log_softmax(adv_cal))).sum())
    expected = ce / 2 + scale * kl / 2

    terms = calfat_loss(adversarial, benign, labels, log_prior, tau, scale)
    assert float(terms.total) == pytest.approx(expected, rel=1e-5)
    # tau matters: without calibration the value differs (the test fails if the prior is ignored)
    assert float(calfat_loss(adversarial, benign, labels, log_prior, 0.0, scale).total) != pytest.approx(
        expected, rel=1e-3
    )


def test_mart_loss_equals_a_hand_computed_value():
    adversarial = torch.tensor([[1.0, 2.0, 0.0], [0.5, 0.2, 0.1]])
    benign = torch.tensor([[2.0, 1.0, 0.0], [1.0, 0.0, 0.5]])
    labels = torch.tensor([0, 0])
    beta = 6.0
    pa, pn = F.softmax(adversarial, 1).numpy().astype(np.float64), F.softmax(benign, 1).numpy().astype(np.float64)
    bce = 0.0
    robust = 0.0
    for i, y in enumerate(labels.numpy()):
        runner_up = max((k for k in range(3) if k != y), key=lambda k: pa[i, k])
        bce += -np.log(pa[i, y]) - np.log(1.0001 - pa[i, runner_up] + 1e-12)
        kl = float((pn[i] * (np.log(pn[i]) - np.log(pa[i] + 1e-12))).sum())
        robust += kl * (1.0000001 - pn[i, y])
    expected = bce / 2 + beta * robust / 2
    assert float(mart_loss(adversarial, benign, labels, beta).total) == pytest.approx(expected, rel=1e-5)


def test_calfat_attacks_calibrated_logits():
    model = torch.nn.Linear(4, 3)
    log_prior = class_prior(np.array([8, 1, 1])).log()
    wrapped = CalibratedLogits(model, log_prior, 0.5)
    x = torch.randn(2, 4)
    assert torch.allclose(wrapped(x), model(x) + 0.5 * log_prior)


# --- configuration --------------------------------------------------------------------------------
def test_algorithms_fix_their_settings_and_resolution_is_idempotent():
    fat = tiny("fat")
    assert (
        fat.federation.aggregation,
        fat.loss.benign_weight,
        fat.loss.similarity_weight,
        fat.layer_selection.enabled,
    ) == ("fedavg", 0.0, 0.0, False)
    assert fat.train.lr == fat.algorithm.full_model_lr
    assert fat.train.max_grad_norm == fat.algorithm.full_model_max_grad_norm is not None
    assert tiny("sylva").train.max_grad_norm is None  # LoRA algorithms keep the shared optimiser as configured
    trades = tiny("fedtrades")
    assert (trades.loss.similarity_weight, trades.loss.similarity_target, trades.attack.train_attack) == (
        6.0,
        "both",
        "trades_kl",
    )
    sylva = tiny("sylva")
    assert sylva.federation.aggregation == "balltree" and sylva.layer_selection.enabled
    for name in ALGORITHMS.names():
        cfg = tiny(name)
        assert build_config(cfg.to_dict()) == cfg  # a run's config.yaml loads back to itself


@pytest.mark.parametrize(
    "ablation, field, value",
    [
        ("no_phase2", "layer_selection.enabled", False),
        ("fedavg", "federation.aggregation", "fedavg"),
        ("no_class_balance", "loss.class_weighting", "none"),
        ("no_similarity", "loss.similarity_weight", 0.0),
        ("no_proximal", "loss.proximal_mu", 0.0),
    ],
)
def test_each_sylva_ablation_switches_off_one_part(ablation, field, value):
    full, ablated = tiny("sylva"), tiny(f"sylva-{ablation}")
    section, name = field.split(".")
    assert getattr(getattr(ablated, section), name) == value != getattr(getattr(full, section), name)
    differing = [
        f"{s}.{n}"
        for s in ("loss", "federation", "layer_selection", "attack", "train")
        for n in getattr(full, s).__pydantic_fields__
        if getattr(getattr(full, s), n) != getattr(getattr(ablated, s), n)
    ]
    assert differing == [field]


def test_bad_algorithm_settings_name_the_field():
    with pytest.raises(ConfigError, match="algorithm.name = 'fedprox'"):
        load_config("smoke", overrides=["algorithm.name=fedprox"])
    with pytest.raises(ConfigError, match="has no ablations"):
        load_config("smoke", overrides=["algorithm.name=fat", "algorithm.ablations=[no_phase2]"])


# --- one round each ---------------------------------------------------------------------------------
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
