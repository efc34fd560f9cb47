"""Sylva and the baselines it is judged against: small classes over one engine, selected by name.

An algorithm decides only what differs between methods:

    scope               what is trained and uploaded: ``lora`` (LoRA shared, head personal),
                        ``full`` (the whole model shared; the aggregate is a global model) or
                        ``local`` (nothing shared: every client trains alone)
    implied_settings    the config fields it fixes (aggregation, loss weights, attack, Phase 2);
                        applied when the config is built, so the run's config.yaml shows them
    objective(data)     the inner attack and the outer loss of the one local loop
                        (``method.objectives``, loaded where a client trains)

Everything else -- partition, pre-trained weights, seeds, optimiser, rounds, evaluation -- is the
shared configuration, so a comparison differs only where the methods do.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from sylva_ray.base.config import AlgorithmConfig, ExperimentConfig
from sylva_ray.base.registry import Registry
from sylva_ray.method.scopes import SCOPES, ModelScope

if TYPE_CHECKING:  # the objectives load where a client trains: choosing an algorithm needs no torch
    from sylva_ray.method.data import ArrayDataset
    from sylva_ray.method.objectives import Objective

ALGORITHMS: Registry[type["Algorithm"]] = Registry("algorithm")

#: Plain PGD adversarial training (Madry et al. 2018) in the one loop's loss weights.
PGD_AT: dict[str, Any] = {
    "loss.adversarial_weight": 1.0,
    "loss.benign_weight": 0.0,
    "loss.similarity_weight": 0.0,
    "loss.proximal_mu": 0.0,
    "loss.class_weighting": "none",
    "attack.train_attack": "pgd",
}


def full_model_settings(algo: AlgorithmConfig) -> dict[str, Any]:
    """Full-model fine-tuning takes a smaller, clipped step than LoRA (``algorithm.full_model_lr``,
    ``full_model_max_grad_norm``): every weight of a pre-trained model moves, and a KL term against
    its non-robust predictions starts with gradient norms near 100."""
    return {"train.lr": algo.full_model_lr, "train.max_grad_norm": algo.full_model_max_grad_norm}


#: Baselines aggregate by sample-weighted FedAvg and have no Phase 2.
FEDAVG_NO_PHASE2: dict[str, Any] = {"federation.aggregation": "fedavg", "layer_selection.enabled": False}


# --- the interface ---------------------------------------------------------------------------------
class Algorithm:
    """The base is Sylva's engine defaults; a subclass overrides only what makes it another method."""

    name: ClassVar[str] = ""
    scope_name: ClassVar[str] = "lora"
    accepted_ablations: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, cfg: ExperimentConfig) -> None:
        self.cfg = cfg

    @classmethod
    def implied_settings(cls, algo: AlgorithmConfig) -> dict[str, Any]:
        """Config fields this algorithm fixes, as ``{"dotted.field": value}``."""
        return {}

    @property
    def scope(self) -> ModelScope:
        return SCOPES.get(self.scope_name)

    def objective(self, data: ArrayDataset) -> Objective:
        from sylva_ray.method.objectives import SylvaObjective

        return SylvaObjective(self.cfg, data)


