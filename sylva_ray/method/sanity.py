"""Gradient-masking red flags, checked on every final evaluation and warned about loudly.

A defence that only *looks* robust usually betrays itself in one of these (Carlini et
al. 2019, "On Evaluating Adversarial Robustness"):

    robust <= clean          an attack that raises accuracy is not attacking (checked every evaluation)
    long PGD <= PGD          more iterations must not help the model (PGD-100 vs PGD-20)
    AutoAttack <= PGD        the stronger ensemble must not be weaker than PGD
    ~0 at a large eps        with a large enough budget every input can be changed

Counts are pooled over clients (a client's split can be a handful of images), each on the same
images for both sides of a comparison; ``tolerance`` absorbs a sample or two of seeded noise.
"""

from __future__ import annotations

import logging
from typing import Any, Iterable, Mapping

import numpy as np

from sylva_ray.base.config import EvaluationConfig

log = logging.getLogger(__name__)


def _pooled(rows: list[Mapping[str, Any]], value: str, count: str) -> tuple[float, int]:
    """Sample-weighted accuracy over the rows that have ``value``."""
    pairs = [(float(r[value]), int(r[count])) for r in rows if r.get(value) is not None and r.get(count)]
    total = sum(n for _, n in pairs)
    return (sum(v * n for v, n in pairs) / total if total else float("nan")), total


def sanity_warnings(rows: Iterable[Mapping[str, Any]], cfg: EvaluationConfig, where: str) -> list[str]:
    """Warnings for one evaluation (a list of per-client rows from ``EvalResult.as_dict``)."""
    rows = [r for r in rows if r.get("clean_acc") is not None]
    warnings: list[str] = []
    tol = cfg.sanity_tolerance

    robust, n = _pooled(rows, "robust_acc", "num_robust")
    clean, _ = _pooled(rows, "clean_on_robust", "num_robust")
    if n and robust > clean + tol:
        warnings.append(
            f"{where}: robust accuracy {robust:.3f} > clean {clean:.3f} on the same {n} images: the attack is not "
            "attacking"
        )
    above = [
        int(r["client"])
        for r in rows
        if "client" in r
        and r.get("clean_on_robust") is not None
        and float(r["robust_acc"]) > float(r["clean_on_robust"]) + tol
    ]
    if above:
        warnings.append(f"{where}: clients {above} have robust > clean accuracy")

    long_pgd, n = _pooled(rows, "long_pgd_acc", "num_sanity")
    short, _ = _pooled(rows, "pgd_on_sanity", "num_sanity")
    if n and long_pgd > short + tol:
        warnings.append(
            f"{where}: long PGD ({cfg.sanity_long_steps} steps) accuracy {long_pgd:.3f} > PGD {short:.3f} on {n} "
            "images: "
            "more iterations help the model (gradient masking?)"
        )
    large, n = _pooled(rows, "large_eps_acc", "num_sanity")
    if n and large > cfg.sanity_large_eps_max_acc:
        cause = "gradients may be masked or the attack broken"
        # A model that predicts (nearly) one class whatever the input is trivially "robust": a
        # collapsed run, not a masked one. Say which, so nobody hunts for masking in a diverged run.
        clean_all, _ = _pooled(rows, "clean_acc", "num_clean")
        majority, _ = _pooled(rows, "majority_rate", "num_clean")
        if clean_all <= majority + tol:
            cause = (
                f"clean accuracy {clean_all:.3f} does not beat the majority-class constant predictor "
                f"({majority:.3f}): the model looks collapsed (check the training loss), not masked"
            )
        elif abs(clean - robust) <= tol:
            cause = (
                f"PGD changes nothing either (clean {clean:.3f}, PGD {robust:.3f}): the model looks collapsed "
                "to a near-constant prediction (check the training loss), or gradients are masked"
            )
        warnings.append(
            f"{where}: accuracy {large:.3f} at eps {cfg.sanity_large_eps} on {n} images is not near 0 "
            f"(> {cfg.sanity_large_eps_max_acc}): {cause}"
        )
    auto, n = _pooled(rows, "autoattack_acc", "num_autoattack")
    pgd_same, _ = _pooled(rows, "pgd_on_autoattack", "num_autoattack")
    if n and auto > pgd_same + tol:
        warnings.append(
            f"{where}: AutoAttack accuracy {auto:.3f} > PGD {pgd_same:.3f} on {n} images: the stronger attack is weaker"
        )
    for message in warnings:
        log.warning("SANITY CHECK FAILED -- %s", message)
    return warnings


def transfer_warnings(
    clients: Iterable[Mapping[str, Any]], transfer: Iterable[Mapping[str, Any]], cfg: EvaluationConfig, where: str
) -> list[str]:
    """A transfer attack that beats the white-box PGD on the same victims and images: a classic sign
    of gradient masking (the victim's own gradients mislead its attacker; a smooth stand-in's do not).

    ``clients``: per-client rows (``robust_acc`` on ``num_robust`` images, the same images every
    transfer attack was scored on); ``transfer``: ``transfer.csv``'s rows. Per (source kind, attack)
    two checks: pooled over every (victim, source) pair, each pair against its victim's PGD, with
    ``sanity_tolerance``; and per victim (one masked client among many would vanish in the pool),
    its mean over its sources against its PGD, beyond the tolerance plus two binomial standard
    errors of its PGD figure (a split of a dozen images moves by a sample or two)."""
    robust = {
        int(r["client"]): float(r["robust_acc"]) for r in clients if "client" in r and r.get("robust_acc") is not None
    }
    pairs: dict[tuple[str, str], list[tuple[int, float, int]]] = {}
    for row in transfer:
        if int(row["victim"]) in robust and int(row["samples"]):
            key = (str(row["kind"]), str(row["attack"]))
            pairs.setdefault(key, []).append((int(row["victim"]), float(row["accuracy"]), int(row["samples"])))
    tol = cfg.sanity_tolerance
    warnings: list[str] = []
    for (kind, attack), scored in sorted(pairs.items()):
        by_victim: dict[int, list[tuple[float, int]]] = {}
        for victim, acc, n in scored:
            by_victim.setdefault(victim, []).append((acc, n))
        gaps = {v: robust[v] - sum(a for a, _ in accs) / len(accs) for v, accs in by_victim.items()}
        total = sum(n for _, _, n in scored)
        transfer_acc = sum(acc * n for _, acc, n in scored) / total
        pgd_acc = sum(robust[victim] * n for victim, _, n in scored) / total
        if transfer_acc < pgd_acc - tol:
            named = sorted(v for v, gap in gaps.items() if gap > tol)
            warnings.append(
                f"{where}: {attack} crafted on the {kind} source(s) leaves accuracy {transfer_acc:.3f} < white-box "
                f"PGD {pgd_acc:.3f} on the same {total} images (clients {named} most): a transfer attack beats the "
                "white-box one (gradient masking?)"
            )
            continue
        for victim, gap in sorted(gaps.items()):
            n = by_victim[victim][0][1]
            p = robust[victim]
            if gap > tol + 2 * float(np.sqrt(p * (1 - p) / n)):
                warnings.append(
                    f"{where}: client {victim}: {attack} crafted on the {kind} source(s) leaves accuracy "
                    f"{p - gap:.3f} < its white-box PGD {p:.3f} on the same {n} images: a transfer attack beats the "
                    "white-box one (gradient masking?)"
                )
    for message in warnings:
        log.warning("SANITY CHECK FAILED -- %s", message)
    return warnings
