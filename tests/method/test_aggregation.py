import math

import numpy as np
import pytest
import torch

from sylva_ray.base.config import FederationConfig
from sylva_ray.method.aggregation import (
    AGGREGATORS,
    aggregate,
    balltree_weights,
    flatten_state,
    product_gap,
    weighted_average,
)
from sylva_ray.method.update_space import RoundContext


def _state(a, b):
    return {
        "m.lora_A.weight": torch.tensor(a, dtype=torch.float32),
        "m.lora_B.weight": torch.tensor(b, dtype=torch.float32),
    }


def test_fedavg_hand_computed():
    # Prepare: two clients with 10 and 30 samples
    s1 = _state([[1.0, 2.0]], [[1.0], [0.0]])
    s2 = _state([[5.0, 6.0]], [[3.0], [4.0]])
    # Execute
    merged, weights = aggregate("fedavg", [s1, s2], [10, 30], FederationConfig())
    # Assert: 0.25 * s1 + 0.75 * s2, factor by factor
    assert weights.tolist() == [0.25, 0.75]
    assert merged["m.lora_A.weight"].tolist() == [[4.0, 5.0]]
    assert merged["m.lora_B.weight"].tolist() == [[2.5], [3.0]]


def test_factor_average_is_not_product_average():
    s1 = _state([[1.0, 0.0]], [[1.0], [0.0]])
    s2 = _state([[0.0, 1.0]], [[0.0], [1.0]])
    merged, weights = aggregate("fedavg", [s1, s2], [1, 1], FederationConfig())
    assert product_gap([s1, s2], weights, merged) > 0.5
    same, w = aggregate("fedavg", [s1, s1], [1, 1], FederationConfig())
    assert product_gap([s1, s1], w, same) == pytest.approx(0.0)


def test_balltree_weights_hand_computed():
    # 1-D adapters at 0, 1, 10; k = 1: nearest-neighbour distances d = [1, 1, 9]; h = median = 1
    weights = balltree_weights(np.array([[0.0], [1.0], [10.0]]), [1, 1, 1], k=1)
    raw = np.array([math.exp(-1), math.exp(-1), math.exp(-9)])
    assert weights == pytest.approx(raw / raw.sum())


def test_balltree_weights_multiply_sample_counts():
    # equal distances (two points): density factors equal, so weights follow the sample counts
    weights = balltree_weights(np.array([[0.0], [2.0]]), [1, 3], k=1)
    assert weights == pytest.approx([0.25, 0.75])


@pytest.mark.parametrize("name", AGGREGATORS.names())
def test_identical_updates_come_back_unchanged(name):
    state = _state([[0.5, -1.0]], [[2.0], [3.0]])
    merged, weights = aggregate(name, [state] * 4, [5, 1, 2, 7], FederationConfig(), RoundContext(state, 1))
    assert all(torch.allclose(merged[k], state[k]) for k in state)
    if AGGREGATORS.get(name).sample_weighted:  # fedavg, balltree; the robust ones weigh uploads equally
        assert weights == pytest.approx(np.array([5, 1, 2, 7]) / 15)


def test_an_injected_outlier_is_down_weighted():
    rng = np.random.default_rng(0)
    honest = [_state(rng.normal(0, 0.01, (1, 2)), rng.normal(0, 0.01, (2, 1))) for _ in range(6)]
    outlier = _state([[50.0, -50.0]], [[40.0], [40.0]])
    merged, weights = aggregate("balltree", honest + [outlier], [10] * 7, FederationConfig(balltree_k=3))
    assert weights[-1] < 0.01 * weights[:-1].min()
    fedavg, _ = aggregate("fedavg", honest + [outlier], [10] * 7, FederationConfig())
    assert merged["m.lora_A.weight"].abs().max() < 0.1 < fedavg["m.lora_A.weight"].abs().max()


def test_flatten_lines_clients_up_by_key():
    a = {"x": torch.tensor([1.0]), "y": torch.tensor([2.0, 3.0])}
    b = {"y": torch.tensor([2.0, 3.0]), "x": torch.tensor([1.0])}
    assert flatten_state(a).tolist() == flatten_state(b).tolist() == [1.0, 2.0, 3.0]


def test_mismatched_updates_and_bad_weights_are_refused():
    with pytest.raises(KeyError):
        weighted_average([{"x": torch.zeros(1)}, {"y": torch.zeros(1)}], [1, 1])
    with pytest.raises(ValueError):
        weighted_average([{"x": torch.zeros(1)}], [-1])
    with pytest.raises(ValueError, match="no client updates"):
        weighted_average([], [])
