"""What a round leaves on disk: one row per sampled client (``metrics.csv``) and one per round
(``rounds.csv``), built from the round's outcomes. Pure functions over dicts: the round loop
(``engine.federation``) decides what happened, this module writes it down.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pandas as pd

from sylva_ray.engine.clock import RoundPlan
from sylva_ray.engine.jobs import Outcome
from sylva_ray.engine.summaries import split_by_malicious

#: Characters of a failed job's last error line kept in its row.
ERROR_CHARS = 200
#: Training and evaluation figures averaged over the honest clients in a round's line: the progress
#: line and rounds.csv follow the defence, not the attack.
HONEST_MEANS = (
    "train_loss",
    "train_adversarial",
    "train_benign",
    "train_similarity",
    "train_proximal",
    "clean_acc",
    "robust_acc",
    "majority_rate",
)
#: Resource figures reported as the round's maximum (gpu_peak_mb: torch.cuda.max_memory_allocated,
#: GPU runs only).
PEAK_FIGURES = ("actor_rss_mb", "gpu_peak_mb")


def outcome_row(outcome: Outcome, round_index: int, sent: int) -> dict[str, Any]:
    """A client that was handed a job: what it received, sent back and measured, or why it failed."""
    row: dict[str, Any] = {
        "round": round_index,
        "client": outcome.client_id,
        "participated": True,
        "dropped": not outcome.ok,
        "attempts": outcome.attempts,
        "bytes_down": sent,
        "bytes_up": len(outcome.upload or b""),
    }
    if outcome.ok:
        row.update(outcome.metrics)
    else:
        row["error"] = (outcome.error or "").strip().splitlines()[-1][:ERROR_CHARS] if outcome.error else ""
    return row


def absent_rows(plan: RoundPlan, round_index: int, sent: int) -> dict[int, dict[str, Any]]:
    """Rows of the sampled clients that did not train: stragglers downloaded the broadcast and
    would have taken ``sim_total_s``; offline clients received nothing."""
    rows: dict[int, dict[str, Any]] = {}
    for client in plan.stragglers:
        rows[client] = {
            "round": round_index,
            "client": client,
            "participated": False,
            "online": True,
            "straggler": True,
            "bytes_down": sent,
            "bytes_up": 0,
            **plan.times[client],
        }
    for client in plan.offline:
        rows[client] = {
            "round": round_index,
            "client": client,
            "participated": False,
            "online": False,
            "straggler": False,
            "bytes_down": 0,
            "bytes_up": 0,
        }
    return rows


def record_weights(
    rows: dict[int, dict[str, Any]], done: Sequence[Outcome], weights: np.ndarray, selecting: bool
) -> None:
    """Each aggregated client's weight (``agg_weight``) and, for a rule that selects rather than
    weighs, whether it was picked (``agg_selected``: None after a mixing pre-step, whose weight is NaN)."""
    for outcome, weight in zip(done, weights):
        rows[outcome.client_id]["agg_weight"] = float(weight)
        if selecting:
            rows[outcome.client_id]["agg_selected"] = None if np.isnan(weight) else bool(weight > 0)


def round_summary(
    round_index: int, rows: dict[int, dict[str, Any]], seconds: float, participants: int
) -> dict[str, Any]:
    """The round's line in rounds.csv: traffic, drops, honest clients' means, resource peaks."""
    frame = pd.DataFrame(list(rows.values()))
    honest = split_by_malicious(frame)[0]
    summary: dict[str, Any] = {
        "round": round_index,
        "participants": participants,
        "dropped": int(frame.get("dropped", pd.Series(dtype=bool)).fillna(False).sum()),
        "bytes_up": int(frame["bytes_up"].fillna(0).sum()),
        "bytes_down": int(frame["bytes_down"].fillna(0).sum()) if "bytes_down" in frame else 0,
        "seconds": seconds,
    }
    for column in HONEST_MEANS:
        if column in honest and honest[column].notna().any():
            summary[column] = float(honest[column].mean())
    for column in PEAK_FIGURES:
        if column in frame and frame[column].notna().any():
            summary[f"{column}_max"] = float(frame[column].max())
    return summary
