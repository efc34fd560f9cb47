"""Attacks by name (torchattacks; the reference AutoAttack), in [0, 1] pixel space, seeded, fp32, eval mode.

Registry entries build a ready attack from ``(model, AttackConfig, role, num_classes, seed)``;
``role`` is ``"train"`` or ``"eval"`` because the two use different step counts.

``autoattack`` is Croce and Hein's own implementation (``pyautoattack``, the AutoAttack authors'
code): APGD-CE, APGD-T, FAB-T and Square as in ``version="standard"``, with our seed. An independent
check found torchattacks' composed ensemble of the same four attacks finds fewer adversarial images
than the reference (3.7 points over-claimed on one client), so the reference is what we report
(docs explanation/evaluation.md "Evaluation protocol").
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Callable, Literal

from sylva_ray.base.config import AttackConfig
from sylva_ray.base.registry import Registry
from sylva_ray.base.seeding import torch_seeded

if TYPE_CHECKING:  # torch and torchattacks load where an attack is built: checking a config needs neither
    import torch
    from torch import nn
    from torchattacks.attack import Attack

Role = Literal["train", "eval"]
AttackFactory = Callable[["nn.Module", AttackConfig, Role, int, int], "Attack"]
ATTACKS: Registry[AttackFactory] = Registry("attack")
log = logging.getLogger(__name__)


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


#: MI-FGSM's momentum decay: Dong et al. (CVPR 2018, "Boosting Adversarial Attacks with Momentum")
#: found mu = 1.0 best for transfer to other models, and it is torchattacks' default.
MI_FGSM_DECAY = 1.0


@ATTACKS.register("mifgsm")
def build_mifgsm(model: nn.Module, cfg: AttackConfig, role: Role, num_classes: int, seed: int) -> Attack:
    """Momentum iterative FGSM (Dong et al. 2018), an attack made to transfer: ``steps`` iterations of
    step eps / steps from the clean image, as in its paper, so the last step can reach the ball's edge."""
    import torchattacks

    steps, _ = _steps(cfg, role)
    return torchattacks.MIFGSM(model, eps=cfg.eps, alpha=cfg.eps / steps, steps=steps, decay=MI_FGSM_DECAY)


#: The reference AutoAttack's "standard" strength; other values make it a lighter, custom run.
REFERENCE_ITERATIONS, REFERENCE_SQUARE_QUERIES, REFERENCE_TARGETS = 100, 5000, 9


class ReferenceAutoAttack:
    """The reference AutoAttack (``pyautoattack``) behind torchattacks' call: ``attack(images, labels)``.

    ``version="standard"``: APGD-CE (1 restart), APGD-T (9 target classes), FAB-T (9 targets),
    Square (5000 queries), each run only on the images the previous ones failed on. The iteration
    and query counts come from ``attack.autoattack_steps`` / ``autoattack_square_queries`` (the
    reference values by default; fewer make a quick, weaker run, as in the ``smoke`` preset); the
    target count is capped at ``num_classes - 1``. The model runs in eval mode, fp32, on [0, 1]
    inputs (normalisation is inside it); the seed is passed to every sub-attack.
    """

    def __init__(self, model: nn.Module, cfg: AttackConfig, num_classes: int, seed: int) -> None:
        from pyautoattack import AutoAttack

        logging.getLogger("auto-attack").setLevel(logging.WARNING)  # its per-attack progress is debug chatter
        self.model = model
        device = next(model.parameters()).device
        self.runner = AutoAttack(model, norm="Linf", eps=cfg.eps, seed=seed, version="standard", device=device)
        targets = max(1, min(REFERENCE_TARGETS, num_classes - 1))
        self.runner.apgd_targeted.n_target_classes = targets
        self.runner.fab.n_target_classes = targets
        self.reference_strength = (
            cfg.autoattack_steps == REFERENCE_ITERATIONS and cfg.autoattack_square_queries == REFERENCE_SQUARE_QUERIES
        )
        if not self.reference_strength:
            for apgd in (self.runner.apgd, self.runner.apgd_targeted):
                _set_apgd_iterations(apgd, cfg.autoattack_steps)
            self.runner.fab.n_iter = cfg.autoattack_steps
            self.runner.square.n_queries = cfg.autoattack_square_queries
            log.warning(
                "AutoAttack below reference strength (attack.autoattack_steps=%d, autoattack_square_queries=%d; "
                "reference 100 / 5000): its figures are upper bounds of the reference's; say so where you report them",
                cfg.autoattack_steps,
                cfg.autoattack_square_queries,
            )

    def run(
        self, images: torch.Tensor, labels: torch.Tensor, batch_size: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(adversarial images, the model's predictions on them), as the reference returns them;
        ``images`` may stay on the CPU (each batch is moved to the model's device)."""
        was_training = self.model.training
        self.model.eval()
        try:
            return self.runner.run_standard_evaluation(images, labels, batch_size=batch_size or len(labels))
        finally:
            self.model.train(was_training)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """torchattacks' calling convention (``attack.eval_attack=autoattack``): the adversarial images."""
        return self.run(images, labels)[0]


def _set_apgd_iterations(apgd: object, iterations: int) -> None:
    """APGD's iteration count and the step-size checkpoints its ``__init__`` derives from it
    (pyautoattack's autopgd_base: 22% / 6% / 3% of the iterations): setting ``n_iter`` alone after
    construction would keep a 100-iteration schedule that a shorter run never reaches."""
    apgd.n_iter = apgd.n_iter_orig = iterations  # type: ignore[attr-defined]
    apgd.n_iter_2 = max(int(0.22 * iterations), 1)  # type: ignore[attr-defined]
    apgd.n_iter_min = max(int(0.06 * iterations), 1)  # type: ignore[attr-defined]
    apgd.size_decr = max(int(0.03 * iterations), 1)  # type: ignore[attr-defined]


@ATTACKS.register("autoattack")
def build_autoattack(
    model: nn.Module, cfg: AttackConfig, role: Role, num_classes: int, seed: int
) -> ReferenceAutoAttack:
    """AutoAttack by its authors' code (``ReferenceAutoAttack``)."""
    return ReferenceAutoAttack(model, cfg, num_classes, seed)


def build_attack(name: str, model: nn.Module, cfg: AttackConfig, role: Role, num_classes: int, seed: int) -> Attack:
    return ATTACKS.get(name)(model, cfg, role, num_classes, seed)


def perturb(attack: Attack, images: torch.Tensor, labels: torch.Tensor, seed: int) -> torch.Tensor:
    """Adversarial images for a batch, reproducible from ``seed``, detached from the graph.

    torchattacks switches the model to eval mode for the attack and restores the previous mode.
    Attacks run in fp32 with gradients enabled, even if the caller is inside ``torch.no_grad()``.
    """
    import torch

    if images.dtype != torch.float32:
        raise TypeError(f"attacks run in fp32; got {images.dtype}")
    with torch_seeded(seed), torch.enable_grad():
        adversarial = attack(images, labels)
    return adversarial.detach()
