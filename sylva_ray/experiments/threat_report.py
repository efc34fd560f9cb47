"""A threat sweep's table and plot: honest clients' accuracy against the malicious fraction.

threat.csv   one row per algorithm x aggregation x behaviour x fraction: seed means and stds of
             the honest clients' clean / PGD / AutoAttack accuracy (test-sample-weighted), the
             malicious count, seeds; the attack-free cell (fraction 0) is repeated under each
             behaviour so every line starts from it
threat.md    the same, as a table per behaviour, in points
threat.png   rows: behaviours; columns: clean, PGD, AutoAttack; one line per aggregation
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from sylva_ray.base.plots import pyplot, save_figure
from sylva_ray.base.storage import atomic_write_text
from sylva_ray.engine.rundir import read_json, write_table
from sylva_ray.engine.summaries import ACCURACY_COUNTS

METRICS = {"clean_acc": "clean", "robust_acc": "PGD", "autoattack_acc": "AutoAttack"}
CELL = ["base_algorithm", "aggregation", "behaviour", "malicious_fraction"]
NO_ATTACK = "none"


def _weighted(per_client: pd.DataFrame, clients: set[int], metric: str) -> float:
    rows = per_client[per_client["client"].isin(clients)][[metric, ACCURACY_COUNTS[metric]]].dropna()
    if rows.empty or rows[ACCURACY_COUNTS[metric]].sum() <= 0:
        return float("nan")
    return float(np.average(rows[metric], weights=rows[ACCURACY_COUNTS[metric]]))


def with_same_client_reference(frame: pd.DataFrame) -> pd.DataFrame:
    """Adds ``<metric>_no_attack``: the attack-free run (same algorithm, rule and seed) scored on
    the attacked run's *honest* clients, and ``<metric>_drop`` = that minus the attacked figure.

    An attacked cell's figures cover the honest clients only, the attack-free cell's all clients;
    under label skew the two groups differ, so the absolute figures mix the attack's effect with a
    change of population. The drop compares the same clients with and without the attack.
    """
    frame = frame.copy()
    ok = frame["status"] == "ok"
    clean_runs = {
        (r.base_algorithm, r.aggregation, r.seed): r.run_dir
        for r in frame[ok & (frame["behaviour"] == NO_ATTACK)].itertuples()
    }
    for index, row in frame[ok].iterrows():
        clean_dir = clean_runs.get((row["base_algorithm"], row["aggregation"], row["seed"]))
        if clean_dir is None:
            continue
        attacked = pd.DataFrame(read_json(Path(row["run_dir"]) / "summary.json")["per_client"])
        honest = set(
            attacked.loc[~attacked.get("malicious", pd.Series(False, index=attacked.index)).astype(bool), "client"]
        )
        reference = pd.DataFrame(read_json(Path(clean_dir) / "summary.json")["per_client"])
        for metric in METRICS:
            if metric in reference and metric in attacked:
                frame.loc[index, f"{metric}_no_attack"] = _weighted(reference, honest, metric)
                frame.loc[index, f"{metric}_drop"] = frame.loc[index, f"{metric}_no_attack"] - _weighted(
                    attacked, honest, metric
                )
    return frame


def threat_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Seed means/stds per cell, with the attack-free cells copied under every behaviour."""
    ok = frame[frame["status"] == "ok"]
    if ok.empty:
        return pd.DataFrame()
    extra = [c for m in METRICS for c in (f"{m}_no_attack", f"{m}_drop") if c in ok]
    columns = [m for m in METRICS if m in ok] + extra + ["num_malicious"]
    grouped = ok.groupby(CELL, sort=False)[columns]
    table = grouped.mean().add_suffix("_mean").join(grouped.std(ddof=1).add_suffix("_std"))
    table["seeds"] = ok.groupby(CELL, sort=False).size()
    table = table.reset_index()
    behaviours = [b for b in dict.fromkeys(table["behaviour"]) if b != NO_ATTACK]
    clean = table[table["behaviour"] == NO_ATTACK]
    copies = [clean.assign(behaviour=b) for b in behaviours] or [clean]
    attacked = table[table["behaviour"] != NO_ATTACK]
    return (
        pd.concat([*copies, attacked], ignore_index=True)
        .sort_values(["behaviour", "base_algorithm", "aggregation", "malicious_fraction"], kind="stable")
        .reset_index(drop=True)
    )


