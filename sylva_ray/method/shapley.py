"""Shapley values of a client's layer game, computed by ``shapiq`` (pure, Ray-free).

    phi_i = sum over S not containing i of |S|! (L - |S| - 1)! / L! * [v(S u {i}) - v(S)]

Exact values come from shapiq's ``ExactComputer`` (all 2^L coalitions, one batch). Beyond
``exact_max_players`` the default approximator is our own antithetic, truncated permutation sampler
(``antithetic_shapley``): at equal budgets of distinct coalitions it ranked layers better than each
of shapiq's approximators on real layer games (docs results/benchmarks.md, ``bench estimator``), so it stays; shapiq's
(``ESTIMATORS``: permutation sampling, KernelSHAP, unbiased KernelSHAP, SVARM, stratified sampling,
Owen sampling) are one setting away (``layer_selection.estimator``). shapiq calls
its game with a *batch* of coalitions; here that call is turned into an ask/tell *generator*: the
estimator ``yield``s the coalitions (bitmasks, bit i = player i) whose values it needs and receives
a ``{mask: value}`` dict back, and finally returns a ``ShapleyResult``. That lets the driver
evaluate the coalitions of every client's game in one batch across all workers while shapiq runs
its own code unchanged (it runs in a helper thread that blocks until the batch is answered).
``solve(estimator, value_fn)`` runs one synchronously.

shapiq reports no uncertainty. With ``replicates`` > 1 a shapiq approximation is run as that many
independent runs (seeds ``seed, seed + 1, ...``) of ``budget / replicates`` evaluations each, over
one shared cache (a coalition is evaluated once however many runs ask for it): the value is their
mean and the standard error their spread / sqrt(runs); runs stop early once every layer's standard
error is below a tolerance. With one run (the default) the standard error is NaN. The estimator
table measures what replicating costs each approximator (a lot, for the regression ones).
"""

from __future__ import annotations

import math
import queue
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Generator

import numpy as np

Values = dict[int, float]
Estimator = Generator[list[int], Values, "ShapleyResult"]
BatchGame = Callable[[np.ndarray], np.ndarray]

#: shapiq's Shapley-value approximators by the name ``layer_selection.estimator`` takes.
ESTIMATORS = {
    "permutation": "PermutationSamplingSV",
    "kernelshap": "KernelSHAP",
    "unbiased_kernelshap": "UnbiasedKernelSHAP",
    "svarm": "SVARM",
    "stratified": "StratifiedSamplingSV",
    "owen": "OwenSamplingSV",
}
#: Our own approximator's name (``antithetic_shapley``), the default beyond exact games.
ANTITHETIC = "antithetic"
#: Runs needed before the spread of the replicates is read as a standard error.
MIN_REPLICATES_FOR_STDERR = 2
#: Two coalition values closer than this are a tie (the game's values are means of a few hundred terms).
TIE_TOLERANCE = 1e-9


@dataclass
class ShapleyResult:
    values: np.ndarray
    stderr: np.ndarray
    evaluations: int
    replicates: int = 0
    method: str = "exact"
    coalition_values: Values = field(default_factory=dict, repr=False)


def full_mask(num_players: int) -> int:
    return (1 << num_players) - 1


def masks_of(coalitions: np.ndarray) -> list[int]:
    """shapiq's boolean coalition matrix (one row per coalition) as bitmasks."""
    weights = 1 << np.arange(coalitions.shape[1], dtype=np.int64)
    return [int(m) for m in coalitions.astype(np.int64) @ weights]


def shapley_vector(interaction_values: Any, num_players: int) -> np.ndarray:
    """The first-order values of a shapiq ``InteractionValues`` in player order."""
    return np.array([float(interaction_values[(player,)]) for player in range(num_players)])


class _Closed(Exception):
    """Raised inside the estimator thread when its generator was closed (the client left the game)."""


