"""Server-side aggregation: pure functions over adapter state dicts (no Ray), tested by hand.

What is averaged: each LoRA factor (A and B) separately, key by key -- the FedIT convention.
mean(B) @ mean(A) is *not* mean(B @ A) (docs explanation/method.md, 'Pitfalls', 4): the exact average of the products
has rank up to K*r and cannot be sent back as rank-r factors without an SVD that changes the
factors' basis every round. Averaging factors keeps the payload rank-r and the clients' factors in
one shared basis (all start from the same broadcast and are pulled towards it by the proximal
term), so the cross terms it drops shrink as the clients agree. ``product_gap`` measures the gap.

Sylva's ball-tree weighting (``balltree_weights``): each client's adapter is flattened into a
vector; a ``sklearn.neighbors.BallTree`` (a binary metric tree) over the vectors gives each client's
mean Euclidean distance d_i to its k nearest other clients. With bandwidth h = median_i d_i,

    w_i  proportional to  n_i * exp(-d_i / h)

so clients in a dense, agreeing region weigh more and an outlier (a poisoned or diverged update)
weighs exponentially less; the kernel is scale-free because d is measured in units of h. When all
updates coincide (h = 0) the weights reduce to sample counts. The paper's exact formula is not
public; this one is our documented choice (``federation.balltree_k`` sets k).

Both are registered in ``AGGREGATORS`` (``method.rules``: a rule's function and its facts); this
module imports ByzFL's rules too, so the registry imported from here holds every built-in rule.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np

from sylva_ray.base.config import FederationConfig
from sylva_ray.method import robust_aggregation  # noqa: F401 -- ByzFL's rules register themselves on import
from sylva_ray.method.rules import (  # noqa: F401 -- the registry's names, importable from here
    AGGREGATORS,
    Aggregator,
    RuleSpec,
    is_sample_weighted,
    is_selecting,
    update_rule,
)
from sylva_ray.method.update_space import (
    NO_CONTEXT,
    RoundContext,
    State,
    check_same_keys,
    flatten_state,
    on_updates,
)

if TYPE_CHECKING:  # torch loads where tensors are handled: checking a config never needs it
    import torch


def weighted_average(states: Sequence[State], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """sum_i w_i * state_i, key by key, in float64 then cast back (weights are normalised here)."""
    import torch

    keys = check_same_keys(states)
    w = np.asarray(weights, dtype=np.float64)
    if len(w) != len(states) or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"weights must be {len(states)} non-negative numbers with a positive sum, got {w.tolist()}")
    w = w / w.sum()
    return {
        key: sum(float(wi) * s[key].detach().to(torch.float64) for wi, s in zip(w, states)).to(states[0][key].dtype)
        for key in keys
    }


def sample_weights(num_samples: Sequence[int]) -> np.ndarray:
    n = np.asarray(num_samples, dtype=np.float64)
    if (n < 0).any() or n.sum() <= 0:
        raise ValueError(f"sample counts must be non-negative with a positive sum, got {n.tolist()}")
    return n / n.sum()


def balltree_weights(vectors: np.ndarray, num_samples: Sequence[int], k: int) -> np.ndarray:
    """Density weights from a ball tree over the clients' flattened adapters (formula in module doc)."""
    vectors = np.asarray(vectors, dtype=np.float64)
    clients = len(vectors)
    base = sample_weights(num_samples)
    if clients == 1:
        return base
    k = min(k, clients - 1)
    from sklearn.neighbors import BallTree  # imported by the aggregations that use it, not every process

    distances, _ = BallTree(vectors).query(vectors, k=k + 1)  # column 0 is each point itself
    mean_distance = distances[:, 1:].mean(axis=1)
    bandwidth = float(np.median(mean_distance))
    if bandwidth == 0.0:
        positive = mean_distance[mean_distance > 0]
        bandwidth = float(positive.min()) if len(positive) else 1.0
    weights = base * np.exp(-mean_distance / bandwidth)
    return weights / weights.sum()


@AGGREGATORS.register("fedavg", sample_weighted=True)
def aggregate_fedavg(
    states: Sequence[State], num_samples: Sequence[int], cfg: FederationConfig, context: RoundContext = NO_CONTEXT
) -> tuple[dict[str, torch.Tensor], np.ndarray]:
    """Sample-weighted FedAvg (McMahan et al. 2017) of the LoRA factors."""
    weights = sample_weights(num_samples)
    if cfg.pre_aggregation:  # clipped updates, averaged with the same weights
        return on_updates(states, cfg, context, lambda u: (weights @ u, weights))
    return weighted_average(states, weights), weights


@AGGREGATORS.register("balltree", sample_weighted=True)
def aggregate_balltree(
    states: Sequence[State], num_samples: Sequence[int], cfg: FederationConfig, context: RoundContext = NO_CONTEXT
) -> tuple[dict[str, torch.Tensor], np.ndarray]:
    """Sylva's server step: ball-tree density weights x sample counts, then a weighted mean.

    The distances are the same between uploads as between updates (upload - the common
    reference); after a pre-aggregation step they are taken between the clipped updates."""
    check_same_keys(states)
    if cfg.pre_aggregation:

        def rule(updates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            weights = balltree_weights(updates, num_samples, cfg.balltree_k)
            return weights @ updates, weights

        return on_updates(states, cfg, context, rule)
    weights = balltree_weights(np.stack([flatten_state(s) for s in states]), num_samples, cfg.balltree_k)
    return weighted_average(states, weights), weights


def aggregate(
    name: str,
    states: Sequence[State],
    num_samples: Sequence[int],
    cfg: FederationConfig,
    context: RoundContext = NO_CONTEXT,
) -> tuple[dict[str, torch.Tensor], np.ndarray]:
    """The named rule's aggregate and each upload's weight in it (``robust_aggregation`` says what
    "weight" means for rules that are not weighted means)."""
    return AGGREGATORS.get(name).aggregate(states, num_samples, cfg, context)


def product_gap(states: Sequence[State], weights: Sequence[float], aggregate_state: State) -> float:
    """Relative Frobenius gap between sum_i w_i B_i A_i and B_agg A_agg, over all adapted modules.

    A diagnostic of the factor-averaging approximation (0 when all clients agree).
    """
    w = np.asarray(weights, dtype=np.float64) / np.sum(weights)
    num = den = 0.0
    for key_a in (k for k in aggregate_state if ".lora_A." in k):
        key_b = key_a.replace(".lora_A.", ".lora_B.")
        exact = sum(float(wi) * (s[key_b].double() @ s[key_a].double()) for wi, s in zip(w, states))
        approx = aggregate_state[key_b].double() @ aggregate_state[key_a].double()
        num += float((exact - approx).pow(2).sum())
        den += float(exact.pow(2).sum())
    return (num / den) ** 0.5 if den > 0 else 0.0
