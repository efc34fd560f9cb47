"""shapiq's estimators behind our ask/tell interface, against games with known Shapley values."""

import itertools
import math
import threading

import numpy as np
import pytest

from sylva_ray.method.shapley import (
    ESTIMATORS,
    antithetic_shapley,
    approximate_shapley,
    exact_shapley,
    flatness,
    full_mask,
    make_estimator,
    mask_members,
    masks_of,
    members_mask,
    replay,
    select_players,
    solve,
    spearman,
    threaded,
    ties_at_cut,
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


def _random_game(n, seed):
    """Additive part plus noise: a game with a clear ranking and interactions on top."""
    rng = np.random.default_rng(seed)
    weights = np.linspace(-0.5, 1.0, n)[rng.permutation(n)]
    noise = rng.normal(scale=0.05, size=1 << n)
    table = {mask: float(additive(weights)(mask) + noise[mask]) for mask in range(1 << n)}
    return table, weights


def test_exact_matches_brute_force_on_a_random_game():
    table = {mask: float(v) for mask, v in enumerate(np.random.default_rng(3).normal(size=1 << 5))}
    result = replay(exact_shapley(5), table)
    assert result.values == pytest.approx(_brute_force(table.__getitem__, 5))
    assert result.evaluations == 32 and result.method == "exact" and np.all(result.stderr == 0)


def test_exact_asks_for_every_coalition_in_one_batch():
    estimator = exact_shapley(4)
    first = next(estimator)
    assert sorted(first) == list(range(16))
    with pytest.raises(StopIteration) as stop:
        estimator.send({mask: float(bin(mask).count("1")) for mask in first})
    assert stop.value.value.values == pytest.approx(np.ones(4))


def test_symmetric_players_dummy_and_efficiency():
    # players 0 and 1 are symmetric (a glove-like game), player 2 is a dummy
    def value(mask):
        return 1.0 if (mask & 0b011) == 0b011 else (0.4 if mask & 0b011 else 0.0)

    result = solve(exact_shapley(3), value)
    assert result.values[0] == pytest.approx(result.values[1])
    assert result.values[2] == pytest.approx(0.0, abs=1e-12)
    assert result.values.sum() == pytest.approx(value(full_mask(3)) - value(0))


@pytest.mark.parametrize("estimator", sorted(ESTIMATORS))
def test_every_library_estimator_approaches_the_exact_values_on_a_small_game(estimator):
    table, _ = _random_game(6, seed=11)
    exact = replay(exact_shapley(6), table)
    approx = replay(approximate_shapley(6, estimator, budget=64, replicates=2, stderr_tolerance=1e-12, seed=0), table)
    assert approx.method == estimator and approx.replicates == 2
    assert approx.evaluations <= 64  # distinct coalitions: the budget is respected
    assert spearman(approx.values, exact.values) > 0.7
    assert np.max(np.abs(approx.values - exact.values)) < 0.35  # the weights span 1.5


def test_permutation_sampling_stderr_is_honest_and_shrinks_with_budget():
    table, _ = _random_game(8, seed=5)
    exact = replay(exact_shapley(8), table)
    small = replay(approximate_shapley(8, "permutation", 40, 4, 1e-12, seed=1), table)
    large = replay(approximate_shapley(8, "permutation", 200, 4, 1e-12, seed=1), table)
    assert np.all(small.stderr > 0) and np.mean(large.stderr) < np.mean(small.stderr)
    assert np.mean(np.abs(large.values - exact.values) <= 3 * large.stderr) >= 0.75


def test_replicates_stop_early_once_the_stderr_is_small():
    weights = [1.0, 0.5, 0.25, 0.1, 0.0, -0.2, 0.3, 0.7, 0.05]
    result = solve(approximate_shapley(9, "permutation", 10_000, 8, stderr_tolerance=1e-6, seed=0), additive(weights))
    assert result.replicates == 2  # an additive game: every permutation gives the weights exactly
    assert result.values == pytest.approx(weights)


def test_every_coalition_is_asked_for_once():
    asked = []

    def value(mask):
        return asked.append(mask) or float(bin(mask).count("1"))

    solve(approximate_shapley(7, "kernelshap", 100, 4, 1e-12, seed=0), value)
    assert len(asked) == len(set(asked)) <= 100


def test_closing_a_game_midway_releases_its_thread():
    before = threading.active_count()
    estimator = approximate_shapley(9, "permutation", 100, 4, 1e-12, seed=0)
    next(estimator)
    estimator.close()  # what the driver does when a client's evaluation fails twice
    for _ in range(50):
        if threading.active_count() <= before:
            break
        threading.Event().wait(0.02)
    assert threading.active_count() <= before


def test_an_error_inside_the_estimator_reaches_the_caller():
    def body(ask):
        ask([0])
        raise RuntimeError("broken estimator")

    estimator = threaded(body)
    assert next(estimator) == [0]
    with pytest.raises(RuntimeError, match="broken estimator"):
        estimator.send({0: 0.0})


def test_unknown_estimator_is_refused_with_the_field_name():
    with pytest.raises(ValueError, match="layer_selection.estimator"):
        next(approximate_shapley(9, "magic", 100, 4, 0.01, 0))


def test_make_estimator_picks_exact_for_small_games():
    assert solve(make_estimator(3, 10, "antithetic", 100, 0.01, 0), additive([1, 2, 3])).method == "exact"
    assert solve(make_estimator(3, 2, "antithetic", 100, 0.01, 0), additive([1, 2, 3])).method == "antithetic"
    assert solve(make_estimator(3, 2, "svarm", 100, 0.01, 0, replicates=2), additive([1, 2, 3])).method == "svarm"


def _antithetic(n, seed=0, budget=10_000, tol=1e-3, trunc=0.0):
    return antithetic_shapley(n, np.random.default_rng(seed), budget, tol, trunc)


def test_antithetic_sampling_converges_to_exact_and_reports_stderr():
    table, _ = _random_game(6, seed=7)
    exact = replay(exact_shapley(6), table)
    mc = replay(_antithetic(6, seed=1, budget=64, tol=0.02), table)
    assert mc.evaluations <= 64
    assert np.all(np.abs(mc.values - exact.values) < 4 * mc.stderr + 0.05)
    assert np.all(mc.stderr > 0)
    assert spearman(mc.values, exact.values) > 0.5


def test_antithetic_truncation_saves_evaluations_and_budget_is_respected():
    weights = [1.0, 0.001, 0.001, 0.001, 0.001, 0.001, 0.001, 0.001]
    value = additive(weights)
    plain = solve(_antithetic(8, budget=40, tol=1e-9), value)
    truncated = solve(_antithetic(8, budget=10_000, tol=1e-2, trunc=0.05), value)
    assert plain.evaluations <= 40 + 8 * 8  # stops at the first batch boundary past the budget
    assert truncated.values[0] == pytest.approx(1.0, abs=0.01)
    assert truncated.evaluations < plain.evaluations


def test_antithetic_asks_for_every_coalition_once_and_gives_additive_weights():
    asked = []
    weights = [0.5, -0.2, 0.0, 1.5, 0.3]

    def value(mask):
        return asked.append(mask) or additive(weights)(mask)

    result = solve(_antithetic(5, budget=1000, tol=1e-6), value)
    assert len(asked) == len(set(asked))
    assert result.values == pytest.approx(weights, abs=1e-9)  # every marginal is the weight itself


def test_a_flat_game_is_reported_flat():
    table = {mask: 0.5 if mask else 0.25 for mask in range(1 << 4)}  # only the head matters
    flat = flatness(table, 4)
    assert flat.marginals == 4 * 8
    assert flat.zero_share == pytest.approx(1 - 4 / 32)  # only the steps up from the empty coalition move
    assert flat.distinct_values == 2
    values = replay(exact_shapley(4), table).values
    assert values == pytest.approx(np.full(4, 0.0625))
    chosen = select_players(values, "top_k", 2, 0.0)
    assert chosen == [0, 1] and ties_at_cut(values, chosen) == 2  # the order, not the game, chose
    noisy = values + np.array([0.0, 1e-17, 0.0, 3e-17])  # what exact arithmetic leaves of a tie
    assert select_players(noisy, "top_k", 2, 0.0) == [0, 1]


def test_flatness_survives_a_diverged_coalition_and_threshold_rules_respect_ties():
    table = {mask: float(bin(mask).count("1")) for mask in range(1 << 3)}
    table[0b111] = float("nan")
    assert flatness(table, 3).distinct_values == 4  # 0, 1, 2 and the non-finite one
    noisy_zero = np.array([1e-17, -1e-17, 0.5])
    assert select_players(noisy_zero, "positive", 0, 0.0) == [2]
    assert select_players(noisy_zero + 0.2, "threshold", 0, 0.2) == [2]


def test_a_graded_game_is_not_flat():
    table = {mask: additive([0.4, 0.3, 0.2, 0.1])(mask) for mask in range(1 << 4)}
    assert flatness(table, 4).zero_share == 0.0
    values = replay(exact_shapley(4), table).values
    assert ties_at_cut(values, select_players(values, "top_k", 2, 0.0)) == 0


def test_selection_rules():
    values = np.array([0.3, -0.1, 0.5, 0.0, 0.2])
    assert select_players(values, "top_k", 2, 0) == [0, 2]
    assert select_players(values, "threshold", 0, 0.25) == [0, 2]
    assert select_players(values, "positive", 0, 0) == [0, 2, 4]
    with pytest.raises(ValueError, match="selection"):
        select_players(values, "best", 1, 0)


def test_masks_round_trip():
    assert mask_members(members_mask([0, 3]), 4) == [0, 3]
    assert masks_of(np.array([[True, False, False, True], [False] * 4])) == [0b1001, 0]


def test_baseline_selections_need_no_game():
    from sylva_ray.engine.layer_games import baseline_selection

    assert baseline_selection("all", 4, 2, seed=0) == [0, 1, 2, 3]
    assert baseline_selection("last", 4, 2, seed=0) == [2, 3]
    assert baseline_selection("head", 4, 2, seed=0) == baseline_selection("none", 4, 2, seed=0) == []
    drawn = baseline_selection("random", 4, 2, seed=0)
    assert len(drawn) == 2 and drawn == baseline_selection("random", 4, 2, seed=0)
    assert {tuple(baseline_selection("random", 8, 3, seed=s)) for s in range(10)} != {tuple(drawn)}
