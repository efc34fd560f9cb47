"""Phase 2's report: each client's row after tailoring, the Shapley tables and plots, the means.

Writes into ``out_dir``: ``shapley.csv`` (client, layer, value, stderr, evaluations, selected),
``shapley_games.csv`` (per client: how flat its game was, what one validation image resolves, ties
at the selection cut), ``shapley_heatmap.png`` (clients x layers), ``phase2_before_after.png`` and, per client,
``models/phase2_client_NNNN.safetensors`` (its tuned layers + head, on top of the global adapter).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from sylva_ray.base.config import ExperimentConfig
from sylva_ray.base.plots import pyplot, save_figure
from sylva_ray.base.storage import atomic_write_bytes
from sylva_ray.engine.jobs import Outcome
from sylva_ray.engine.layer_games import GameRecord, LayerChoice
from sylva_ray.engine.rundir import write_table
from sylva_ray.engine.summaries import client_means, split_by_malicious
from sylva_ray.engine.transfer_report import victim_figures
from sylva_ray.method.evaluation import is_protocol_figure
from sylva_ray.method.sanity import sanity_warnings, transfer_warnings
from sylva_ray.method.shapley import ShapleyResult, flatness, ties_at_cut

log = logging.getLogger(__name__)

#: A game with at least this share of zero marginal contributions is reported as flat.
FLAT_WARNING_SHARE = 0.5


#: Characters of an error message kept in a summary row.
ERROR_CHARS = 200


def short_error(text: str) -> str:
    """An error's last line, cut short: a Ray traceback names hosts and PIDs, not the experiment."""
    lines = text.strip().splitlines()
    return lines[-1][:ERROR_CHARS] if lines else ""


def client_rows(
    players: Sequence[str],
    clients: Sequence[int],
    phase1: Mapping[int, dict[str, Any]],
    choice: LayerChoice,
    tailored: Mapping[int, Outcome],
    scored: Mapping[int, Outcome],
    out_dir: Path,
) -> tuple[list[dict[str, Any]], pd.DataFrame]:
    """Each client's row after Phase 2 (its models saved beside) and the Shapley table."""
    per_client, shapley_rows = [], []
    for client in clients:
        # Phase 1's plain evaluation; the protocol's figures come from Phase 2's protocol only (a
        # Phase-1 run scored with the protocol must not lend its figures to a Phase 2 that skips them).
        row = {k: v for k, v in phase1[client].items() if not is_protocol_figure(k)}
        row.update(phase1_clean_acc=row["clean_acc"], phase1_robust_acc=row["robust_acc"])
        if client not in choice.results:
            row["phase2_error"] = short_error(choice.failed.get(client, ""))
            per_client.append(row)
            continue
        outcome = scored.get(client) or tailored[client]
        if outcome.ok:
            row.update(outcome.metrics, **victim_figures(outcome.transfer))
            atomic_write_bytes(
                out_dir / "models" / f"phase2_client_{client:04d}.safetensors",
                tailored[client].tuned,  # type: ignore[arg-type]
            )
        else:
            row["phase2_error"] = short_error(outcome.error or "tailoring failed")
        selected = choice.selected[client]
        row["selected_layers"] = [players[p] for p in selected]
        res = choice.results[client]
        for index, name in enumerate(players):
            shapley_rows.append(
                {
                    "client": client,
                    "layer": name,
                    "value": float(res.values[index]),
                    "stderr": float(res.stderr[index]),
                    "evaluations": res.evaluations,
                    "method": res.method,
                    "selected": index in selected,
                }
            )
        per_client.append(row)
    return per_client, pd.DataFrame(shapley_rows)


def game_rows(
    cfg: ExperimentConfig,
    results: Mapping[int, ShapleyResult],
    selected: Mapping[int, list[int]],
    records: Mapping[int, GameRecord],
    num_players: int,
) -> pd.DataFrame:
    """``shapley_games.csv``: per client, how flat its game was and whether the order broke a tie."""
    sel = cfg.layer_selection
    rows = []
    for client, res in sorted(results.items()):
        if res.method == "none":
            continue
        flat = flatness(res.coalition_values, num_players)
        n_val = records[client].validation_samples if client in records else 0
        ties = ties_at_cut(res.values, selected[client]) if sel.selection == "top_k" else 0
        rows.append(
            {
                "client": client,
                "value": sel.value,
                "validation_samples": n_val,
                # What one validation image moves an accuracy by, in points: an accuracy-valued game
                # cannot resolve less. The ce value moves continuously.
                "one_image_points": 100.0 / n_val if n_val else float("nan"),
                "evaluations": res.evaluations,
                "method": res.method,
                "replicates": res.replicates,
                "marginals_seen": flat.marginals,
                "zero_marginal_share": flat.zero_share,
                "distinct_values": flat.distinct_values,
                "ties_at_cut": ties,
                "tie_break": "earlier layer first" if ties else "no tie",
            }
        )
    return pd.DataFrame(rows)


