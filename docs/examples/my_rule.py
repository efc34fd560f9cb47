"""One file of your own: an aggregation rule, on the round's updates as vectors.

Use it with ``--set 'runtime.plugins=[docs/examples/my_rule.py]'`` (every process of the run
imports it before looking names up), then name what it registers:

    sylva-ray run --preset smoke --set 'runtime.plugins=[docs/examples/my_rule.py]' \
        --set federation.aggregation=nearest_to_median

The docs' tutorial "Add a dataset and an aggregation rule" walks through it; ``tests/test_docs.py``
loads this file through ``runtime.plugins`` and checks the rule against a hand-computed answer.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from sylva_ray.base.config import FederationConfig
from sylva_ray.method.aggregation import update_rule
from sylva_ray.method.update_space import RoundContext


def too_few(n: int, f: int) -> Optional[str]:
    """Keeping n - f updates needs more than f of them (said after the rule's name)."""
    return f"needs n > f updates (f = {f}) and gets n = {n}" if n <= f else None


# --- an aggregation rule: (updates n x d, config, context) -> (update, each row's weight) -------------
@update_rule("nearest_to_median", selecting=True, too_few=too_few)
def nearest_to_median(
    updates: np.ndarray, cfg: FederationConfig, context: RoundContext
) -> tuple[np.ndarray, np.ndarray]:
    """The mean of the n - f updates nearest the coordinate-wise median (f: federation.byzantine_f)."""
    keep = len(updates) - context.byzantine_f
    distances = np.linalg.norm(updates - np.median(updates, axis=0), axis=1)
    chosen = np.argsort(distances, kind="stable")[:keep]
    weights = np.zeros(len(updates))
    weights[chosen] = 1.0 / keep
    return weights @ updates, weights