def _cell(row: pd.Series, metric: str) -> str:
    mean, std = row.get(f"{metric}_mean"), row.get(f"{metric}_std")
    if pd.isna(mean):
        return "-"
    text = f"{mean * 100:.1f}" if pd.isna(std) else f"{mean * 100:.1f} ± {std * 100:.1f}"
    drop = row.get(f"{metric}_drop_mean")
    if row.get("behaviour") != NO_ATTACK and drop is not None and not pd.isna(drop):
        text += f" ({-drop * 100:+.1f})"
    return text


def threat_markdown(table: pd.DataFrame, context: str) -> str:
    lines = [
        "# Threat sweep",
        "",
        context,
        "",
        "In brackets: the change in points against the attack-free run of the same rule and seed, scored on the "
        "same (honest) clients.",
        "",
    ]
    for behaviour, block in table.groupby("behaviour", sort=False):
        lines += [
            f"## {behaviour}",
            "",
            "| algorithm | aggregation | malicious | clean | PGD | AutoAttack | seeds |",
            "|---|---|---|---|---|---|---|",
        ]
        for _, row in block.iterrows():
            malicious = f"{row['malicious_fraction'] * 100:.0f}% ({row['num_malicious_mean']:.0f})"
            cells = [_cell(row, m) for m in METRICS]
            lines.append(
                f"| {row['base_algorithm']} | {row['aggregation']} | {malicious} | {' | '.join(cells)} "
                f"| {int(row['seeds'])} |"
            )
        lines.append("")
    return "\n".join(lines)


def plot_threat(out: Path, table: pd.DataFrame) -> None:
    plt = pyplot()
    behaviours = list(dict.fromkeys(table["behaviour"]))
    metrics = [m for m in METRICS if f"{m}_mean" in table]
    fig, axes = plt.subplots(
        len(behaviours), len(metrics), figsize=(4 * len(metrics), 3.2 * len(behaviours)), squeeze=False, sharey=True
    )
    algorithms = table["base_algorithm"].nunique()
    for i, behaviour in enumerate(behaviours):
        block = table[table["behaviour"] == behaviour]
        for j, metric in enumerate(metrics):
            ax = axes[i][j]
            for index, ((algorithm, aggregation), line) in enumerate(
                block.groupby(["base_algorithm", "aggregation"], sort=False)
            ):
                line = line.sort_values("malicious_fraction")
                label = aggregation if algorithms == 1 else f"{algorithm}/{aggregation}"
                ax.errorbar(
                    line["malicious_fraction"] * 100,
                    line[f"{metric}_mean"] * 100,
                    yerr=line[f"{metric}_std"].fillna(0) * 100,
                    marker="o",
                    markersize=4,
                    capsize=2,
                    color=f"C{index % 10}",
                    label=label,
                )
            ax.set_title(f"{behaviour}: {METRICS[metric]}")
            ax.set_xlabel("malicious clients (%)")
            if j == 0:
                ax.set_ylabel("honest clients' accuracy (%)")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle("honest clients' accuracy vs malicious fraction (mean ± std over seeds)")
    fig.tight_layout()
    save_figure(fig, out / "threat.png")


def write_threat_report(out: Path, frame: pd.DataFrame, context: str) -> pd.DataFrame:
    table = threat_table(with_same_client_reference(frame))
    write_table(out / "threat.csv", table)
    atomic_write_text(out / "threat.md", threat_markdown(table, context))
    if not table.empty:
        plot_threat(out, table)
    return table
