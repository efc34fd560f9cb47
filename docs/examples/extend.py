"""One file of your own: an algorithm, an aggregation rule and an adversary behaviour.

Use it with ``--set 'runtime.plugins=[docs/examples/extend.py]'`` (every process of the run
imports it before looking names up), then name what it registers:

    sylva-ray run --preset smoke --set 'runtime.plugins=[docs/examples/extend.py]' \
        --set algorithm.name=fedprox_lora_at --set federation.aggregation=uniform_mean

The docs' tutorial "Extending sylva_ray" walks through it; ``tests/test_docs.py`` imports this file
and runs one round with each of its three registrations.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from sylva_ray.base.config import AdversaryConfig, AlgorithmConfig, FederationConfig
from sylva_ray.method.aggregation import AGGREGATORS, weighted_average
from sylva_ray.method.algorithms import FEDAVG_NO_PHASE2, PGD_AT, Algorithm, registered
from sylva_ray.method.byzantine import BEHAVIOURS, OWN, AttackContext, Behaviour
from sylva_ray.method.update_space import NO_CONTEXT, RoundContext, State


# --- an algorithm: a subclass states what makes it another method ------------------------------------
@registered
class FedProxLoRAAT(Algorithm):
    """FedProx (Li et al. 2020) on the LoRA adapters with PGD-AT locally: FedAvg-LoRA-AT plus the
    proximal pull towards the global adapter, personal heads, no Phase 2."""

    name = "fedprox_lora_at"

    @classmethod
    def implied_settings(cls, algo: AlgorithmConfig) -> dict[str, Any]:
        # PGD-AT's loss (no class balance, no similarity term), FedAvg, no Phase 2; then FedProx's mu.
        return {**PGD_AT, **FEDAVG_NO_PHASE2, "loss.proximal_mu": 0.01}


# --- an aggregation rule: (uploads, sample counts, config, context) -> (aggregate, weights) ----------
@AGGREGATORS.register("uniform_mean")
def uniform_mean(
    states: Sequence[State], num_samples: Sequence[int], cfg: FederationConfig, context: RoundContext = NO_CONTEXT
) -> tuple[dict[str, torch.Tensor], np.ndarray]:
    """Every upload weighs the same, whatever its client's sample count."""
    weights = np.full(len(states), 1.0 / len(states))
    return weighted_average(states, weights), weights


# --- an adversary behaviour: what a malicious client uploads instead of its update -------------------
def _reversed_update(updates: np.ndarray, cfg: AdversaryConfig, context: AttackContext) -> np.ndarray:
    """The client's own update, reversed and doubled: a crude model-poisoning attack."""
    return -2.0 * updates.mean(axis=0)


BEHAVIOURS.register("reverse_update")(Behaviour(OWN, _reversed_update))
