"""THE local loop (adversarial and benign), used by every algorithm and both phases.

A client's round: make adversarial examples with the configured attack (model in eval mode, fp32,
seeded per batch), then one optimiser step on ``sylva_loss`` over the trainable tensors only.
Seeds come from ``(run seed, round, client, batch)``: a client's round is the same whichever actor
runs it and whenever it finishes. What a round reports is a ``RoundMetrics``; how a model is then
scored is ``method.evaluation``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator, Mapping, Optional, Protocol

import torch
from torch import nn

from sylva_ray.base.config import TrainConfig
from sylva_ray.base.precision import training_precision
from sylva_ray.base.seeding import derive_seed, torch_generator, torch_seeded
from sylva_ray.method.attacks import perturb
from sylva_ray.method.data import ArrayDataset
from sylva_ray.method.losses import LossTerms
from sylva_ray.method.models import Role, classifier_name, parameter_role

if TYPE_CHECKING:  # torchattacks is imported where an attack is built, not by every process
    from torchattacks.attack import Attack

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


def batches(
    data: ArrayDataset, batch_size: int, seed: int, shuffle: bool = True
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Mini-batches as float tensors in [0, 1] (converted per batch from the stored pixels); the
    shuffle order comes from an explicit generator."""
    labels = torch.from_numpy(data.labels)
    order = torch.randperm(len(labels), generator=torch_generator(seed)) if shuffle else torch.arange(len(labels))
    for start in range(0, len(labels), batch_size):
        idx = order[start : start + batch_size]
        yield data.pixels(idx.numpy()), labels[idx]


def make_optimizer(params: list[nn.Parameter], cfg: TrainConfig, lr: Optional[float] = None) -> torch.optim.Optimizer:
    lr = cfg.lr if lr is None else lr
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)


def clip_gradients(params: list[nn.Parameter], max_norm: Optional[float]) -> None:
    """``train.max_grad_norm``: one global-norm clip before the step (None leaves gradients alone)."""
    if max_norm is not None:
        torch.nn.utils.clip_grad_norm_(params, max_norm)


def shared_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Shared (LoRA) parameters keyed like peft's adapter state dict (adapter name removed)."""
    return {
        name.replace(f".{PEFT_ADAPTER}.", "."): param
        for name, param in model.named_parameters()
        if parameter_role(name) is Role.SHARED
    }


class LocalObjective(Protocol):
    """What an algorithm changes inside the one local loop: the inner attack and the outer loss.

    Built per client and round (``Algorithm.objective(data)``), so it may hold the client's class
    weights or prior. ``uses_anchor``: the loss wants the local shared tensors and the received
    global ones (a proximal term).
    """

    needs_benign: bool
    uses_anchor: bool

    def attack(self, model: nn.Module, seed: int) -> Attack: ...

    def loss(
        self,
        adversarial_logits: torch.Tensor,
        labels: torch.Tensor,
        benign_logits: Optional[torch.Tensor],
        local_shared: Optional[Mapping[str, torch.Tensor]],
        global_shared: Optional[Mapping[str, torch.Tensor]],
    ) -> LossTerms: ...


#: RoundMetrics fields that hold the means of a round's loss terms, in LossTerms' order.
TERM_NAMES = ("loss", "adversarial", "benign", "similarity", "proximal")


@dataclass
class LocalStep:
    """What one optimiser step of the local loop works with: built once a round."""

    model: nn.Module
    objective: LocalObjective
    attack: "Attack"
    optimizer: torch.optim.Optimizer
    trainable: list[nn.Parameter]
    train_cfg: TrainConfig
    precision: str
    device: torch.device
    local: Optional[Mapping[str, torch.Tensor]] = None  # the local shared tensors (proximal term)
    anchor: Optional[Mapping[str, torch.Tensor]] = None  # the received global ones


def local_step(
    ctx: LocalStep, images: torch.Tensor, labels: torch.Tensor, attack_seed: int, dropout_seed: int
) -> LossTerms:
    """One step of the local loop: attack the batch, the forward(s), the loss, backward, clip, step.

    The training loop and the simulated clock's FLOP count (``method.cost``) both call this, so the
    clock counts exactly the work a round does.
    """
    images, labels = images.to(ctx.device), labels.to(ctx.device)
    with training_precision(ctx.precision, ctx.device):
        adversarial = perturb(ctx.attack, images, labels, attack_seed)
        with torch_seeded(dropout_seed):
            adv_logits = ctx.model(adversarial)
            ben_logits = ctx.model(images) if ctx.objective.needs_benign else None
        terms = ctx.objective.loss(adv_logits, labels, ben_logits, ctx.local, ctx.anchor)
    ctx.optimizer.zero_grad(set_to_none=True)
    terms.total.backward()
    clip_gradients(ctx.trainable, ctx.train_cfg.max_grad_norm)
    ctx.optimizer.step()
    return terms


def adversarial_round(
    model: nn.Module,
    data: ArrayDataset,
    objective: LocalObjective,
    train_cfg: TrainConfig,
    seed: int,
    device: torch.device,
    global_shared: Optional[Mapping[str, torch.Tensor]] = None,
    precision: str = "fp32",
) -> RoundMetrics:
    """One client's local adversarial fine-tuning, in place, on the model's trainable tensors.

    ``global_shared`` is the adapter the client received this round (the proximal anchor).
    A fresh optimiser per round is the FedAvg convention: no optimiser state crosses rounds.
    ``precision`` (``runtime.precision``) applies to the forward passes, the attack's included;
    the backward pass runs outside autocast, as torch recommends.
    """
    start = time.perf_counter()
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("the model has no trainable parameters")
    optimizer = make_optimizer(trainable, train_cfg)
    attack = objective.attack(model, seed)
    use_prox = objective.uses_anchor and global_shared is not None
    anchor = {k: v.to(device) for k, v in global_shared.items()} if use_prox else None
    local = shared_parameters(model) if use_prox else None
    ctx = LocalStep(model, objective, attack, optimizer, trainable, train_cfg, precision, device, local, anchor)

    metrics = RoundMetrics()
    # Summed on the device and read once a round (float64 where the device has it, as numpy did before).
    sums = torch.zeros(len(TERM_NAMES), device=device, dtype=torch.float32 if device.type == "mps" else torch.float64)
    model.train()
    for epoch in range(train_cfg.local_epochs):
        for step, (images, labels) in enumerate(
            batches(data, train_cfg.batch_size, derive_seed(seed, "shuffle", epoch))
        ):
            if train_cfg.local_steps is not None and metrics.steps >= train_cfg.local_steps:
                break
            terms = local_step(
                ctx,
                images,
                labels,
                attack_seed=derive_seed(seed, "attack", epoch, step),
                dropout_seed=derive_seed(seed, "dropout", epoch, step),
            )
            metrics.steps += 1
            metrics.samples += len(labels)
            sums += torch.stack(
                [terms.total.detach(), terms.adversarial, terms.benign, terms.similarity, terms.proximal]
            ).to(sums.dtype)
    model.eval()
    if metrics.steps:
        for name, value in zip(TERM_NAMES, (sums / metrics.steps).tolist()):
            setattr(metrics, name, value)
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
    precision: str = "fp32",
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
                with (
                    training_precision(precision, device),
                    torch_seeded(derive_seed(seed, "dropout", epoch, metrics.steps)),
                ):
                    loss = nn.functional.cross_entropy(model(images), labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                clip_gradients(trainable, train_cfg.max_grad_norm)
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
    try:
        return name.startswith(classifier_name(model) + ".")
    except (AttributeError, ValueError):
        return False
