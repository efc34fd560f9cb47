"""Shapley values of a cooperative game over L players, exact or by Monte Carlo (pure, Ray-free).

    phi_i = sum over S not containing i of |S|! (L - |S| - 1)! / L! * [v(S u {i}) - v(S)]

Coalitions are bitmasks (bit i = player i). Estimators are written as *generators* in an
ask/tell style: they ``yield`` the list of coalitions whose values they need next and receive a
``{mask: value}`` dict back, and finally return a ``ShapleyResult``. That lets a driver evaluate
the coalitions of many clients' games in parallel (one batch per step across all clients) while
the estimators stay plain sequential code; ``solve(estimator, value_fn)`` runs one synchronously.

* ``exact_shapley``: all 2^L coalitions (the ground truth; L <= ``exact_max_players``).
* ``permutation_shapley``: permutation sampling (Castro et al. 2009) with antithetic (reversed)
  permutations, truncation (TMC-Shapley, Ghorbani & Zou 2019: once |v(N) - v(prefix)| is below a
  tolerance, the remaining players of that permutation get marginal 0 -- cheaper, slightly
  biased), and a cache, so a coalition is evaluated once. It walks a batch of permutations in
  lockstep and stops when every player's standard error is under a tolerance or the evaluation
  budget is spent. The standard error is computed over antithetic *pairs* (a pair's two
  marginals are correlated, so they count as one sample).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Generator

import numpy as np

Values = dict[int, float]
Estimator = Generator[list[int], Values, "ShapleyResult"]


@dataclass
class ShapleyResult:
    values: np.ndarray
    stderr: np.ndarray
    evaluations: int
    permutations: int = 0
    method: str = "exact"
    coalition_values: Values = field(default_factory=dict, repr=False)


def full_mask(num_players: int) -> int:
    return (1 << num_players) - 1


def exact_shapley(num_players: int) -> Estimator:
    """Enumerate every coalition once, then weight the marginals by |S|!(L-|S|-1)!/L!."""
    masks = list(range(1 << num_players))
    values = yield masks
    weights = [
        math.factorial(s) * math.factorial(num_players - s - 1) / math.factorial(num_players)
        for s in range(num_players)
    ]
    phi = np.zeros(num_players)
    for mask in masks:
        size = bin(mask).count("1")
        for player in range(num_players):
            if not mask & (1 << player):
                phi[player] += weights[size] * (values[mask | (1 << player)] - values[mask])
    return ShapleyResult(phi, np.zeros(num_players), evaluations=len(masks), method="exact", coalition_values=values)


def permutation_shapley(
    num_players: int,
    rng: np.random.Generator,
    max_evaluations: int,
    stderr_tolerance: float,
    truncation_tolerance: float = 0.0,
    permutations_per_batch: int = 4,
    min_pairs: int = 3,
) -> Estimator:
    """Antithetic, truncated permutation sampling with a cache (see the module docstring).

    ``permutations_per_batch`` antithetic *pairs* are walked in lockstep; each step asks for the
    next prefix of every live permutation. ``max_evaluations`` counts distinct coalitions.
    """
    full = full_mask(num_players)
    cache: Values = {}
    cache.update((yield [0, full]))
    pair_marginals: list[np.ndarray] = []  # one row per antithetic pair: mean of its two walks
    while True:
        batch = []
        for _ in range(permutations_per_batch):
            order = rng.permutation(num_players)
            batch.append([order, order[::-1].copy()])
        walks = [walk for pair in batch for walk in pair]
        marginals = np.zeros((len(walks), num_players))
        prefixes = [0] * len(walks)
        live = [True] * len(walks)
        for position in range(num_players):
            wanted = []
            for w, order in enumerate(walks):
                if not live[w]:
                    continue
                if truncation_tolerance > 0 and abs(cache[full] - cache[prefixes[w]]) < truncation_tolerance:
                    live[w] = False  # the rest of this walk's marginals stay 0
                    continue
                wanted.append(prefixes[w] | (1 << int(order[position])))
            missing = sorted({m for m in wanted if m not in cache})
            if missing:
                cache.update((yield missing))
            for w, order in enumerate(walks):
                if not live[w]:
                    continue
                player = int(order[position])
                grown = prefixes[w] | (1 << player)
                marginals[w, player] = cache[grown] - cache[prefixes[w]]
                prefixes[w] = grown
        for p in range(len(batch)):
            pair_marginals.append(marginals[2 * p : 2 * p + 2].mean(axis=0))
        samples = np.asarray(pair_marginals)
        stderr = (
            samples.std(axis=0, ddof=1) / math.sqrt(len(samples)) if len(samples) > 1 else np.full(num_players, np.inf)
        )
        converged = len(samples) >= min_pairs and bool(np.all(stderr < stderr_tolerance))
        if converged or len(cache) >= max_evaluations:
            return ShapleyResult(
                samples.mean(axis=0),
                stderr,
                evaluations=len(cache),
                permutations=2 * len(samples),
                method="permutation",
                coalition_values=dict(cache),
            )


def solve(estimator: Estimator, value_fn: Callable[[int], float]) -> ShapleyResult:
    """Drive an estimator synchronously with a value function of a coalition mask."""
    try:
        request = next(estimator)
        while True:
            request = estimator.send({mask: float(value_fn(mask)) for mask in request})
    except StopIteration as stop:
        return stop.value


def make_estimator(
    num_players: int,
    exact_max_players: int,
    seed: int,
    max_evaluations: int,
    stderr_tolerance: float,
    truncation_tolerance: float,
    permutations_per_batch: int = 4,
) -> Estimator:
    """Exact for small games, permutation sampling beyond ``exact_max_players``."""
    if num_players <= exact_max_players:
        return exact_shapley(num_players)
    return permutation_shapley(
        num_players,
        np.random.default_rng(seed),
        max_evaluations,
        stderr_tolerance,
        truncation_tolerance,
        permutations_per_batch,
    )


def select_players(values: np.ndarray, rule: str, top_k: int, threshold: float) -> list[int]:
    """Which players (layers) to fine-tune: ``top_k`` highest, all above ``threshold``, or all positive."""
    order = [int(i) for i in np.argsort(-values, kind="stable")]
    if rule == "top_k":
        return sorted(order[:top_k])
    if rule == "threshold":
        return sorted(i for i in order if values[i] > threshold)
    if rule == "positive":
        return sorted(i for i in order if values[i] > 0)
    raise ValueError(f"layer_selection.selection={rule!r}: use top_k, threshold or positive")


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (scipy's, which handles ties)."""
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def mask_members(mask: int, num_players: int) -> list[int]:
    return [i for i in range(num_players) if mask & (1 << i)]


def members_mask(members: list[int]) -> int:
    mask = 0
    for member in members:
        mask |= 1 << member
    return mask
