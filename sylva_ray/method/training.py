"""THE local loop (adversarial and benign) and evaluation, used by every algorithm and both phases.

A client's round: make adversarial examples with the configured attack (model in eval mode, fp32,
seeded per batch), then one optimiser step on ``sylva_loss`` over the trainable tensors only.
Seeds come from ``(run seed, round, client, batch)``: a client's round is the same whichever actor
runs it and whenever it finishes.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator, Mapping, Optional, Protocol

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from sylva_ray.base.config import AttackConfig, EvaluationConfig, TrainConfig
from sylva_ray.base.precision import fp32_evaluation, training_precision
from sylva_ray.base.seeding import derive_seed, torch_generator, torch_seeded
from sylva_ray.method.attacks import ReferenceAutoAttack, build_attack, perturb
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


@dataclass
class EvalResult:
    """Accuracies of one model on one test split. The protocol fields are None unless asked for.

    ``clean_on_robust``: clean accuracy on the attacked subset (robust <= clean is checked there);
    ``pgd_on_sanity``: the evaluation PGD's accuracy on the sanity subset, next to ``long_pgd_acc``
    and ``large_eps_acc`` on the same images; ``pgd_on_autoattack``: PGD on AutoAttack's subset.
    ``strongest_attack_acc`` (with AutoAttack only): on the images PGD and AutoAttack both attacked,
    the share that survived every attack run on them at the threat model's eps (PGD, AutoAttack, and
    on the first ``sanity_samples`` the long PGD; not the large-eps check, which is another radius):
    never above any one of them on those images. With transfer attacks (``evaluate(transfer=...)``)
    an image counts as robust only if it also survived every one of them, and the white-box-only
    figure is ``strongest_whitebox_acc``; ``transfer_acc``: each transfer attack's accuracy on the
    evaluation attack's subset (the same images as ``robust_acc``), by its label.
    """

    clean_acc: float
    robust_acc: float
    num_clean: int
    num_robust: int
    clean_on_robust: Optional[float] = None
    autoattack_acc: Optional[float] = None
    num_autoattack: Optional[int] = None
    autoattack_se: Optional[float] = None
    pgd_on_autoattack: Optional[float] = None
    long_pgd_acc: Optional[float] = None
    large_eps_acc: Optional[float] = None
    pgd_on_sanity: Optional[float] = None
    num_sanity: Optional[int] = None
    strongest_attack_acc: Optional[float] = None
    num_strongest: Optional[int] = None
    strongest_whitebox_acc: Optional[float] = None
    transfer_acc: Optional[dict[str, float]] = None
    clean_loss: Optional[float] = None  # mean cross-entropy on all of the split (the layer game's ce value)
    robust_loss: Optional[float] = None  # mean cross-entropy under the evaluation attack, on its subset

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        """The scalar figures (``transfer_acc`` is a table of its own: ``engine.transfer``)."""
        return {f"{prefix}{k}": v for k, v in self.__dict__.items() if v is not None and not isinstance(v, dict)}


#: ``EvalResult`` fields only the final-model protocol fills (a plain evaluation leaves them None).
PROTOCOL_FIELDS = frozenset(
    {
        "autoattack_acc",
        "num_autoattack",
        "autoattack_se",
        "pgd_on_autoattack",
        "long_pgd_acc",
        "large_eps_acc",
        "pgd_on_sanity",
        "num_sanity",
        "strongest_attack_acc",
        "num_strongest",
        "strongest_whitebox_acc",
    }
)


def is_protocol_figure(name: str) -> bool:
    """A per-client figure only the final protocol produces: its own fields and the transfer
    attacks' (``transfer_*``, ``num_transfer``)."""
    return name in PROTOCOL_FIELDS or name.startswith("transfer_") or name == "num_transfer"


