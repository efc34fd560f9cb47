"""Estimators against games with known Shapley values."""

import itertools
import math

import numpy as np
import pytest

from sylva_ray.method.shapley import (
    exact_shapley,
    full_mask,
    make_estimator,
    mask_members,
    members_mask,
    permutation_shapley,
    select_players,
    solve,
    spearman,
)


def additive(weights):
    return lambda mask: sum(w for i, w in enumerate(weights) if mask & (1 << i))


def _brute_force(value, n):
    """Shapley by averaging marginals over all n! orders (independent of the subset formula)."""
    phi = np.zeros(n)
    for order in itertools.permutations(range(n)):
        mask = 0
        for player in order:
            phi[player] += value(mask | (1 << player)) - value(mask)
            mask |= 1 << player
    return phi / math.factorial(n)


def _mc(n, seed=0, budget=10_000, tol=1e-3, trunc=0.0):
    return permutation_shapley(n, np.random.default_rng(seed), budget, tol, trunc)


@pytest.mark.parametrize("estimator", ["exact", "mc"])
def test_additive_game_gives_each_player_its_weight(estimator):
    weights = [0.5, -0.2, 0.0, 1.5, 0.3]
    est = exact_shapley(5) if estimator == "exact" else _mc(5)
    result = solve(est, additive(weights))
    assert result.values == pytest.approx(weights, abs=1e-9)  # every marginal is the weight itself


def test_exact_matches_brute_force_on_a_random_game():
    rng = np.random.default_rng(3)
    table = rng.normal(size=1 << 5)

    def value(mask):
        return float(table[mask])

    assert solve(exact_shapley(5), value).values == pytest.approx(_brute_force(value, 5))


@pytest.mark.parametrize("estimator", ["exact", "mc"])
def test_symmetric_players_dummy_and_efficiency(estimator):
    # players 0 and 1 are symmetric (a glove-like game), player 2 is a dummy
    def value(mask):
        return 1.0 if (mask & 0b011) == 0b011 else (0.4 if mask & 0b011 else 0.0)

    est = exact_shapley(3) if estimator == "exact" else _mc(3, budget=64)
    result = solve(est, value)
    assert result.values[0] == pytest.approx(result.values[1], abs=0.05 if estimator == "mc" else 1e-12)
    assert result.values[2] == pytest.approx(0.0, abs=1e-12)
    assert result.values.sum() == pytest.approx(value(full_mask(3)) - value(0), abs=1e-9)


def test_permutation_sampling_converges_to_exact_and_reports_stderr():
    rng = np.random.default_rng(7)
    table = rng.uniform(size=1 << 6)

    def value(mask):
        return float(table[mask]) + bin(mask).count("1")

    exact = solve(exact_shapley(6), value)
    mc = solve(_mc(6, seed=1, budget=64, tol=0.02), value)
    assert mc.evaluations <= 64
    assert np.all(np.abs(mc.values - exact.values) < 4 * mc.stderr + 0.05)
    assert np.all(mc.stderr > 0)
    assert spearman(mc.values, exact.values) > 0.5


def test_truncation_saves_evaluations_and_budget_is_respected():
    weights = [1.0, 0.001, 0.001, 0.001, 0.001, 0.001, 0.001, 0.001]
    value = additive(weights)
    plain = solve(_mc(8, budget=40, tol=1e-9), value)
    truncated = solve(_mc(8, budget=10_000, tol=1e-2, trunc=0.05), value)
    assert plain.evaluations <= 40 + 8 * 8  # stops at the first batch boundary past the budget
    assert truncated.values[0] == pytest.approx(1.0, abs=0.01)
    assert truncated.evaluations < plain.evaluations


def test_every_coalition_is_evaluated_once():
    calls = []

    def value(mask):
        return calls.append(mask) or float(bin(mask).count("1"))

    solve(_mc(5, budget=1000, tol=1e-6), value)
    assert len(calls) == len(set(calls))


def test_make_estimator_picks_exact_for_small_games():
    assert solve(make_estimator(3, 10, 0, 100, 0.01, 0.0), additive([1, 2, 3])).method == "exact"
    assert solve(make_estimator(3, 2, 0, 100, 0.01, 0.0), additive([1, 2, 3])).method == "permutation"


def test_selection_rules():
    values = np.array([0.3, -0.1, 0.5, 0.0, 0.2])
    assert select_players(values, "top_k", 2, 0) == [0, 2]
    assert select_players(values, "threshold", 0, 0.25) == [0, 2]
    assert select_players(values, "positive", 0, 0) == [0, 2, 4]
    with pytest.raises(ValueError, match="selection"):
        select_players(values, "best", 1, 0)


def test_masks_round_trip():
    assert mask_members(members_mask([0, 3]), 4) == [0, 3]


def test_baseline_selections_need_no_game():
    from sylva_ray.engine.phase2 import baseline_selection

    assert baseline_selection("all", 4, 2, seed=0) == [0, 1, 2, 3]
    drawn = baseline_selection("random", 4, 2, seed=0)
    assert len(drawn) == 2 and drawn == baseline_selection("random", 4, 2, seed=0)
    assert {tuple(baseline_selection("random", 8, 3, seed=s)) for s in range(10)} != {tuple(drawn)}
