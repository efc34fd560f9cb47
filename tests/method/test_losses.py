import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sylva_ray.base.config import LossConfig
from sylva_ray.method.losses import (
    class_weights,
    proximal_term,
    similarity_kl,
    sylva_loss,
)


def test_class_weights_hand_computed():
    # none: every present class weighs 1; absent classes 0
    assert class_weights(np.array([1, 9, 0]), "none", 0.9, 10).tolist() == [1.0, 1.0, 0.0]
    # inverse frequency [1, 1/9], ratio 9 <= 10; scaled so 1*w0 + 9*w1 = 10 -> [5, 5/9]
    assert class_weights(np.array([1, 9]), "inverse_frequency", 0.9, 10).numpy() == pytest.approx([5, 5 / 9])
    # clipped at 3x the smallest: [1/3, 1/9]; 1/3 + 1 = 4/3 -> scale 7.5 -> [2.5, 5/6]
    assert class_weights(np.array([1, 9]), "inverse_frequency", 0.9, 3).numpy() == pytest.approx([2.5, 5 / 6])
    # effective number, beta 0.9: [0.1/0.1, 0.1/0.19]; scaled so 1*w0 + 2*w1 = 3
    raw = np.array([1.0, 0.1 / 0.19])
    expected = raw * 3 / (raw[0] + 2 * raw[1])
    assert class_weights(np.array([1, 2]), "effective_number", 0.9, 10).numpy() == pytest.approx(expected, rel=1e-6)


def test_class_weights_keep_the_mean_sample_weight_at_one():
    counts = np.array([90, 5, 1, 0, 30])
    for method in ("none", "inverse_frequency", "effective_number"):
        w = class_weights(counts, method, 0.999, 10).numpy()
        assert (counts * w).sum() / counts.sum() == pytest.approx(1.0)
        present = w[counts > 0]
        assert present.max() / present.min() <= 10 + 1e-6


def test_similarity_kl_hand_computed():
    benign = torch.tensor([[0.0, math.log(3.0)]])  # p = [1/4, 3/4]
    adversarial = torch.tensor([[0.0, 0.0]])  # q = [1/2, 1/2]
    expected = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert float(similarity_kl(benign, adversarial, True)) == pytest.approx(expected, rel=1e-6)
    assert float(similarity_kl(benign, benign.clone(), True)) == pytest.approx(0.0, abs=1e-7)


def test_detached_similarity_sends_no_gradient_to_the_benign_branch():
    benign = torch.randn(3, 4, requires_grad=True)
    adversarial = torch.randn(3, 4, requires_grad=True)
    similarity_kl(benign, adversarial, detach_benign=True).backward()
    assert benign.grad is None and adversarial.grad is not None
    similarity_kl(benign, adversarial, detach_benign=False).backward()
    assert benign.grad is not None


def test_proximal_term_hand_computed():
    local = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([[3.0]])}
    reference = {"a": torch.tensor([0.0, 0.0]), "b": torch.tensor([[1.0]])}
    assert float(proximal_term(local, reference)) == pytest.approx(1 + 4 + 4)
    with pytest.raises(KeyError):
        proximal_term(local, {"a": reference["a"]})


def test_sylva_loss_is_the_weighted_sum_of_its_terms():
    torch.manual_seed(0)
    adv, ben = torch.randn(5, 3), torch.randn(5, 3)
    labels = torch.tensor([0, 1, 2, 0, 1])
    weights = torch.tensor([0.5, 1.0, 2.0])
    local = {"w": torch.tensor([1.0, 1.0])}
    anchor = {"w": torch.tensor([0.0, 1.0])}
    cfg = LossConfig(adversarial_weight=2.0, benign_weight=0.5, similarity_weight=3.0, proximal_mu=0.4)
    terms = sylva_loss(cfg, adv, labels, ben, weights, local, anchor)
    expected = (
        2.0 * F.cross_entropy(adv, labels, weight=weights)
        + 0.5 * F.cross_entropy(ben, labels)
        + 3.0 * F.kl_div(F.log_softmax(adv, 1), F.softmax(ben, 1), reduction="batchmean")
        + 0.5 * 0.4 * 1.0
    )
    assert float(terms.total) == pytest.approx(float(expected), rel=1e-6)
    assert float(terms.proximal) == pytest.approx(1.0)


def test_plain_pgd_at_needs_no_benign_pass():
    cfg = LossConfig(benign_weight=0, similarity_weight=0, proximal_mu=0, class_weighting="none")
    adv = torch.randn(4, 3)
    labels = torch.tensor([0, 1, 2, 0])
    terms = sylva_loss(cfg, adv, labels, None, None)
    assert float(terms.total) == pytest.approx(float(F.cross_entropy(adv, labels)))
    with pytest.raises(ValueError, match="benign logits"):
        sylva_loss(LossConfig(), adv, labels, None, None)