def threaded(body: Callable[[Callable[[list[int]], Values]], "ShapleyResult"]) -> Estimator:
    """Run ``body(ask)`` in a helper thread; each ``ask(masks)`` becomes one ``yield`` of this generator.

    ``body`` is ordinary blocking code (here: shapiq calling its game); the generator hands its
    requests out and its answers back, so the caller decides when and where coalitions are evaluated.
    """
    requests: queue.Queue = queue.Queue(maxsize=1)
    answers: queue.Queue = queue.Queue(maxsize=1)

    def ask(masks: list[int]) -> Values:
        requests.put(("ask", masks))
        reply = answers.get()
        if reply is _Closed:
            raise _Closed
        return reply

    def run() -> None:
        try:
            requests.put(("done", body(ask)))
        except _Closed:
            pass
        except BaseException as exc:  # handed to the generator's caller, which re-raises it
            requests.put(("error", exc))

    threading.Thread(target=run, name="shapley-estimator", daemon=True).start()
    finished = False
    try:
        while True:
            kind, item = requests.get()
            if kind == "done":
                finished = True
                return item
            if kind == "error":
                finished = True
                raise item
            answers.put((yield item))
    finally:
        if not finished:  # closed mid-game: release the thread blocked in ask()
            answers.put(_Closed)


def _cached_game(ask: Callable[[list[int]], Values], cache: Values) -> BatchGame:
    """shapiq's batch game over ``ask``: only coalitions not yet in ``cache`` are asked for."""

    def game(coalitions: np.ndarray) -> np.ndarray:
        masks = masks_of(np.atleast_2d(coalitions))
        missing = sorted({m for m in masks if m not in cache})
        if missing:
            cache.update(ask(missing))
        return np.array([cache[m] for m in masks], dtype=float)

    return game


def exact_shapley(num_players: int) -> Estimator:
    """Every coalition once (one batch of 2^L), Shapley values by shapiq's ``ExactComputer``."""

    def body(ask: Callable[[list[int]], Values]) -> ShapleyResult:
        import shapiq

        cache: Values = {}
        values = shapley_vector(shapiq.ExactComputer(_cached_game(ask, cache), num_players)("SV"), num_players)
        return ShapleyResult(values, np.zeros(num_players), len(cache), method="exact", coalition_values=cache)

    return threaded(body)


def approximate_shapley(
    num_players: int, estimator: str, budget: int, replicates: int, stderr_tolerance: float, seed: int
) -> Estimator:
    """shapiq's ``estimator`` in ``replicates`` independent runs over one cache (module docstring)."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"layer_selection.estimator={estimator!r}: use one of {sorted(ESTIMATORS)}")
    per_run = max(num_players + 1, budget // max(1, replicates))  # one permutation's worth at least

    def body(ask: Callable[[list[int]], Values]) -> ShapleyResult:
        import shapiq

        cache: Values = {}
        game = _cached_game(ask, cache)
        runs: list[np.ndarray] = []
        stderr = np.full(num_players, np.nan)
        for run in range(replicates):
            approximator = getattr(shapiq, ESTIMATORS[estimator])(num_players, random_state=seed + run)
            runs.append(shapley_vector(approximator.approximate(per_run, game), num_players))
            if len(runs) >= MIN_REPLICATES_FOR_STDERR:
                stderr = np.std(runs, axis=0, ddof=1) / math.sqrt(len(runs))
                if np.all(stderr < stderr_tolerance):
                    break
        return ShapleyResult(
            np.mean(runs, axis=0), stderr, len(cache), replicates=len(runs), method=estimator, coalition_values=cache
        )

    return threaded(body)


def antithetic_shapley(
    num_players: int,
    rng: np.random.Generator,
    max_evaluations: int,
    stderr_tolerance: float,
    truncation_tolerance: float = 0.0,
    permutations_per_batch: int = 4,
    min_pairs: int = 3,
) -> Estimator:
    """Antithetic, truncated permutation sampling with a cache: our own approximator (the default).

    Permutation sampling (Castro et al. 2009) with antithetic (reversed) permutations and TMC
    truncation (Ghorbani & Zou 2019: once |v(N) - v(prefix)| is below a tolerance, the rest of that
    permutation gets marginal 0 -- cheaper, slightly biased). It walks a batch of permutations in
    lockstep and stops when every player's standard error is under a tolerance or the budget of
    *distinct* coalitions is spent; the standard error is computed over antithetic *pairs* (a
    pair's two marginals are correlated, so they count as one sample). It stays because, at equal
    budgets of distinct coalitions, it ranked layers better than every shapiq approximator on the
    estimator study's real games (docs results/benchmarks.md 'Benchmarks', ``bench estimator``).

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
                replicates=2 * len(samples),
                method="antithetic",
                coalition_values=dict(cache),
            )