def report_phase2(
    cfg: ExperimentConfig,
    out_dir: Path,
    players: Sequence[str],
    choice: LayerChoice,
    per_client: list[dict[str, Any]],
    shapley: pd.DataFrame,
    transfer: list[dict[str, Any]],
    seconds_by_stage: dict[str, float],
    started: float,
) -> dict[str, Any]:
    """The tables, plots and sanity checks on disk; returns what ``run_phase2`` returns."""
    sel = cfg.layer_selection
    write_table(out_dir / "shapley.csv", shapley)
    games = game_rows(cfg, choice.results, choice.selected, choice.records, len(players))
    if not games.empty:
        write_table(out_dir / "shapley_games.csv", games)
        flat = games.loc[games["zero_marginal_share"] >= FLAT_WARNING_SHARE, "client"].tolist()
        if flat:
            log.warning(
                "phase 2: the layer games of clients %s are flat (>= %.0f%% zero marginal contributions; see "
                "shapley_games.csv): their Shapley values cannot tell layers apart%s",
                flat,
                100 * FLAT_WARNING_SHARE,
                "; layer_selection.value=ce moves continuously" if sel.value != "ce" else "",
            )
    plot_heatmap(out_dir, shapley)
    per_client_frame = pd.DataFrame(per_client)
    plot_before_after(out_dir, per_client_frame)
    honest, malicious = split_by_malicious(per_client_frame)
    means = client_means(honest)
    scored_rows = [row for row in per_client if "phase2_error" not in row]
    warnings = sanity_warnings(scored_rows, cfg.evaluation, "phase 2 (final)")
    if cfg.evaluation.transfer:
        warnings += transfer_warnings(scored_rows, transfer, cfg.evaluation, "phase 2 (final, transfer)")
    seconds = time.perf_counter() - started
    log.info(
        "phase 2: %d clients, %d layers, %d coalition evaluations, clean %.4f robust %.4f, %.1fs",
        len(choice.results),
        len(players),
        choice.evaluations,
        means["clean_acc"],
        means["robust_acc"],
        seconds,
    )
    return {
        "means": means,
        "malicious_means": client_means(malicious) if len(malicious) else None,
        "selected": {str(c): [players[p] for p in s] for c, s in choice.selected.items()},
        "per_client": per_client,
        "failed": {str(c): e for c, e in choice.failed.items()},
        "seconds": seconds,
        "seconds_by_stage": seconds_by_stage,
        "evaluations": choice.evaluations,
        "sanity_warnings": warnings,
    }


def plot_heatmap(out_dir: Path, frame: pd.DataFrame) -> None:
    """Clients x layers, colour = Shapley value, selected layers marked."""
    if frame.empty or frame["value"].isna().all():  # no game was played (random / all)
        return
    plt = pyplot()
    grid = frame.pivot(index="client", columns="layer", values="value")
    chosen = frame.pivot(index="client", columns="layer", values="selected")
    order = list(dict.fromkeys(frame["layer"]))
    grid, chosen = grid[order], chosen[order]
    fig, ax = plt.subplots(figsize=(1.2 + 0.7 * len(order), 1.0 + 0.35 * len(grid)))
    limit = float(np.nanmax(np.abs(grid.to_numpy()))) or 1.0
    image = ax.imshow(grid.to_numpy(), cmap="RdBu", vmin=-limit, vmax=limit, aspect="auto")
    for (i, j), flag in np.ndenumerate(chosen.to_numpy()):
        if flag:
            ax.text(j, i, "*", ha="center", va="center", color="black")
    ax.set_xticks(
        range(len(order)), [name.rstrip(".").removeprefix("backbone.") for name in order], rotation=45, ha="right"
    )
    ax.set_yticks(range(len(grid)), [str(c) for c in grid.index])
    ax.set_xlabel("layer (* selected)")
    ax.set_ylabel("client")
    fig.colorbar(image, ax=ax, label="Shapley value")
    fig.tight_layout()
    save_figure(fig, out_dir / "shapley_heatmap.png")


def plot_before_after(out_dir: Path, frame: pd.DataFrame) -> None:
    """Per client: clean and robust accuracy after Phase 1 and after Phase 2."""
    plt = pyplot()
    x = np.arange(len(frame))
    fig, axes = plt.subplots(1, 2, figsize=(max(6, 0.6 * len(frame) + 2), 3.2), sharey=True)
    for ax, metric in zip(axes, ("clean_acc", "robust_acc")):
        ax.bar(x - 0.2, frame[f"phase1_{metric}"], width=0.4, label="after Phase 1")
        ax.bar(x + 0.2, frame[metric], width=0.4, label="after Phase 2")
        ax.set_title(metric.replace("_acc", " accuracy"))
        ax.set_xticks(x, [str(c) for c in frame["client"]])
        ax.set_xlabel("client")
        ax.set_ylim(0, 1)
    axes[0].legend(loc="lower left")
    fig.tight_layout()
    save_figure(fig, out_dir / "phase2_before_after.png")
