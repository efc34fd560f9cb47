"""The objectives of the algorithms (``method.algorithms``): the inner attack and the outer loss of
the one local loop. Their own module because they need torch: the process that checks a config and
launches a Ray run chooses an algorithm by name without loading it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Optional

import torch
from torch import nn

from sylva_ray.base.config import ExperimentConfig
from sylva_ray.method.attacks import build_attack
from sylva_ray.method.data import ArrayDataset
from sylva_ray.method.losses import (
    LossTerms,
    calfat_loss,
    calibrate,
    class_prior,
    class_weights,
    mart_loss,
    sylva_loss,
)
from sylva_ray.method.training import LocalObjective

if TYPE_CHECKING:  # torchattacks is imported where an attack is built, not by every process
    from torchattacks.attack import Attack


class Objective(LocalObjective):
    """Base of the objectives below (the interface is ``training.LocalObjective``): the config and
    the client's class count; the loss wants benign logits and no global anchor unless it says so."""

    needs_benign: bool = True
    uses_anchor: bool = False

    def __init__(self, cfg: ExperimentConfig, data: ArrayDataset) -> None:
        self.cfg = cfg
        self.num_classes = data.num_classes


class SylvaObjective(Objective):
    """The configured attack and ``sylva_loss`` with the client's class weights (``loss.*``).

    With the settings an algorithm implies this is also PGD-AT (FAT, local_at, fedavg_lora_at)
    and TRADES (fedtrades).
    """

    def __init__(self, cfg: ExperimentConfig, data: ArrayDataset) -> None:
        super().__init__(cfg, data)
        loss = cfg.loss
        self.weights = class_weights(
            data.class_counts(), loss.class_weighting, loss.class_weight_beta, loss.class_weight_max_ratio
        )
        self.needs_benign = loss.benign_weight > 0 or loss.similarity_weight > 0
        self.uses_anchor = loss.proximal_mu > 0

    def attack(self, model: nn.Module, seed: int) -> Attack:
        return build_attack(self.cfg.attack.train_attack, model, self.cfg.attack, "train", self.num_classes, seed)

    def loss(
        self,
        adversarial_logits: torch.Tensor,
        labels: torch.Tensor,
        benign_logits: Optional[torch.Tensor],
        local_shared: Optional[Mapping[str, torch.Tensor]],
        global_shared: Optional[Mapping[str, torch.Tensor]],
    ) -> LossTerms:
        return sylva_loss(
            self.cfg.loss, adversarial_logits, labels, benign_logits, self.weights, local_shared, global_shared
        )


class MARTObjective(Objective):
    """PGD on the cross-entropy (MART's inner step), MART's loss outside (``losses.mart_loss``)."""

    def attack(self, model: nn.Module, seed: int) -> Attack:
        return build_attack("pgd", model, self.cfg.attack, "train", self.num_classes, seed)

    def loss(
        self,
        adversarial_logits: torch.Tensor,
        labels: torch.Tensor,
        benign_logits: Optional[torch.Tensor],
        local_shared: Any = None,
        global_shared: Any = None,
    ) -> LossTerms:
        assert benign_logits is not None
        return mart_loss(adversarial_logits, benign_logits, labels, self.cfg.algorithm.mart_beta)


class CalibratedLogits(nn.Module):
    """A model whose logits are calibrated by a class prior: what CalFAT's inner attack attacks."""

    def __init__(self, model: nn.Module, log_prior: torch.Tensor, tau: float) -> None:
        super().__init__()
        self.model, self.tau = model, tau
        self.register_buffer("log_prior", log_prior)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return calibrate(self.model(images), self.log_prior, self.tau)


class CalFATObjective(Objective):
    """Inner: TRADES' KL attack (torchattacks' TPGD) on calibrated logits; outer: ``losses.calfat_loss``."""

    def __init__(self, cfg: ExperimentConfig, data: ArrayDataset) -> None:
        super().__init__(cfg, data)
        self.log_prior = class_prior(data.class_counts()).log()

    def attack(self, model: nn.Module, seed: int) -> Attack:
        device = next(model.parameters()).device
        calibrated = CalibratedLogits(model, self.log_prior.to(device), self.cfg.algorithm.calfat_tau)
        return build_attack("trades_kl", calibrated, self.cfg.attack, "train", self.num_classes, seed)

    def loss(
        self,
        adversarial_logits: torch.Tensor,
        labels: torch.Tensor,
        benign_logits: Optional[torch.Tensor],
        local_shared: Any = None,
        global_shared: Any = None,
    ) -> LossTerms:
        assert benign_logits is not None
        algo = self.cfg.algorithm
        return calfat_loss(
            adversarial_logits, benign_logits, labels, self.log_prior, algo.calfat_tau, algo.calfat_scale
        )
