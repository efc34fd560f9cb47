"""The algorithms' losses by hand and their configuration; each algorithm's round on a tiny
config is in ``tests/e2e/test_algorithm_runs.py`` (in-process: the engine's Ray path is the same
Federation and is covered by ``tests/e2e/test_engine.py`` and ``tests/experiments/test_compare.py``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sylva_ray.base.config import ConfigError
from sylva_ray.engine.resolve import build_config, load_config
from sylva_ray.method.algorithms import ALGORITHMS, parse_algorithm
from sylva_ray.method.losses import calfat_loss, class_prior, mart_loss
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
