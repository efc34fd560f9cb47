"""The aggregation rules' registry: each rule's function and the facts the engine asks about it.

A rule is registered once, under the name ``federation.aggregation`` takes, with its facts
(``RuleSpec``); nothing else in the package lists rules by name:

    selecting        its record is a selection (``agg_selected`` says which uploads it picked), not
                     a weighting
    sample_weighted  it weighs each upload by its client's sample count; the mixing pre-aggregation
                     steps (nnm, bucketing), after which no vector is one client's, do not apply
    too_few          why n updates are too few against f Byzantine ones (None: enough)

Two forms, one registry: ``@AGGREGATORS.register(name, **facts)`` on a function of the round's
uploads (``Aggregator``), or ``@update_rule(name, **facts)`` on a function of their *updates* as
vectors (``UpdateRule``), run inside ``update_space.on_updates`` (flatten, pre-aggregate, the rule,
add back, unflatten). ``method.aggregation`` holds the built-in rules and imports ByzFL's
(``method.robust_aggregation``): import ``AGGREGATORS`` from there to see them all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import numpy as np

from sylva_ray.base.config import FederationConfig
from sylva_ray.base.registry import Registry
from sylva_ray.method.update_space import NO_CONTEXT, RoundContext, State, on_updates

if TYPE_CHECKING:  # torch loads where tensors are handled: checking a config never needs it
    import torch

#: (client uploads, sample counts, config, round context) -> (aggregate, each upload's weight in it)
Aggregator = Callable[
    [Sequence[State], Sequence[int], FederationConfig, RoundContext], tuple[dict[str, "torch.Tensor"], np.ndarray]
]
#: (updates n x d, config, round context) -> (aggregated update, each row's weight in it)
UpdateRule = Callable[[np.ndarray, FederationConfig, RoundContext], tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class RuleSpec:
    """A registered aggregation rule: the function and what the engine asks about it (module doc)."""

    aggregate: Aggregator
    selecting: bool = False
    sample_weighted: bool = False
    #: (updates n, Byzantine f) -> why n is too few, phrased after the rule's name; None: enough
    too_few: Optional[Callable[[int, int], Optional[str]]] = None


AGGREGATORS: Registry[RuleSpec] = Registry("aggregator", RuleSpec)


def update_rule(name: str, **facts: Any) -> Callable[[UpdateRule], UpdateRule]:
    """Decorator: register a rule on update vectors as the aggregator ``name`` (``RuleSpec`` facts)."""

    def decorator(rule: UpdateRule) -> UpdateRule:
        AGGREGATORS.register(name, **facts)(on_update_vectors(rule, name))
        return rule

    return decorator


def on_update_vectors(rule: UpdateRule, name: str) -> Aggregator:
    """A rule on update vectors as an aggregator of uploads (``update_space.on_updates``)."""

    def aggregator(
        states: Sequence[State], num_samples: Sequence[int], cfg: FederationConfig, context: RoundContext = NO_CONTEXT
    ) -> tuple[dict[str, torch.Tensor], np.ndarray]:
        return on_updates(states, cfg, context, lambda updates: rule(updates, cfg, context))

    aggregator.__doc__ = rule.__doc__
    aggregator.__name__ = f"aggregate_{name}"
    aggregator.__module__ = rule.__module__
    return aggregator


def is_selecting(name: str) -> bool:
    """Whether the rule's record is a selection (``agg_selected``) rather than a weighting."""
    spec = AGGREGATORS.find(name)
    return spec is not None and spec.selecting


def is_sample_weighted(name: str) -> bool:
    """Whether the rule weighs each upload by its client's sample count."""
    spec = AGGREGATORS.find(name)
    return spec is not None and spec.sample_weighted