def make_estimator(
    num_players: int,
    exact_max_players: int,
    estimator: str,
    budget: int,
    stderr_tolerance: float,
    seed: int,
    replicates: int = 1,
    truncation_tolerance: float = 0.0,
    permutations_per_batch: int = 4,
) -> Estimator:
    """Exact (shapiq) for small games; beyond ``exact_max_players`` our ``antithetic`` sampler or
    one of shapiq's approximators (``ESTIMATORS``)."""
    if num_players <= exact_max_players:
        return exact_shapley(num_players)
    if estimator == ANTITHETIC:
        rng = np.random.default_rng(seed)
        return antithetic_shapley(
            num_players, rng, budget, stderr_tolerance, truncation_tolerance, permutations_per_batch
        )
    return approximate_shapley(num_players, estimator, budget, replicates, stderr_tolerance, seed)


def solve(estimator: Estimator, value_fn: Callable[[int], float]) -> ShapleyResult:
    """Drive an estimator synchronously with a value function of a coalition mask."""
    try:
        request = next(estimator)
        while True:
            request = estimator.send({mask: float(value_fn(mask)) for mask in request})
    except StopIteration as stop:
        return stop.value


def replay(estimator: Estimator, table: Values) -> ShapleyResult:
    """Drive an estimator with the values of an exhaustively evaluated game (``coalition_values``)."""
    return solve(estimator, table.__getitem__)


@dataclass(frozen=True)
class Flatness:
    """How much a game can tell its players apart, from the coalitions it evaluated."""

    marginals: int  # pairs (S, S u {i}) with both values known
    zero_share: float  # share of those whose marginal contribution is zero (a tie)
    distinct_values: int  # distinct coalition values


def flatness(coalition_values: Values, num_players: int) -> Flatness:
    """Share of zero marginal contributions among the evaluated pairs (1.0: a game of ties)."""
    zeros = pairs = 0
    for mask, value in coalition_values.items():
        for player in range(num_players):
            bigger = mask | (1 << player)
            if bigger != mask and bigger in coalition_values:
                pairs += 1
                zeros += abs(coalition_values[bigger] - value) <= TIE_TOLERANCE
    # A diverged fine-tune can leave a NaN or infinite value: counted as one value of its own, not rounded.
    finite = [v for v in coalition_values.values() if math.isfinite(v)]
    rounded = {round(v / TIE_TOLERANCE) for v in finite} | (
        {"non-finite"} if len(finite) < len(coalition_values) else set()
    )
    return Flatness(pairs, zeros / pairs if pairs else float("nan"), len(rounded))


def select_players(values: np.ndarray, rule: str, top_k: int, threshold: float) -> list[int]:
    """Which players (layers) to fine-tune: ``top_k`` highest, all above ``threshold``, or all positive.

    Ties go to the earlier player (a stable order); ``ties_at_cut`` says how often that decided."""
    # Values within TIE_TOLERANCE are ties (a flat game's exact values differ only by rounding):
    # ranked on the rounded values, ties keep model order.
    order = [int(i) for i in np.argsort(-np.round(values / TIE_TOLERANCE), kind="stable")]
    if rule == "top_k":
        return sorted(order[:top_k])
    if rule == "threshold":  # a value within TIE_TOLERANCE of the threshold ties it: not above
        return sorted(i for i in order if values[i] > threshold + TIE_TOLERANCE)
    if rule == "positive":
        return sorted(i for i in order if values[i] > TIE_TOLERANCE)
    raise ValueError(f"layer_selection.selection={rule!r}: use top_k, threshold or positive")


def ties_at_cut(values: np.ndarray, selected: list[int]) -> int:
    """Players left out whose value ties the lowest selected one: >0 means the order broke a tie."""
    if not selected or len(selected) == len(values) or np.isnan(values).any():
        return 0
    lowest = min(values[i] for i in selected)
    return sum(1 for i in range(len(values)) if i not in selected and abs(values[i] - lowest) <= TIE_TOLERANCE)


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
