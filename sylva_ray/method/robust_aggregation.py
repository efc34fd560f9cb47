"""Byzantine-robust aggregation rules (ByzFL) on client *updates*, pure functions, no Ray.

Every rule here works on updates: each upload minus the global tensors the round started from
(``RoundContext.reference``), flattened exactly as the ball tree flattens adapters
(``flatten_state``), and registers itself as an aggregator with ``rules.update_rule``. The
pipeline around a rule (pre-aggregation, adding the result back to the reference, cutting it
into tensors) is ``update_space.on_updates``. The rules are ByzFL's
(LPD-EPFL): ``Median``, ``TrMean``, ``GeometricMedian``, ``Krum``, ``MultiKrum``,
``CenteredClipping``. They weigh every upload equally (sample counts are a claim a Byzantine
client can inflate).

What each round records as a client's weight (``agg_weight`` in metrics.csv), so a user can see
whether malicious clients were down-weighted; weights sum to 1 unless said otherwise:
    median, trimmed_mean   the client's share in the coordinate-wise aggregate, averaged over
                           coordinates (1 for the middle value, 1/2 each for two middles; 1/(n-2f)
                           for every kept value of a trimmed mean)
    geometric_median       the Weiszfeld weight 1/max(nu, |x_i - z|) at the result z, normalised
    krum, multi_krum       1 for Krum's pick / 1/(n-f) for each of Multi-Krum's picks; 0 otherwise
                           (``agg_selected`` says which were picked)
    centered_clipping      min(1, tau / |x_i - v|) / n at the last iteration's centre v: the share of
                           each update that passes the clip (the rest of the step is the centre's)
    after nnm / bucketing  NaN: those steps mix updates, so no weight belongs to one client
"""

from __future__ import annotations

import logging
import math
from typing import Optional

import numpy as np

from sylva_ray.base.config import FederationConfig
from sylva_ray.method.rules import AGGREGATORS, update_rule
from sylva_ray.method.update_space import RoundContext, median_norm

log = logging.getLogger(__name__)


def coordinate_shares(updates: np.ndarray, low: int, high: int) -> np.ndarray:
    """Each row's share of the coordinate-wise mean of the values ranked low..high-1 (0-based),
    averaged over coordinates (ties keep row order, as a stable sort does)."""
    ranks = np.argsort(np.argsort(updates, axis=0, kind="stable"), axis=0, kind="stable")
    kept = (ranks >= low) & (ranks < high)
    return kept.mean(axis=1) / (high - low)


def krum_scores(updates: np.ndarray, f: int) -> np.ndarray:
    """Krum's score (Blanchard et al. 2017), as ByzFL computes it: the mean squared distance to
    the n - f - 1 nearest other updates."""
    from scipy.spatial.distance import cdist

    n = len(updates)
    squared = cdist(updates, updates) ** 2
    return np.sort(squared, axis=1)[:, 1 : n - f].mean(axis=1)


def krum_too_few(n: int, f: int) -> Optional[str]:
    """Krum's scores need more than 2f + 2 updates (Blanchard et al. 2017)."""
    return f"needs n > 2f + 2 updates (f = {f}) and gets n = {n}" if n <= 2 * f + 2 else None


@update_rule("median")
def median(updates: np.ndarray, cfg: FederationConfig, context: RoundContext) -> tuple[np.ndarray, np.ndarray]:
    """Coordinate-wise median (Yin et al. 2018)."""
    import byzfl

    n = len(updates)
    low, high = (n - 1) // 2, n // 2 + 1  # one middle value (n odd) or two (n even)
    return np.asarray(byzfl.Median()(updates)), coordinate_shares(updates, low, high)


def trim_count(cfg: FederationConfig, n: int) -> int:
    return int(np.floor(cfg.trim_fraction * n))


@update_rule("trimmed_mean")
def trimmed_mean(updates: np.ndarray, cfg: FederationConfig, context: RoundContext) -> tuple[np.ndarray, np.ndarray]:
    """Coordinate-wise trimmed mean (Yin et al. 2018): drop floor(trim_fraction x n) at each end."""
    import byzfl

    n = len(updates)
    f = trim_count(cfg, n)
    return np.asarray(byzfl.TrMean(f=f)(updates)), coordinate_shares(updates, f, n - f)


