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


def feature_distances(clients: Sequence[Any], num_classes: int) -> dict[str, Any]:
    """How far each client's *images* are from the pool's, class by class: the feature shift at a glance.

    For each class a client holds, the root-mean-square difference (pixels in [0, 1]) between the
    client's mean image of that class and the mean image of that class over every client; weighted
    by the client's class shares. Conditioning on the class keeps label skew out of it: under label
    skew alone the distance is sampling noise only (a few hundredths for digits), under a feature
    shift it is the shift. ``clients``: objects with ``train`` and ``test`` ``ArrayDataset``s (a
    client's whole share, as for the label distances). One client's images are converted at a time;
    what is kept is each client's per-class sums, so memory does not grow with the pool.
    """
    sums, counts = [], []
    for client in clients:
        class_sums, class_counts = _class_sums(client, num_classes)
        sums.append(class_sums)
        counts.append(class_counts)
    pool_counts = np.sum(counts, axis=0)
    pool_means = np.sum(sums, axis=0) / np.maximum(pool_counts, 1)[:, None]
    per_client = []
    for class_sums, class_counts in zip(sums, counts):
        held = np.flatnonzero(class_counts)
        client_means = class_sums[held] / class_counts[held, None]
        squared = np.mean((client_means - pool_means[held]) ** 2, axis=1)
        weights = class_counts[held] / class_counts.sum()
        per_client.append(round(float(np.sqrt(np.sum(weights * squared))), DIGITS))
    return {"feature_distance": per_client, "mean_feature_distance": round(float(np.mean(per_client)), DIGITS)}


def _class_sums(client: Any, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """A client's per-class sums of its flattened images (float64, pixels in [0, 1]) and class counts."""
    parts = (client.train, client.test)
    size = int(np.prod(parts[0].images.shape[1:]))
    sums = np.zeros((num_classes, size))
    counts = np.zeros(num_classes, dtype=np.int64)
    for part in parts:
        flat = part.images.reshape(len(part.images), size)
        for cls in np.unique(part.labels):
            rows = flat[part.labels == cls]
            sums[cls] += rows.sum(axis=0, dtype=np.float64) / part.pixel_scale
            counts[cls] += len(rows)
    return sums, counts
