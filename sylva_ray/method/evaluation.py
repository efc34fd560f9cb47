"""The evaluation protocol: clean and robust accuracy of one model on one test split.

Every evaluation: clean accuracy on the whole split, robust accuracy under the evaluation attack on
a fixed subset of its first images (``attacked_subset_size``). Final models add the protocol
(``EvaluationConfig``): the reference AutoAttack, the gradient-masking sanity attacks (long PGD,
PGD at a large eps) and the transfer attacks' images crafted on other models (``method.transfer``),
which this model only scores. An attack runs in full fp32, with gradients on, in eval mode, seeded
per batch; ``protocol_stages`` names the stages as they start.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Mapping, Optional

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from sylva_ray.base.config import AttackConfig, EvaluationConfig
from sylva_ray.base.precision import fp32_evaluation
from sylva_ray.base.seeding import derive_seed, torch_seeded
from sylva_ray.method.attacks import ReferenceAutoAttack, build_attack, perturb
from sylva_ray.method.data import ArrayDataset

if TYPE_CHECKING:  # torchattacks is imported where an attack is built, not by every process
    from torchattacks.attack import Attack


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
