"""torchattacks by name, in [0, 1] pixel space, seeded, fp32, model in eval mode.

Registry entries build a ready attack from ``(model, AttackConfig, role, num_classes, seed)``;
``role`` is ``"train"`` or ``"eval"`` because the two use different step counts.

Why ``autoattack`` is composed here: torchattacks' own ``AutoAttack(version='standard')`` leaves
APGD, APGD-T and FAB at ``steps=10``; the reference AutoAttack (Croce & Hein 2020) runs 100 and
Square with 5000 queries (README 'Pitfalls the code guards against', 1). The default seed of torchattacks' composite is
the clock; ours is derived from the run seed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Literal

import torch
from torch import nn

from sylva_ray.base.config import AttackConfig
from sylva_ray.base.registry import Registry
from sylva_ray.base.seeding import torch_seeded

if TYPE_CHECKING:  # torchattacks is imported where an attack is built, not by every process
    from torchattacks.attack import Attack

Role = Literal["train", "eval"]
AttackFactory = Callable[[nn.Module, AttackConfig, Role, int, int], "Attack"]
ATTACKS: Registry[AttackFactory] = Registry("attack")


def _steps(cfg: AttackConfig, role: Role) -> tuple[int, float]:
    return (cfg.train_steps, cfg.train_step()) if role == "train" else (cfg.eval_steps, cfg.eval_step())


@ATTACKS.register("pgd")
def build_pgd(model: nn.Module, cfg: AttackConfig, role: Role, num_classes: int, seed: int) -> Attack:
    """L-inf PGD (Madry et al. 2018) on the cross-entropy, random start inside the ball."""
    import torchattacks

    steps, step = _steps(cfg, role)
    return torchattacks.PGD(model, eps=cfg.eps, alpha=step, steps=steps, random_start=cfg.random_start)


@ATTACKS.register("trades_kl")
def build_trades_kl(model: nn.Module, cfg: AttackConfig, role: Role, num_classes: int, seed: int) -> Attack:
    """TRADES' inner maximisation (KL to the benign prediction); torchattacks' TPGD."""
    import torchattacks

    steps, step = _steps(cfg, role)
    return torchattacks.TPGD(model, eps=cfg.eps, alpha=step, steps=steps)


@ATTACKS.register("autoattack")
def build_autoattack(model: nn.Module, cfg: AttackConfig, role: Role, num_classes: int, seed: int) -> Attack:
    """AutoAttack at reference strength: APGD-CE, APGD-T, FAB-T (multi-targeted), Square.

    ``MultiAttack`` runs each sub-attack only on the samples the previous ones failed on, as the
    reference implementation does; every sub-attack gets the same explicit seed.
    """
    import torchattacks

    steps, queries = cfg.autoattack_steps, cfg.autoattack_square_queries
    # torchattacks' APGD-T and FAB-T target the top (n_classes - 1) other classes.
    return torchattacks.MultiAttack(
        [
            torchattacks.APGD(model, norm="Linf", eps=cfg.eps, steps=steps, loss="ce", seed=seed),
            torchattacks.APGDT(model, norm="Linf", eps=cfg.eps, steps=steps, n_classes=num_classes, seed=seed),
            torchattacks.FAB(
                model, norm="Linf", eps=cfg.eps, steps=steps, multi_targeted=True, n_classes=num_classes, seed=seed
            ),
            torchattacks.Square(model, norm="Linf", eps=cfg.eps, n_queries=queries, seed=seed),
        ]
    )


def build_attack(name: str, model: nn.Module, cfg: AttackConfig, role: Role, num_classes: int, seed: int) -> Attack:
    return ATTACKS.get(name)(model, cfg, role, num_classes, seed)


def perturb(attack: Attack, images: torch.Tensor, labels: torch.Tensor, seed: int) -> torch.Tensor:
    """Adversarial images for a batch, reproducible from ``seed``, detached from the graph.

    torchattacks switches the model to eval mode for the attack and restores the previous mode.
    Attacks run in fp32 with gradients enabled, even if the caller is inside ``torch.no_grad()``.
    """
    if images.dtype != torch.float32:
        raise TypeError(f"attacks run in fp32; got {images.dtype}")
    with torch_seeded(seed), torch.enable_grad():
        adversarial = attack(images, labels)
    return adversarial.detach()
