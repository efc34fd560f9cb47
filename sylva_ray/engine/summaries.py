"""Client means of an evaluation table: the figures ``summary.json`` and the progress line report."""

from __future__ import annotations

import numpy as np
import pandas as pd

#: accuracy column -> the column holding how many samples it was measured on
ACCURACY_COUNTS = {"clean_acc": "num_clean", "robust_acc": "num_robust", "autoattack_acc": "num_autoattack"}


def client_means(evaluation: pd.DataFrame) -> dict[str, float]:
    """Per accuracy: the unweighted client mean (each client's model counts once), the
    test-sample-weighted mean (personalised-FL convention) and the weighted std over clients."""
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
    return means


def split_by_malicious(evaluation: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(honest rows, malicious rows): accuracy figures are the honest clients' (a malicious
    client's own model says nothing about the defence); rows without the column are honest."""
    if "malicious" not in evaluation:
        return evaluation, evaluation.iloc[0:0]
    flags = evaluation["malicious"].fillna(False).astype(bool)
    return evaluation[~flags], evaluation[flags]