@update_rule("geometric_median")
def geometric_median(
    updates: np.ndarray, cfg: FederationConfig, context: RoundContext
) -> tuple[np.ndarray, np.ndarray]:
    """Smoothed Weiszfeld geometric median (Pillutla et al. 2022, RFA)."""
    import byzfl

    result = np.asarray(
        byzfl.GeometricMedian(nu=float(cfg.geomed_nu), T=int(cfg.geomed_iterations))(updates), dtype=np.float64
    )
    inverse = 1.0 / np.maximum(cfg.geomed_nu, np.linalg.norm(updates - result, axis=1))
    return result, inverse / inverse.sum()


def _selected_mean_check(updates: np.ndarray, chosen: np.ndarray, result: np.ndarray, rule: str) -> None:
    if not np.allclose(updates[chosen].mean(axis=0), result, rtol=1e-6, atol=1e-9):
        log.warning("%s: the recorded selection does not reproduce ByzFL's result (tied scores?)", rule)


@update_rule("krum", selecting=True, too_few=krum_too_few)
def krum(updates: np.ndarray, cfg: FederationConfig, context: RoundContext) -> tuple[np.ndarray, np.ndarray]:
    """Krum (Blanchard et al. 2017): the one update closest to its n - f - 1 nearest others."""
    import byzfl

    result = np.asarray(byzfl.Krum(f=int(context.byzantine_f))(updates), dtype=np.float64)
    chosen = np.array([int(np.argmin(krum_scores(updates, int(context.byzantine_f))))])
    _selected_mean_check(updates, chosen, result, "krum")
    weights = np.zeros(len(updates))
    weights[chosen] = 1.0
    return result, weights


@update_rule("multi_krum", selecting=True, too_few=krum_too_few)
def multi_krum(updates: np.ndarray, cfg: FederationConfig, context: RoundContext) -> tuple[np.ndarray, np.ndarray]:
    """Multi-Krum (El Mhamdi et al. 2018): the mean of the n - f updates with the best Krum scores."""
    import byzfl

    f = int(context.byzantine_f)
    result = np.asarray(byzfl.MultiKrum(f=f)(updates), dtype=np.float64)
    keep = len(updates) - f
    chosen = np.argpartition(krum_scores(updates, f), keep - 1)[:keep]
    _selected_mean_check(updates, chosen, result, "multi_krum")
    weights = np.zeros(len(updates))
    weights[chosen] = 1.0 / keep
    return result, weights


@update_rule("centered_clipping")
def centered_clipping(
    updates: np.ndarray, cfg: FederationConfig, context: RoundContext
) -> tuple[np.ndarray, np.ndarray]:
    """Centered clipping (Karimireddy et al. 2021) around the current global model (update 0):
    v <- v + mean_i clip_tau(x_i - v), cc_iterations times."""
    import byzfl

    tau = cfg.cc_radius if cfg.cc_radius is not None else median_norm(updates)
    rule = byzfl.CenteredClipping(L=1, tau=float(tau))  # one step per call; the centre carries over
    centre = np.zeros(updates.shape[1])
    with np.errstate(divide="ignore"):  # an update equal to the centre (a free rider) has norm 0
        for _ in range(cfg.cc_iterations):
            centre = np.asarray(rule.m, dtype=np.float64) if rule.m is not None else centre
            result = np.asarray(rule(updates), dtype=np.float64)
        factors = np.minimum(1.0, tau / np.linalg.norm(updates - centre, axis=1))
    return result, factors / len(updates)


def aggregation_problem(name: str, cfg: FederationConfig, f: int, updates: int) -> Optional[str]:
    """Why ``updates`` uploads cannot be aggregated by the rule after the pre-aggregation steps
    (None: they can). Bucketing leaves ceil(n / bucket_size) vectors for what follows it."""
    rows, after = updates, ""
    for step in cfg.pre_aggregation:
        if step == "nnm" and rows <= f:
            return f"nnm needs more than f = {f} updates and gets {rows}{after}"
        if step == "bucketing":
            rows, after = math.ceil(rows / cfg.bucket_size), f" (after bucketing by {cfg.bucket_size})"
    if rows < 1:
        return "there is no update to aggregate"
    spec = AGGREGATORS.find(name)
    problem = spec.too_few(rows, f) if spec is not None and spec.too_few is not None else None
    return f"{name} {problem}{after}" if problem else None
