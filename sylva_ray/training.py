"""THE local loop (adversarial and benign) and evaluation, used by every algorithm and both phases.

A client's round: make adversarial examples with the configured attack (model in eval mode, fp32,
seeded per batch), then one optimiser step on ``sylva_loss`` over the trainable tensors only.
Seeds come from ``(run seed, round, client, batch)``: a client's round is the same whichever actor
runs it and whenever it finishes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator, Mapping, Optional

import numpy as np
import torch
from torch import nn

from sylva_ray.attacks import build_attack, perturb
from sylva_ray.config import AttackConfig, LossConfig, TrainConfig
from sylva_ray.data import ArrayDataset
from sylva_ray.losses import class_weights, sylva_loss
from sylva_ray.models import Role, parameter_role
from sylva_ray.seeding import derive_seed, torch_generator, torch_seeded

#: Adapter name peft gives the one adapter we create; parameter names carry it, state-dict keys do not.
PEFT_ADAPTER = "default"


@dataclass
class RoundMetrics:
    """What one local round reports (means over optimiser steps)."""

    steps: int = 0
    samples: int = 0
    loss: float = 0.0
    adversarial: float = 0.0
    benign: float = 0.0
    similarity: float = 0.0
    proximal: float = 0.0
    seconds: float = 0.0
    extras: dict[str, float] = field(default_factory=dict)

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        values = {k: v for k, v in self.__dict__.items() if k != "extras"} | self.extras
        return {f"{prefix}{k}": v for k, v in values.items()}


def batches(data: ArrayDataset, batch_size: int, seed: int, shuffle: bool = True) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Mini-batches as tensors; the shuffle order comes from an explicit generator."""
    images, labels = torch.from_numpy(data.images), torch.from_numpy(data.labels)
    order = torch.randperm(len(labels), generator=torch_generator(seed)) if shuffle else torch.arange(len(labels))
    for start in range(0, len(labels), batch_size):
        idx = order[start:start + batch_size]
        yield images[idx], labels[idx]


def make_optimizer(params: list[nn.Parameter], cfg: TrainConfig, lr: Optional[float] = None) -> torch.optim.Optimizer:
    lr = cfg.lr if lr is None else lr
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)


def shared_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Shared (LoRA) parameters keyed like peft's adapter state dict (adapter name removed)."""
    return {
        name.replace(f".{PEFT_ADAPTER}.", "."): param
        for name, param in model.named_parameters()
        if parameter_role(name) is Role.SHARED
    }


def adversarial_round(
    model: nn.Module,
    data: ArrayDataset,
    loss_cfg: LossConfig,
    train_cfg: TrainConfig,
    attack_cfg: AttackConfig,
    seed: int,
    device: torch.device,
    global_shared: Optional[Mapping[str, torch.Tensor]] = None,
) -> RoundMetrics:
    """One client's local adversarial fine-tuning, in place, on the model's trainable tensors.

    ``global_shared`` is the adapter the client received this round (the proximal anchor).
    A fresh optimiser per round is the FedAvg convention: no optimiser state crosses rounds.
    """
    start = time.perf_counter()
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("the model has no trainable parameters")
    optimizer = make_optimizer(trainable, train_cfg)
    weights = class_weights(data.class_counts(), loss_cfg.class_weighting, loss_cfg.class_weight_beta, loss_cfg.class_weight_max_ratio)
    attack = build_attack(attack_cfg.train_attack, model, attack_cfg, "train", data.num_classes, seed)
    needs_benign = loss_cfg.benign_weight > 0 or loss_cfg.similarity_weight > 0
    use_prox = loss_cfg.proximal_mu > 0 and global_shared is not None
    anchor = {k: v.to(device) for k, v in global_shared.items()} if use_prox else None
    local = shared_parameters(model) if use_prox else None

    metrics = RoundMetrics()
    sums = np.zeros(5)
    model.train()
    for epoch in range(train_cfg.local_epochs):
        for step, (images, labels) in enumerate(batches(data, train_cfg.batch_size, derive_seed(seed, "shuffle", epoch))):
            if train_cfg.local_steps is not None and metrics.steps >= train_cfg.local_steps:
                break
            images, labels = images.to(device), labels.to(device)
            adversarial = perturb(attack, images, labels, derive_seed(seed, "attack", epoch, step))
            with torch_seeded(derive_seed(seed, "dropout", epoch, step)):
                adv_logits = model(adversarial)
                ben_logits = model(images) if needs_benign else None
            terms = sylva_loss(loss_cfg, adv_logits, labels, ben_logits, weights, local, anchor)
            optimizer.zero_grad(set_to_none=True)
            terms.total.backward()
            optimizer.step()
            metrics.steps += 1
            metrics.samples += len(labels)
            sums += [float(terms.total.detach()), terms.adversarial, terms.benign, terms.similarity, terms.proximal]
    model.eval()
    if metrics.steps:
        metrics.loss, metrics.adversarial, metrics.benign, metrics.similarity, metrics.proximal = (sums / metrics.steps).tolist()
    metrics.seconds = time.perf_counter() - start
    return metrics


