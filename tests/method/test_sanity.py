"""The gradient-masking checks fire on the evidence they exist for, and stay quiet otherwise."""

import logging

import pytest
import torch

from sylva_ray.base.config import AttackConfig, EvaluationConfig
from sylva_ray.method.data import ArrayDataset
from sylva_ray.method.evaluation import evaluate
from sylva_ray.method.sanity import sanity_warnings

CFG = EvaluationConfig(sanity_tolerance=0.02, sanity_large_eps_max_acc=0.1)


def row(client=0, **overrides):
    healthy = dict(
        client=client,
        clean_acc=0.9,
        robust_acc=0.6,
        num_clean=50,
        num_robust=40,
        clean_on_robust=0.9,
        autoattack_acc=0.5,
        num_autoattack=40,
        pgd_on_autoattack=0.6,
        long_pgd_acc=0.55,
        pgd_on_sanity=0.6,
        large_eps_acc=0.0,
        num_sanity=20,
    )
    return {**healthy, **overrides}


def test_a_healthy_evaluation_raises_nothing():
    assert sanity_warnings([row(0), row(1)], CFG, "test") == []


@pytest.mark.parametrize(
    "overrides, needle",
    [
        ({"robust_acc": 0.95}, "robust accuracy"),
        ({"long_pgd_acc": 0.7}, "long PGD"),
        ({"large_eps_acc": 0.4}, "not near 0"),
        ({"autoattack_acc": 0.7}, "AutoAttack accuracy"),
    ],
)
def test_each_red_flag_is_reported_loudly(overrides, needle, caplog):
    with caplog.at_level(logging.WARNING, logger="sylva_ray.method.sanity"):
        warnings = sanity_warnings([row(0, **overrides), row(1, **overrides)], CFG, "round 3")
    assert any(needle in w and w.startswith("round 3") for w in warnings)
    assert any("SANITY CHECK FAILED" in r.message for r in caplog.records)


def test_a_collapsed_model_is_told_apart_from_masked_gradients():
    # a run that diverged to one class: every attack leaves the same 30% standing
    collapsed = dict(
        clean_acc=0.3,
        clean_on_robust=0.3,
        robust_acc=0.3,
        large_eps_acc=0.3,
        pgd_on_sanity=0.3,
        long_pgd_acc=0.3,
        autoattack_acc=0.3,
        pgd_on_autoattack=0.3,
    )
    [warning] = sanity_warnings([row(0, **collapsed)], CFG, "final")
    assert "collapsed" in warning and "not near 0" in warning
    [masked] = sanity_warnings([row(0, large_eps_acc=0.4, majority_rate=0.5)], CFG, "final")
    assert "collapsed" not in masked and "masked" in masked
    # a diverged run that Phase 2 half-repaired: PGD still bites a little, but clean accuracy is
    # below what always answering the client's majority class would score
    half = dict(clean_acc=0.39, clean_on_robust=0.39, robust_acc=0.35, large_eps_acc=0.34, majority_rate=0.44)
    [warning] = sanity_warnings([row(0, **half)], CFG, "phase 2")
    assert "majority-class" in warning and "collapsed" in warning


def test_checks_pool_clients_by_their_sample_counts():
    # one tiny client with robust > clean by a lot, a big healthy one: the pooled check holds,
    # the per-client line still names the client
    warnings = sanity_warnings(
        [row(0, robust_acc=1.0, clean_on_robust=0.5, num_robust=2), row(1, num_robust=200)], CFG, "t"
    )
    assert warnings == ["t: clients [0] have robust > clean accuracy"]


def test_evaluate_with_the_protocol_measures_every_check_on_fixed_subsets():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 4)).eval()
    rng = torch.Generator().manual_seed(1)
    data = ArrayDataset(
        torch.rand(30, 3, 4, 4, generator=rng).numpy(), torch.randint(0, 4, (30,), generator=rng).numpy(), 4
    )
    attack = AttackConfig(eps=0.05, eval_steps=5, eval_max_samples=20, autoattack_steps=3, autoattack_square_queries=20)
    protocol = EvaluationConfig(autoattack_max_samples=10, sanity_samples=8, sanity_long_steps=15, sanity_large_eps=0.5)
    result = evaluate(model, data, attack, 16, seed=0, device=torch.device("cpu"), protocol=protocol)
    assert (result.num_clean, result.num_robust, result.num_autoattack, result.num_sanity) == (30, 20, 10, 8)
    for value in (
        result.autoattack_acc,
        result.long_pgd_acc,
        result.large_eps_acc,
        result.pgd_on_sanity,
        result.pgd_on_autoattack,
    ):
        assert 0 <= value <= 1
    assert result.large_eps_acc == 0.0  # eps 0.5 breaks a linear model on every image
    assert sanity_warnings([{"client": 0, **result.as_dict()}], protocol, "t") == []  # an honest model passes
    plain = evaluate(model, data, attack, 16, seed=0, device=torch.device("cpu"))
    assert (plain.clean_acc, plain.robust_acc) == (
        result.clean_acc,
        result.robust_acc,
    )  # the protocol adds, never changes
    assert plain.autoattack_acc is None and "autoattack_acc" not in plain.as_dict()
