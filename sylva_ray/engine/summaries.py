"""Client means of an evaluation table: the figures ``summary.json`` and the progress line report."""

from __future__ import annotations

import numpy as np
import pandas as pd

from sylva_ray.method.evaluation import binomial_se

#: accuracy column -> the column holding how many samples it was measured on
ACCURACY_COUNTS = {
    "clean_acc": "num_clean",
    "robust_acc": "num_robust",
    "autoattack_acc": "num_autoattack",
    "strongest_attack_acc": "num_strongest",
    "strongest_whitebox_acc": "num_strongest",
    # the transfer attacks (engine.transfer_report.FIGURES), on the evaluation attack's subset
    "transfer_public_acc": "num_transfer",
    "transfer_global_acc": "num_transfer",
    "transfer_peers_acc": "num_transfer",
    "transfer_worst_peer_acc": "num_transfer",
    "transfer_worst_acc": "num_transfer",
}


def client_means(evaluation: pd.DataFrame) -> dict[str, float]:
    """Per accuracy: the unweighted client mean (each client's model counts once), the
    test-sample-weighted mean (personalised-FL convention) and the weighted std over clients; and
    how far the figure can be trusted: ``*_samples`` (images attacked in all) and the binomial
    standard errors of both means (``*_se``: sqrt(sum_i p_i (1 - p_i) / n_i) / K for the client
    mean; ``*_weighted_se``: sqrt(p (1 - p) / N) for the pooled, weighted one)."""
    means: dict[str, float] = {}
    for column, count in ACCURACY_COUNTS.items():
        if column not in evaluation or evaluation[column].isna().all():
            continue
        frame = evaluation[[column, count]].dropna()
        weighted = float(np.average(frame[column], weights=frame[count]))
        means[column] = float(frame[column].mean())
        means[f"{column}_weighted"] = weighted
        means[f"{column}_client_std"] = float(
            np.sqrt(np.average((frame[column] - weighted) ** 2, weights=frame[count]))
        )
        rates, counts = frame[column].to_numpy(float), frame[count].to_numpy(float)
        means[f"{column}_samples"] = int(counts.sum())
        means[f"{column}_se"] = float(np.sqrt(np.sum(rates * (1 - rates) / np.maximum(counts, 1))) / len(frame))
        means[f"{column}_weighted_se"] = binomial_se(weighted, counts.sum())
    return means


def split_by_malicious(evaluation: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(honest rows, malicious rows): accuracy figures are the honest clients' (a malicious
    client's own model says nothing about the defence); rows without the column are honest."""
    if "malicious" not in evaluation:
        return evaluation, evaluation.iloc[0:0]
    flags = evaluation["malicious"].fillna(False).astype(bool)
    return evaluation[~flags], evaluation[flags]
