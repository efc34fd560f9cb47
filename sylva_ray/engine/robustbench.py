"""``robustbench.json``: a run's final figures in the RobustBench leaderboard's claim format.

RobustBench's model cards (``model_info/<dataset>/<threat model>/<name>.json``) carry ``dataset``,
``eps`` as a fraction string, ``clean_acc`` and ``autoattack_acc`` as percentages with two
decimals, ``architecture``, ``additional_data`` and ``number_forward_passes``. We write the same
fields per client and for the client mean, with ours beside them (samples, each attack's accuracy,
the strongest attack's, the seed), so figures can be set against the leaderboard's -- and an honest
``comparable_to_robustbench`` with its reasons: a personalised federation is ten models on a
hundred images each, not one model on a full test set at the leaderboard's eps.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Any, Mapping, Optional

from sylva_ray.base.config import ExperimentConfig

ROBUSTBENCH_FILE = "robustbench.json"
#: The leaderboards' L-infinity radii (robustbench.github.io); other datasets have none.
LEADERBOARD_EPS = {"cifar10": Fraction(8, 255), "cifar100": Fraction(8, 255), "imagenet": Fraction(4, 255)}
#: The leaderboards' test sets: RobustBench evaluates on the full test set (ImageNet: 5,000 images).
LEADERBOARD_TEST_SAMPLES = {"cifar10": 10_000, "cifar100": 10_000, "imagenet": 5_000}
#: Denominators an eps fraction is written with (8/255 and 1/20 both come out as written).
EPS_MAX_DENOMINATOR = 1000
#: Per-attack accuracy columns of the final protocol, by the attack's name.
ATTACK_COLUMNS = {
    "pgd": "robust_acc",
    "autoattack": "autoattack_acc",
    "long_pgd": "long_pgd_acc",
    "strongest": "strongest_attack_acc",
}
#: A model without an ensemble or randomness: one forward pass per prediction.
FORWARD_PASSES = 1
#: The standard AutoAttack's APGD iterations (Croce & Hein 2020).
REFERENCE_AUTOATTACK_STEPS = 100


def eps_fraction(eps: float) -> str:
    """``8/255`` for 0.03137..., ``1/20`` for 0.05: the leaderboard's way of writing a radius."""
    fraction = Fraction(eps).limit_denominator(EPS_MAX_DENOMINATOR)
    return f"{fraction.numerator}/{fraction.denominator}"


def percent(value: Optional[float]) -> Optional[str]:
    """An accuracy as RobustBench writes it: a percentage string with two decimals."""
    return None if value is None else f"{100 * float(value):.2f}"


def _claim(cfg: ExperimentConfig, figures: Mapping[str, Any], samples: Optional[int]) -> dict[str, Any]:
    claim = {
        "dataset": cfg.data.name,
        "threat_model": "Linf",
        "eps": eps_fraction(cfg.attack.eps),
        "clean_acc": percent(figures.get("clean_acc")),
        "autoattack_acc": percent(figures.get("autoattack_acc")),
        "architecture": cfg.model.name,
        "additional_data": False,
        "number_forward_passes": FORWARD_PASSES,
    }
    claim["sylva_ray"] = {
        "autoattack_samples": samples,
        "accuracy_by_attack": {
            name: figures[column] for name, column in ATTACK_COLUMNS.items() if figures.get(column) is not None
        },
        "strongest_attack_acc": figures.get("strongest_attack_acc"),
        "seed": cfg.runtime.seed,
    }
    return claim


def not_comparable_reasons(cfg: ExperimentConfig, summary: Mapping[str, Any]) -> list[str]:
    """Why these figures cannot be set beside the leaderboard's (empty when they can)."""
    reasons = []
    dataset = cfg.data.name
    clients = len(summary.get("per_client") or [])
    final = summary.get("final") or {}
    if dataset not in LEADERBOARD_EPS:
        reasons.append(f"dataset {dataset!r} has no RobustBench leaderboard")
    elif Fraction(cfg.attack.eps).limit_denominator(EPS_MAX_DENOMINATOR) != LEADERBOARD_EPS[dataset]:
        leaderboard = LEADERBOARD_EPS[dataset]
        reasons.append(f"eps {eps_fraction(cfg.attack.eps)} is not the {dataset} leaderboard's {leaderboard}")
    if clients > 1:
        reasons.append(f"{clients} personalised models, each on its own client's test split, not one model")
    if "autoattack_acc" not in final:
        reasons.append("no AutoAttack figure (evaluation.autoattack off, or it failed)")
    else:
        samples = int(final.get("autoattack_acc_samples", 0))
        wanted = LEADERBOARD_TEST_SAMPLES.get(dataset)
        if wanted is None or samples < wanted:
            per_client = f", {cfg.evaluation.autoattack_max_samples} at most per client" if clients > 1 else ""
            reasons.append(
                f"AutoAttack on {samples} images{per_client}"
                + (f", not the full test set ({wanted:,})" if wanted else "")
            )
        if cfg.attack.autoattack_steps < REFERENCE_AUTOATTACK_STEPS:
            reasons.append(
                f"AutoAttack at {cfg.attack.autoattack_steps} iterations, not the standard version's "
                f"{REFERENCE_AUTOATTACK_STEPS}"
            )
    return reasons


def robustbench_record(cfg: ExperimentConfig, summary: Mapping[str, Any]) -> dict[str, Any]:
    """The file's content: the client mean's claim, one per client, and whether it is comparable."""
    final = summary.get("final") or {}
    reasons = not_comparable_reasons(cfg, summary)
    per_client = []
    for row in summary.get("per_client") or []:
        if row.get("malicious"):
            continue  # a malicious client's own model says nothing about the defence
        claim = _claim(cfg, row, row.get("num_autoattack"))
        per_client.append({"client": row.get("client"), **claim})
    return {
        "comparable_to_robustbench": not reasons,
        "not_comparable_because": reasons,
        "client_mean": _claim(cfg, final, final.get("autoattack_acc_samples")),
        "per_client": per_client,
    }