def benign_finetune(
    model: nn.Module,
    data: ArrayDataset,
    trainable_prefixes: list[str],
    train_cfg: TrainConfig,
    lr: float,
    steps: int,
    seed: int,
    device: torch.device,
) -> RoundMetrics:
    """Fine-tune only the parameters under ``trainable_prefixes`` plus the head, on benign data.

    Phase 2 uses this with the layers its game selected. The head is always trainable. Other
    parameters are frozen for the duration and their ``requires_grad`` flags restored afterwards.
    An empty prefix list trains the head alone.
    """
    start = time.perf_counter()
    saved_flags = {name: p.requires_grad for name, p in model.named_parameters()}
    head_names = {n for n in saved_flags if parameter_role(n) is Role.PERSONAL or _is_plain_head(model, n)}
    unknown = [p for p in trainable_prefixes if not any(n.startswith(p) for n in saved_flags)]
    if unknown:
        raise KeyError(f"no parameters under {unknown}")
    try:
        for name, param in model.named_parameters():
            param.requires_grad_(name in head_names or any(name.startswith(p) for p in trainable_prefixes))
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = make_optimizer(trainable, train_cfg, lr=lr)
        metrics = RoundMetrics()
        total = 0.0
        model.train()
        epoch = 0
        while metrics.steps < steps:
            for images, labels in batches(data, train_cfg.batch_size, derive_seed(seed, "benign", epoch)):
                if metrics.steps >= steps:
                    break
                images, labels = images.to(device), labels.to(device)
                with torch_seeded(derive_seed(seed, "dropout", epoch, metrics.steps)):
                    loss = nn.functional.cross_entropy(model(images), labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                metrics.steps += 1
                metrics.samples += len(labels)
                total += float(loss.detach())
            epoch += 1
        metrics.loss = total / max(metrics.steps, 1)
        metrics.benign = metrics.loss
    finally:
        for name, param in model.named_parameters():
            param.requires_grad_(saved_flags[name])
        model.eval()
    metrics.seconds = time.perf_counter() - start
    return metrics


def _is_plain_head(model: nn.Module, name: str) -> bool:
    """For a merged (non-peft) model the head is the timm classifier."""
    from sylva_ray.models import classifier_name

    try:
        return name.startswith(classifier_name(model) + ".")
    except (AttributeError, ValueError):
        return False


@dataclass
class EvalResult:
    clean_acc: float
    robust_acc: float
    num_clean: int
    num_robust: int

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        return {f"{prefix}{k}": v for k, v in self.__dict__.items()}


def evaluate(
    model: nn.Module,
    data: ArrayDataset,
    attack_cfg: AttackConfig,
    batch_size: int,
    seed: int,
    device: torch.device,
    attack_name: Optional[str] = None,
) -> EvalResult:
    """Clean accuracy on all of ``data``; robust accuracy under the evaluation attack.

    The robust subset is the first ``attack.eval_max_samples`` samples (a fixed subset: every
    model of a client is attacked on the same images). Attacks run with gradients on, in eval mode.
    """
    model.eval()
    attack = build_attack(attack_name or attack_cfg.eval_attack, model, attack_cfg, "eval", data.num_classes, seed)
    limit = len(data) if attack_cfg.eval_max_samples is None else min(len(data), attack_cfg.eval_max_samples)
    clean_hits = robust_hits = 0
    seen = 0
    for index, (images, labels) in enumerate(batches(data, batch_size, seed, shuffle=False)):
        images, labels = images.to(device), labels.to(device)
        with torch.no_grad():
            clean_hits += int((model(images).argmax(1) == labels).sum())
        take = max(0, min(len(labels), limit - seen))
        if take:
            adversarial = perturb(attack, images[:take], labels[:take], derive_seed(seed, "eval-attack", index))
            with torch.no_grad():
                robust_hits += int((model(adversarial).argmax(1) == labels[:take]).sum())
        seen += len(labels)
    return EvalResult(clean_hits / max(len(data), 1), robust_hits / max(limit, 1), len(data), limit)
