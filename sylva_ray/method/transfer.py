"""Transfer attacks: adversarial images crafted on a *source* model, scored on another (the victim).

Sylva's premise is a public pre-trained model that every client fine-tunes and a global adapter
every participant receives, so an attacker needs no access to a victim's personalised model: they
can craft on the public model, on the global one, or on their own (docs explanation/threat-model.md).
Here only the source is differentiated; the victim scores the images (``evaluation.evaluate(transfer=...)``),
under ``torch.no_grad``.

The attacks are the registry's (``method.attacks``): PGD at the evaluation's strength, and MI-FGSM,
whose momentum was made for transfer (Dong et al. 2018).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from sylva_ray.base.config import AttackConfig
from sylva_ray.base.precision import fp32_evaluation
from sylva_ray.method.attacks import build_attack
from sylva_ray.method.data import ArrayDataset
from sylva_ray.method.evaluation import adversarial_images

#: Where the attacker crafts (``evaluation.transfer``).
TRANSFER_KINDS = ("public", "global", "peers")
#: Iterations of scikit-learn's L-BFGS for the public source's linear head: enough for the
#: features of a few thousand images to converge; a warning says when it is not.
LINEAR_HEAD_MAX_ITER = 1000
#: The bias of a class the head's fitting data never showed: the head never predicts it.
ABSENT_CLASS_BIAS = -1e4


def transfer_label(source: str, attack: str) -> str:
    """The key of one (source, attack) pair in ``EvalResult.transfer_acc``."""
    return f"{source}|{attack}"


def craft_transfer(
    source: nn.Module,
    attacks: Sequence[str],
    attack_cfg: AttackConfig,
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    batch_size: int,
    seed: int,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """Adversarial images for ``images`` crafted on ``source`` by each attack (by name), batch by
    batch with the white-box protocol's seeding: crafted on the victim itself with the victim's
    evaluation seed, PGD gives exactly the white-box PGD's images."""
    source.eval()
    with fp32_evaluation(device):
        return {
            name: adversarial_images(
                source,
                build_attack(name, source, attack_cfg, "eval", num_classes, seed),
                images,
                labels,
                batch_size,
                seed,
                device,
            )
            for name in attacks
        }


def classifier_inputs(
    model: nn.Module, head: nn.Module, images: torch.Tensor, batch_size: int, device: torch.device
) -> torch.Tensor:
    """What ``head`` receives when ``model`` sees ``images``: the frozen features a linear head is fit on."""
    captured: list[torch.Tensor] = []
    hook = head.register_forward_hook(lambda _module, inputs, _output: captured.append(inputs[0].detach().cpu()))
    try:
        with torch.no_grad():
            for start in range(0, len(images), batch_size):
                model(images[start : start + batch_size].to(device))
    finally:
        hook.remove()
    return torch.cat(captured) if captured else torch.zeros(0)


def fit_linear_head(
    model: nn.Module, head: nn.Linear, data: ArrayDataset, batch_size: int, device: torch.device
) -> dict[str, torch.Tensor]:
    """A linear head for frozen features: multinomial logistic regression (scikit-learn's L-BFGS,
    deterministic) on what ``head`` receives for ``data``; returns the head's ``weight`` and
    ``bias``. Classes ``data`` lacks get zero weights and ``ABSENT_CLASS_BIAS``."""
    from sklearn.linear_model import LogisticRegression

    model.eval()
    with fp32_evaluation(device):  # the head must not depend on the run's training precision
        features = classifier_inputs(model, head, data.pixels(), batch_size, device).double().numpy()
    labels = np.asarray(data.labels)
    weight = np.zeros((head.out_features, head.in_features))
    bias = np.full(head.out_features, ABSENT_CLASS_BIAS)
    classes = np.unique(labels)
    if len(classes) == 1:  # one class: the head predicts it
        bias[classes[0]] = 0.0
    else:
        fitted = LogisticRegression(max_iter=LINEAR_HEAD_MAX_ITER).fit(features, labels)
        if len(fitted.classes_) == 2:  # scikit-learn keeps one row: the log-odds of the second class
            weight[fitted.classes_[1]], bias[fitted.classes_[1]] = fitted.coef_[0], fitted.intercept_[0]
            bias[fitted.classes_[0]] = 0.0
        else:
            weight[fitted.classes_], bias[fitted.classes_] = fitted.coef_, fitted.intercept_
    dtype = head.weight.dtype
    return {"weight": torch.as_tensor(weight, dtype=dtype), "bias": torch.as_tensor(bias, dtype=dtype)}


def worst_transfer(accuracies: Mapping[str, float]) -> tuple[str, float]:
    """The (source, attack) label with the lowest accuracy, and that accuracy (ties: first label)."""
    label = min(accuracies, key=lambda k: (accuracies[k], k))
    return label, accuracies[label]