def registered(cls: type[Algorithm]) -> type[Algorithm]:
    """Class decorator: register an algorithm under its own ``name`` (stated once, on the class)."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a class attribute name = '...' to be registered")
    if cls.scope_name not in SCOPES:
        raise ValueError(f"{cls.__name__}.scope_name = {cls.scope_name!r}: {SCOPES.choices()}")
    return ALGORITHMS.register(cls.name)(cls)


def algorithm_for(cfg: ExperimentConfig) -> Algorithm:
    return ALGORITHMS.get(cfg.algorithm.name)(cfg)


def parse_algorithm(spec: str) -> tuple[str, list[str]]:
    """``"sylva-no_phase2-fedavg"`` -> ``("sylva", ["no_phase2", "fedavg"])`` (the compare syntax)."""
    name, *ablations = [part for part in spec.strip().split("-")]
    return name, ablations


@registered
class Sylva(Algorithm):
    """Sylva: LoRA + class-balanced adversarial loss, similarity and proximal terms, ball-tree
    aggregation, Phase 2. The ablations switch one part off each; the rest is the config as given."""

    name = "sylva"
    ABLATION_SETTINGS: ClassVar[dict[str, dict[str, Any]]] = {
        "no_phase2": {"layer_selection.enabled": False},
        "fedavg": {"federation.aggregation": "fedavg"},
        "no_class_balance": {"loss.class_weighting": "none"},
        "no_similarity": {"loss.similarity_weight": 0.0},
        "no_proximal": {"loss.proximal_mu": 0.0},
    }
    accepted_ablations = frozenset(ABLATION_SETTINGS)

    @classmethod
    def implied_settings(cls, algo: AlgorithmConfig) -> dict[str, Any]:
        settings: dict[str, Any] = {}
        for ablation in algo.ablations:
            settings.update(cls.ABLATION_SETTINGS.get(ablation, {}))
        return settings


@registered
class FAT(Algorithm):
    """FAT / FedPGD (Zizzo et al. 2020): FedAvg of the whole model, PGD adversarial training."""

    name, scope_name = "fat", "full"

    @classmethod
    def implied_settings(cls, algo: AlgorithmConfig) -> dict[str, Any]:
        return {**PGD_AT, **FEDAVG_NO_PHASE2, **full_model_settings(algo)}


@registered
class FedTRADES(Algorithm):
    """FedAvg of the whole model with TRADES (Zhang et al. 2019): CE(x) + beta KL(p(x) || p(x')),
    x' from the KL attack, gradients through both branches."""

    name, scope_name = "fedtrades", "full"

    @classmethod
    def implied_settings(cls, algo: AlgorithmConfig) -> dict[str, Any]:
        return {
            "loss.adversarial_weight": 0.0,
            "loss.benign_weight": 1.0,
            "loss.similarity_weight": algo.trades_beta,
            "loss.similarity_target": "both",
            "loss.proximal_mu": 0.0,
            "loss.class_weighting": "none",
            "attack.train_attack": "trades_kl",
            **FEDAVG_NO_PHASE2,
            **full_model_settings(algo),
        }


@registered
class FedMART(Algorithm):
    """FedAvg of the whole model with MART (Wang et al. 2020), beta ``algorithm.mart_beta``.
    ``loss.*`` is not used (MART's loss is ``losses.mart_loss``)."""

    name, scope_name = "fedmart", "full"

    @classmethod
    def implied_settings(cls, algo: AlgorithmConfig) -> dict[str, Any]:
        return {"attack.train_attack": "pgd", **FEDAVG_NO_PHASE2, **full_model_settings(algo)}

    def objective(self, data: ArrayDataset) -> Objective:
        from sylva_ray.method.objectives import MARTObjective

        return MARTObjective(self.cfg, data)


@registered
class CalFAT(Algorithm):
    """CalFAT (Chen et al., NeurIPS 2022): FedAvg of the whole model; each client calibrates its
    logits by its own class prior, z~ = z + tau * log(pi), in the inner attack *and* the outer loss.

    Source followed: the structure of the paper's objective -- a calibrated cross-entropy on the
    adversarial example plus a calibrated KL between benign and adversarial predictions, with the
    adversarial example maximising that KL -- with tau = 0.1 and the KL weighted by ``scale`` = 10
    (``algorithm.calfat_tau`` / ``calfat_scale``). Neither the paper's text nor its released code
    could be consulted from this machine (no internet), so this is *not* checked against the
    released code's simplifications; treat ``calfat`` as "CalFAT-style" until it is. ``loss.*`` is
    not used.
    """

    name, scope_name = "calfat", "full"

    @classmethod
    def implied_settings(cls, algo: AlgorithmConfig) -> dict[str, Any]:
        return {"attack.train_attack": "trades_kl", **FEDAVG_NO_PHASE2, **full_model_settings(algo)}

    def objective(self, data: ArrayDataset) -> Objective:
        from sylva_ray.method.objectives import CalFATObjective

        return CalFATObjective(self.cfg, data)


@registered
class LocalAT(Algorithm):
    """Every client adversarially fine-tunes its own LoRA + head (PGD-AT) alone: no federation,
    nothing uploaded. The floor federation must beat (docs results/comparison.md 'What the comparison says': at alpha
    0.1 it often does not)."""

    name, scope_name = "local_at", "local"

    @classmethod
    def implied_settings(cls, algo: AlgorithmConfig) -> dict[str, Any]:
        return {**PGD_AT, **FEDAVG_NO_PHASE2}


@registered
class FedAvgLoRAAT(Algorithm):
    """LoRA adapters shared by plain FedAvg, PGD-AT locally, personal heads, no Phase 2: Sylva's
    engine without any of Sylva's parts."""

    name = "fedavg_lora_at"

    @classmethod
    def implied_settings(cls, algo: AlgorithmConfig) -> dict[str, Any]:
        return {**PGD_AT, **FEDAVG_NO_PHASE2}


def default_comparison() -> list[str]:
    """What ``sylva-ray compare`` runs without ``--algorithms``: Sylva, each of its ablations, then
    every other registered algorithm -- LoRA before full-model, federated before local, otherwise in
    registration order -- so a newly registered baseline joins the comparison without a list to edit."""
    others = [ALGORITHMS.get(name) for name in ALGORITHMS.registered() if name != Sylva.name]
    others.sort(key=lambda cls: (SCOPES.get(cls.scope_name).global_form, cls.scope_name == "local"))  # stable sort
    return [
        Sylva.name,
        *(f"{Sylva.name}-{ablation}" for ablation in Sylva.ABLATION_SETTINGS),
        *(cls.name for cls in others),
    ]