def _correct(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sample correctness of ``logits`` (empty for no samples)."""
    return logits.argmax(1) == labels if len(labels) else torch.zeros(0, dtype=torch.bool)


def adversarial_images(
    model: nn.Module,
    attack: Attack,
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int,
    seed: int,
    device: torch.device,
) -> torch.Tensor:
    """Adversarial images (on the CPU) crafted on ``model``, batch by batch, each seeded by its index:
    the white-box attacks score them on the same model, the transfer attacks on another one."""
    out = []
    for index, start in enumerate(range(0, len(labels), batch_size)):
        x, y = images[start : start + batch_size].to(device), labels[start : start + batch_size].to(device)
        out.append(perturb(attack, x, y, derive_seed(seed, "eval-attack", index)).cpu())
    return torch.cat(out) if out else images[:0].clone()


def logits_of(model: nn.Module, images: torch.Tensor, batch_size: int, device: torch.device) -> torch.Tensor:
    """The model's logits (on the CPU) without gradients: scoring never differentiates the model."""
    with torch.no_grad():
        out = [model(images[i : i + batch_size].to(device)).float().cpu() for i in range(0, len(images), batch_size)]
    return torch.cat(out) if out else torch.zeros(0)


def _attacked_logits(
    model: nn.Module,
    attack: Attack,
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int,
    seed: int,
    device: torch.device,
) -> torch.Tensor:
    """The model's logits on the adversarial images crafted on itself (a white-box attack)."""
    adversarial = adversarial_images(model, attack, images, labels, batch_size, seed, device)
    return logits_of(model, adversarial, batch_size, device)


def attacked_subset_size(samples: int, attack_cfg: AttackConfig) -> int:
    """How many of a split's first images the evaluation attack (and every transfer attack) sees."""
    return samples if attack_cfg.eval_max_samples is None else min(samples, attack_cfg.eval_max_samples)


def _mean_ce(logits: torch.Tensor, labels: torch.Tensor) -> Optional[float]:
    return float(F.cross_entropy(logits, labels)) if len(labels) else None


def protocol_stages(attack_cfg: AttackConfig, protocol: Optional[EvaluationConfig]) -> list[str]:
    """The attack stages an evaluation runs, by the names its ``on_stage`` reports (progress bars,
    log lines): the evaluation attack, then, for final models, AutoAttack and the sanity attacks."""
    stages = [f"{attack_cfg.eval_attack.upper()}-{attack_cfg.eval_steps}"]
    if protocol is not None and protocol.autoattack:
        stages.append(AUTOATTACK_STAGE)
    if protocol is not None and protocol.sanity_checks:
        stages.append(SANITY_STAGE)
    if protocol is not None and protocol.transfer:
        stages.insert(0, TRANSFER_STAGE)  # crafted on the sources before the victim is scored
    return stages


#: Stage names of the final protocol (``protocol_stages``).
AUTOATTACK_STAGE, SANITY_STAGE, TRANSFER_STAGE = "AutoAttack", "sanity attacks", "transfer attacks"


def evaluate(
    model: nn.Module,
    data: ArrayDataset,
    attack_cfg: AttackConfig,
    batch_size: int,
    seed: int,
    device: torch.device,
    protocol: Optional[EvaluationConfig] = None,
    on_stage: Optional[Callable[[str], None]] = None,
    transfer: Optional[Mapping[str, torch.Tensor]] = None,
) -> EvalResult:
    """Clean accuracy on all of ``data``; robust accuracy under the evaluation attack.

    The robust subset is the first ``attack.eval_max_samples`` samples (a fixed subset: every
    model of a client is attacked on the same images). Attacks run with gradients on, in eval mode.
    With ``protocol`` (final models): AutoAttack on the first ``autoattack_max_samples`` and the
    gradient-masking attacks (long PGD, PGD at a large eps) on the first ``sanity_samples``.
    Always in full fp32 (``precision.fp32_evaluation``): a lower-precision attack overstates robustness.
    ``on_stage(name)`` is called as each attack stage starts (a progress bar's "attack in progress").
    ``transfer``: adversarial images crafted on other models (``method.transfer``) for the
    evaluation attack's subset, by label; this model only scores them, without gradients.
    """
    with fp32_evaluation(device):
        return _evaluate(
            model, data, attack_cfg, batch_size, seed, device, protocol, on_stage or (lambda _: None), transfer or {}
        )


def _evaluate(
    model: nn.Module,
    data: ArrayDataset,
    attack_cfg: AttackConfig,
    batch_size: int,
    seed: int,
    device: torch.device,
    protocol: Optional[EvaluationConfig],
    on_stage: Callable[[str], None],
    transfer: Mapping[str, torch.Tensor],
) -> EvalResult:
    model.eval()
    on_stage(protocol_stages(attack_cfg, None)[0])
    images, labels = data.pixels(), torch.from_numpy(data.labels)  # one client's test split, as floats
    logits = logits_of(model, images, batch_size, device)
    clean = _correct(logits, labels)
    limit = attacked_subset_size(len(data), attack_cfg)
    attack = build_attack(attack_cfg.eval_attack, model, attack_cfg, "eval", data.num_classes, seed)
    adversarial_logits = _attacked_logits(model, attack, images[:limit], labels[:limit], batch_size, seed, device)
    robust = _correct(adversarial_logits, labels[:limit])
    result = EvalResult(
        _rate(clean),
        _rate(robust),
        len(data),
        limit,
        clean_on_robust=_rate(clean[:limit]),
        clean_loss=_mean_ce(logits, labels),
        robust_loss=_mean_ce(adversarial_logits, labels[:limit]),
    )
    if protocol is None or not len(labels):
        return result
    survived = robust.clone()  # per image: robust to every attack at eps run on it so far
    if protocol.autoattack:
        on_stage(AUTOATTACK_STAGE)
        n = min(len(labels), protocol.autoattack_max_samples)
        hits = reference_autoattack_hits(
            model, attack_cfg, images[:n], labels[:n], data.num_classes, derive_seed(seed, "autoattack"), batch_size
        )
        result.autoattack_acc, result.num_autoattack = _rate(hits), n
        result.autoattack_se = binomial_se(result.autoattack_acc, n)
        result.pgd_on_autoattack = _rate(robust[:n]) if n <= limit else None
        survived = _combine(survived, hits)[:n]  # the images PGD and AutoAttack both attacked
    if protocol.sanity_checks:
        on_stage(SANITY_STAGE)
        n = min(len(labels), protocol.sanity_samples)
        long_cfg = dataclasses.replace(attack_cfg, eval_steps=protocol.sanity_long_steps)
        long_pgd = build_attack("pgd", model, long_cfg, "eval", data.num_classes, seed)
        large_cfg = dataclasses.replace(attack_cfg, eps=protocol.sanity_large_eps, eval_step_size=None)
        large = build_attack("pgd", model, large_cfg, "eval", data.num_classes, seed)
        long_hits = _correct(
            _attacked_logits(model, long_pgd, images[:n], labels[:n], batch_size, seed, device), labels[:n]
        )
        result.long_pgd_acc = _rate(long_hits)
        survived = _combine(survived, long_hits)
        result.large_eps_acc = _rate(
            _correct(_attacked_logits(model, large, images[:n], labels[:n], batch_size, seed, device), labels[:n])
        )
        result.pgd_on_sanity = _rate(robust[:n]) if n <= limit else None
        result.num_sanity = n
    if transfer:
        result.transfer_acc = {}
        whitebox, survived = survived, survived.clone()
        for label, adversarial in transfer.items():
            if len(adversarial) != limit:
                raise ValueError(f"transfer attack {label!r}: {len(adversarial)} images for a subset of {limit}")
            hits = _correct(logits_of(model, adversarial, batch_size, device), labels[:limit])
            result.transfer_acc[label] = _rate(hits)
            survived = _combine(survived, hits)
        result.strongest_whitebox_acc = _rate(whitebox)
        result.strongest_attack_acc, result.num_strongest = _rate(survived), len(survived)
    elif protocol.autoattack:  # without AutoAttack (or transfer) the figure would only restate PGD's
        result.strongest_attack_acc, result.num_strongest = _rate(survived), len(survived)
        result.strongest_whitebox_acc = result.strongest_attack_acc
    return result


def _combine(survived: torch.Tensor, hits: torch.Tensor) -> torch.Tensor:
    """AND of per-image survival over the images both attacks saw; images only one saw keep its verdict."""
    out = survived.clone()
    common = min(len(out), len(hits))
    out[:common] &= hits[:common]
    return out


def reference_autoattack_hits(
    model: nn.Module,
    attack_cfg: AttackConfig,
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    seed: int,
    batch_size: int,
) -> torch.Tensor:
    """Per-image correctness under the reference AutoAttack, run once over the subset (as its authors
    run it: each attack on the images the previous ones failed on, ``batch_size`` at a time). The
    reference re-seeds torch's generators itself; ``torch_seeded`` keeps that from leaking out."""
    return autoattack_hits(
        build_attack("autoattack", model, attack_cfg, "eval", num_classes, seed), images, labels, seed, batch_size
    )


def autoattack_hits(
    auto: ReferenceAutoAttack, images: torch.Tensor, labels: torch.Tensor, seed: int, batch_size: int
) -> torch.Tensor:
    """Per-image correctness under an already built reference AutoAttack (``bench autoattack``
    records the passes of the one it builds), seeded and with gradients on as the protocol runs it."""
    if not len(labels):
        return torch.zeros(0, dtype=torch.bool)
    with torch_seeded(seed), torch.enable_grad():
        _, predicted = auto.run(images, labels, batch_size=batch_size)
    return (predicted.cpu() == labels.cpu()).cpu()


def binomial_se(rate: float, samples: float) -> float:
    """Standard error of an accuracy measured on ``samples`` images: sqrt(p (1 - p) / n)."""
    return float(np.sqrt(rate * (1 - rate) / samples)) if samples > 0 else float("nan")


def _rate(hits: torch.Tensor) -> float:
    return int(hits.sum()) / len(hits) if len(hits) else 0.0  # exact counts, as a user would compute them
