"""How far each client's labels are from the pool's: the partition at a glance.

A Dirichlet alpha or a shard count says how a split was *drawn*; what a reader wants to know is
how skewed the clients *are*. Each client's label distribution (its whole share, train and test)
is set against the private pool's by two bounded distances, both 0 for an IID client and 1 for
disjoint supports, so that runs on other datasets or partitioners line up:

- Hellinger: ``sqrt(1 - sum_k sqrt(p_k q_k))``;
- Jensen-Shannon distance (base 2): the square root of the JS divergence (what scipy's
  ``jensenshannon(p, q, base=2)`` gives; a few lines of numpy here, so that every client actor,
  which imports this module with the data, does not import scipy for it).

Figures are rounded to ``DIGITS`` decimals: they are stored in ``partition.json``, whose digest a
checkpoint holds, and a last-bit difference between two processors must not change the digest.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

#: Decimals kept of each distance (see the module's docstring).
DIGITS = 6


def class_counts(labels: np.ndarray, shares: Sequence[np.ndarray], num_classes: int) -> np.ndarray:
    """(clients, classes) label counts of each client's share of the pool."""
    return np.stack([np.bincount(labels[share], minlength=num_classes) for share in shares]).astype(np.int64)


def hellinger(p: np.ndarray, q: np.ndarray) -> float:
    """Hellinger distance of two distributions (in [0, 1])."""
    return float(np.sqrt(max(0.0, 1.0 - float(np.sum(np.sqrt(p * q))))))


def jensen_shannon(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon distance of two distributions, base 2 (in [0, 1])."""
    middle = (p + q) / 2

    def kl(a: np.ndarray) -> float:
        support = a > 0
        return float(np.sum(a[support] * np.log2(a[support] / middle[support])))

    return float(np.sqrt(max(0.0, (kl(p) + kl(q)) / 2)))


def heterogeneity(labels: np.ndarray, shares: Sequence[np.ndarray], num_classes: int) -> dict[str, Any]:
    """Per client: size and both distances from the pool's label distribution; and their means.

    ``shares``: each client's indices into the pool (train and test together)."""
    counts = class_counts(labels, shares, num_classes)
    pool = np.bincount(labels, minlength=num_classes).astype(float)
    pool /= pool.sum()
    clients = []
    for client, row in enumerate(counts):
        size = int(row.sum())
        distribution = row / size if size else np.zeros(num_classes)
        clients.append(
            {
                "client": client,
                "samples": size,
                "classes_present": int(np.count_nonzero(row)),
                "hellinger": round(hellinger(distribution, pool), DIGITS) if size else 1.0,
                "jensen_shannon": round(jensen_shannon(distribution, pool), DIGITS) if size else 1.0,
            }
        )
    return {
        "pool_distribution": [round(float(share), DIGITS) for share in pool],
        "mean_hellinger": round(float(np.mean([c["hellinger"] for c in clients])), DIGITS),
        "mean_jensen_shannon": round(float(np.mean([c["jensen_shannon"] for c in clients])), DIGITS),
        "clients": clients,
        "class_counts": counts.tolist(),
    }
