"""Sylva's local objective as pure functions (no Ray, no data loading): unit-tested by hand.

    total = w_adv * CE_w(f(x_adv), y)            L_A: class-balanced adversarial loss
          + w_ben * CE(f(x), y)                  benign anchor (keeps clients from collapsing)
          + w_sim * KL(p(x) || p(x_adv))         L_S: benign-vs-adversarial similarity (TRADES form)
          + mu/2 * sum ||theta - theta_global||^2 L_R: pull of the local LoRA towards the global LoRA

Plain PGD-AT is (w_adv=1, rest 0, no class weights); TRADES is (w_ben=1, w_sim=beta,
similarity_target='both', attack trades_kl); FedProx-style AT adds mu. One loop serves them all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

import numpy as np
import torch
import torch.nn.functional as F

from sylva_ray.base.config import LossConfig


def class_weights(counts: np.ndarray, method: str, beta: float, max_ratio: float) -> torch.Tensor:
    """Per-class weights from one client's label counts, normalised to mean 1 per sample.

    effective_number (Cui et al., CVPR 2019): w_c = (1 - beta) / (1 - beta^n_c);
    inverse_frequency: w_c = 1 / n_c; none: w_c = 1. Then the largest weight is clipped to
    ``max_ratio`` x the smallest (unclipped 1/n reached ~90x and collapsed clients: docs
    explanation/method.md, 'Pitfalls the code guards against', 5), and the weights are scaled so that sum_c n_c w_c = N,
    i.e. the loss keeps plain CE's scale.
    Classes the client does not hold get weight 0 (they never appear as a target there).
    """
    counts = np.asarray(counts, dtype=np.float64)
    present = counts > 0
    weights = np.zeros_like(counts)
    if method == "none":
        weights[present] = 1.0
    elif method == "inverse_frequency":
        weights[present] = 1.0 / counts[present]
    elif method == "effective_number":
        weights[present] = (1.0 - beta) / (1.0 - np.power(beta, counts[present]))
    else:
        raise ValueError(f"loss.class_weighting={method!r}: use effective_number, inverse_frequency or none")
    if present.any():
        ceiling = max_ratio * weights[present].min()
        weights[present] = np.minimum(weights[present], ceiling)
        weights *= counts.sum() / float((counts * weights).sum())
    return torch.tensor(weights, dtype=torch.float32)


def similarity_kl(benign_logits: torch.Tensor, adversarial_logits: torch.Tensor, detach_benign: bool) -> torch.Tensor:
    """KL(softmax(benign) || softmax(adversarial)), averaged over the batch (TRADES' robust term)."""
    target = benign_logits.detach() if detach_benign else benign_logits
    return F.kl_div(F.log_softmax(adversarial_logits, dim=1), F.softmax(target, dim=1), reduction="batchmean")


def proximal_term(local: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """sum over tensors of ||local - reference||^2 (FedProx's distance; the 1/2 mu is applied by the caller)."""
    missing = set(local) - set(reference)
    if missing:
        raise KeyError(f"proximal reference lacks {sorted(missing)[:3]}")
    terms = [(tensor - reference[name].to(tensor.device)).pow(2).sum() for name, tensor in local.items()]
    return torch.stack(terms).sum() if terms else torch.zeros(())


@dataclass
class LossTerms:
    """The loss to back-propagate and its terms, detached. The terms stay tensors: turning each into
    a float would synchronise a GPU four times a step (and cannot be done on the meta device, where
    ``method.cost`` counts a step without weights); the local loop converts its sums once a round."""

    total: torch.Tensor
    adversarial: torch.Tensor
    benign: torch.Tensor
    similarity: torch.Tensor
    proximal: torch.Tensor


def sylva_loss(
    cfg: LossConfig,
    adversarial_logits: torch.Tensor,
    labels: torch.Tensor,
    benign_logits: Optional[torch.Tensor],
    weights: Optional[torch.Tensor],
    local_shared: Optional[Mapping[str, torch.Tensor]] = None,
    global_shared: Optional[Mapping[str, torch.Tensor]] = None,
) -> LossTerms:
    """Combine the four terms; a term whose weight is 0 is not computed (and needs no inputs)."""
    zero = adversarial_logits.new_zeros(())
    class_w = weights.to(adversarial_logits.device) if weights is not None and cfg.class_weighting != "none" else None
    adv = F.cross_entropy(adversarial_logits, labels, weight=class_w) if cfg.adversarial_weight > 0 else zero
    if (cfg.benign_weight > 0 or cfg.similarity_weight > 0) and benign_logits is None:
        raise ValueError("benign logits are needed when loss.benign_weight or loss.similarity_weight > 0")
    ben = F.cross_entropy(benign_logits, labels) if cfg.benign_weight > 0 else zero
    sim = (
        similarity_kl(benign_logits, adversarial_logits, cfg.similarity_target == "detached")
        if cfg.similarity_weight > 0
        else zero
    )
    prox = zero
    if cfg.proximal_mu > 0 and local_shared is not None and global_shared is not None:
        prox = proximal_term(local_shared, global_shared)
    total = (
        cfg.adversarial_weight * adv
        + cfg.benign_weight * ben
        + cfg.similarity_weight * sim
        + 0.5 * cfg.proximal_mu * prox
    )
    return LossTerms(total, adv.detach(), ben.detach(), sim.detach(), prox.detach())


# --- baselines' local objectives (pure functions, unit-tested by hand) ---------------------------
#: MART's released code keeps log() finite with these offsets; kept so results match it.
MART_LOG_OFFSET = 1.0001
MART_EPS = 1e-12
#: CalFAT: a class the client never saw gets this prior instead of 0, so log(prior) stays finite.
PRIOR_FLOOR = 1e-6


def mart_loss(
    adversarial_logits: torch.Tensor, benign_logits: torch.Tensor, labels: torch.Tensor, beta: float
) -> LossTerms:
    """MART (Wang et al., ICLR 2020), as in the authors' code:

    BCE(x', y) = CE(f(x'), y) - log(1.0001 - max_{k != y} p_k(x'))
    total      = BCE + beta * mean_i[ KL(p(x_i) || p(x'_i)) * (1 - p_y(x_i)) ]
    """
    adv_probs = F.softmax(adversarial_logits, dim=1)
    top2 = torch.argsort(adv_probs, dim=1)[:, -2:]
    runner_up = torch.where(top2[:, -1] == labels, top2[:, -2], top2[:, -1])
    boosted = F.cross_entropy(adversarial_logits, labels) + F.nll_loss(
        torch.log(MART_LOG_OFFSET - adv_probs + MART_EPS), runner_up
    )
    nat_probs = F.softmax(benign_logits, dim=1)
    true_probs = nat_probs.gather(1, labels.unsqueeze(1)).squeeze(1)
    kl = F.kl_div(torch.log(adv_probs + MART_EPS), nat_probs, reduction="none").sum(dim=1)
    robust = (kl * (1.0000001 - true_probs)).mean()
    total = boosted + beta * robust
    zero = total.new_zeros(())
    return LossTerms(total, boosted.detach(), zero, robust.detach(), zero)


def class_prior(counts: np.ndarray) -> torch.Tensor:
    """A client's label distribution from its train counts, absent classes floored at PRIOR_FLOOR."""
    counts = np.asarray(counts, dtype=np.float64)
    prior = np.maximum(counts / max(counts.sum(), 1.0), PRIOR_FLOOR)
    return torch.tensor(prior / prior.sum(), dtype=torch.float32)


def calibrate(logits: torch.Tensor, log_prior: torch.Tensor, tau: float) -> torch.Tensor:
    """CalFAT's calibrated logits z + tau * log(pi): a frequent class must win by more."""
    return logits + tau * log_prior.to(logits.device)


def calfat_loss(
    adversarial_logits: torch.Tensor,
    benign_logits: torch.Tensor,
    labels: torch.Tensor,
    log_prior: torch.Tensor,
    tau: float,
    scale: float,
) -> LossTerms:
    """CalFAT's outer loss on calibrated logits (see ``sylva_ray.method.algorithms.CalFAT`` for the source):

    total = CE(z~(x'), y) + scale * KL(softmax(z~(x)) || softmax(z~(x')))     z~ = z + tau log pi
    """
    adv = calibrate(adversarial_logits, log_prior, tau)
    ben = calibrate(benign_logits, log_prior, tau)
    ce = F.cross_entropy(adv, labels)
    kl = similarity_kl(ben, adv, detach_benign=False)
    total = ce + scale * kl
    zero = total.new_zeros(())
    return LossTerms(total, ce.detach(), zero, kl.detach(), zero)
