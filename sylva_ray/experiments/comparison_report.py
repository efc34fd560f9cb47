"""The comparison's tables and plots, from the run directories' summary.json and rounds.csv.

Columns of ``comparison.csv`` (one row per algorithm x seed), accuracies in [0, 1]:
    clean_acc, robust_acc (PGD), autoattack_acc, strongest_attack_acc   per-client test splits, sample-weighted
    *_client_std                                      weighted std over clients
    *_unweighted                                      plain client means
    global_clean_acc, global_robust_acc, global_autoattack_acc   global model on the global test set
    strongest_whitebox_acc, transfer_public_acc, transfer_global_acc, transfer_peers_acc, transfer_worst_acc
                                                      with evaluation.transfer (docs explanation/threat-model.md);
                                                      each with *_unweighted and *_se (of the weighted figure)
    upload_mb_per_round, upload_mb_per_client_round, total_upload_mb, total_mb (up + down), wall_s
    majority_rate                                     the constant majority-class predictor's accuracy
    sanity_warnings                                   count of failed gradient-masking checks
    sim_hours, sim_round_s, sim_compute_s, sim_network_s, sim_time_to_95pct_robust_h, straggler_client_rounds
                                                      the simulated clock on the run's device mix (system.*)

``comparison.md`` averages over seeds (mean +- std) and, with a reference, gives the paper's three
headline figures: upload ratio (reference bytes / algorithm bytes), robust and clean gains in
points and in percent of the reference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd

from sylva_ray.base.config import ExperimentConfig
from sylva_ray.base.plots import pyplot, save_figure
from sylva_ray.base.storage import atomic_write_text
from sylva_ray.engine.clock import SECONDS_PER_HOUR
from sylva_ray.engine.environment import ENV_PREFIX, read_environment, repeat_fields
from sylva_ray.engine.rundir import read_json, write_table

MB = 1e6
METRICS = ("clean_acc", "robust_acc", "autoattack_acc", "strongest_attack_acc")
#: The transfer attacks' figures (evaluation.transfer), and the white-box-only strongest beside them.
TRANSFER_METRICS = (
    "strongest_whitebox_acc",
    "transfer_public_acc",
    "transfer_global_acc",
    "transfer_peers_acc",
    "transfer_worst_acc",
)
#: comparison.csv columns that are labels, not figures to average over seeds
TEXT_COLUMNS = frozenset(
    {"algorithm", "seed", "run_dir", "status", "error", "scope", "base_algorithm", "aggregation", "behaviour"}
)


@dataclass
class RunSpec:
    algorithm: str  # as written on the command line, e.g. "sylva-no_phase2"; a threat cell's label in a threat sweep
    seed: int
    cfg: ExperimentConfig
    run_dir: Path
    threat: Optional["ThreatCell"] = None


@dataclass(frozen=True)
class ThreatCell:
    """One cell of a threat sweep: which algorithm, against which rule, under which attack."""

    algorithm: str
    aggregation: str
    behaviour: str  # "none" at fraction 0
    fraction: float

    @property
    def label(self) -> str:
        return f"{self.algorithm}/{self.aggregation}/{self.behaviour}@{self.fraction:g}"


def summary_row(spec: RunSpec, summary: Optional[dict[str, Any]], error: Optional[str]) -> dict[str, Any]:
    row: dict[str, Any] = {
        "algorithm": spec.algorithm,
        "seed": spec.seed,
        "run_dir": str(spec.run_dir),
        "status": "ok" if summary is not None else "failed",
        "error": error or "",
    }
    if spec.threat is not None:
        row.update(
            base_algorithm=spec.threat.algorithm,
            aggregation=spec.threat.aggregation,
            behaviour=spec.threat.behaviour,
            malicious_fraction=spec.threat.fraction,
        )
    if summary is None:
        return row
    row.update(repeat_fields(read_environment(spec.run_dir) or {}))  # whether its figures repeat elsewhere
    final = summary["final"]
    for metric in METRICS:
        row[metric] = final.get(f"{metric}_weighted", np.nan)
        row[f"{metric}_client_std"] = final.get(f"{metric}_client_std", np.nan)
        row[f"{metric}_unweighted"] = final.get(metric, np.nan)
        row[f"global_{metric}"] = (summary.get("global") or {}).get(metric, np.nan)
    for metric in ("autoattack_acc", "strongest_attack_acc"):  # how far each seed's figure can be trusted
        row[f"{metric}_samples"] = final.get(f"{metric}_samples", np.nan)
        row[f"{metric}_se"] = final.get(f"{metric}_weighted_se", np.nan)
    for metric in TRANSFER_METRICS:
        if metric in final:
            row[metric] = final.get(f"{metric}_weighted", np.nan)
            row[f"{metric}_unweighted"] = final[metric]
            row[f"{metric}_se"] = final.get(f"{metric}_weighted_se", np.nan)  # of the weighted figure beside it
    comm = summary["communication"]
    rounds = max(1, int(comm["rounds"]))
    clients = max(1, len(summary.get("per_client", [])))
    row.update(
        upload_mb_per_round=comm["bytes_up"] / rounds / MB,
        upload_mb_per_client_round=comm["bytes_up"] / rounds / clients / MB,
        total_upload_mb=comm["bytes_up"] / MB,
        total_mb=(comm["bytes_up"] + comm["bytes_down"]) / MB,
        wall_s=summary.get("wall_seconds", summary.get("seconds", np.nan)),
        majority_rate=summary["sanity"].get("majority_rate_weighted", summary["sanity"]["majority_rate"]),
        sanity_warnings=len(summary["sanity"].get("warnings", [])),
        scope=summary.get("algorithm", {}).get("scope", ""),
        num_malicious=(summary.get("adversary") or {}).get("count", 0),
    )
    simulated = summary.get("simulated") or {}
    if simulated:  # the simulated clock on the run's device mix (docs howto/clock.md)
        by_device = simulated.get("by_device") or []
        counts = [d.get("client_rounds", 1) for d in by_device]
        to_95 = simulated.get("time_to_95pct_robust_acc_s")

        def per_client_round(key: str) -> float:  # over every profile's client-rounds
            return float(np.average([d[key] for d in by_device], weights=counts)) if by_device else np.nan

        row.update(
            sim_hours=simulated["hours"],
            sim_round_s=simulated["mean_round_s"],
            sim_compute_s=per_client_round("sim_compute_s"),
            sim_network_s=per_client_round("sim_network_s"),
            sim_time_to_95pct_robust_h=to_95 / SECONDS_PER_HOUR if to_95 is not None else np.nan,
            straggler_client_rounds=simulated.get("straggler_client_rounds", 0),
        )
    return row


def aggregate_seeds(frame: pd.DataFrame) -> pd.DataFrame:
    """Mean and std over seeds per algorithm, in the order the algorithms were asked for."""
    ok = frame[frame["status"] == "ok"]
    numeric = [c for c in ok.columns if c not in TEXT_COLUMNS and not c.startswith(ENV_PREFIX)]
    order = list(dict.fromkeys(frame["algorithm"]))
    grouped = ok.groupby("algorithm", sort=False)[numeric]
    means, stds = grouped.mean(), grouped.std(ddof=1)
    out = means.add_suffix("_mean").join(stds.add_suffix("_std"))
    out["seeds"] = ok.groupby("algorithm", sort=False).size()
    return out.reindex([a for a in order if a in out.index])


def relative_to(agg: pd.DataFrame, reference: str) -> pd.DataFrame:
    """The paper's headline figures against a named reference, on seed means."""
    ref = agg.loc[reference]
    rows = []
    for algorithm, row in agg.iterrows():
        entry: dict[str, Any] = {"algorithm": algorithm}
        up = row["upload_mb_per_round_mean"]
        entry["upload_ratio"] = ref["upload_mb_per_round_mean"] / up if up > 0 else math.inf
        for metric in METRICS:
            a, r = row[f"{metric}_mean"], ref[f"{metric}_mean"]
            entry[f"{metric}_gain_points"] = (a - r) * 100
            entry[f"{metric}_gain_percent"] = (a - r) / r * 100 if r > 0 else math.nan
        rows.append(entry)
    return pd.DataFrame(rows).set_index("algorithm")


def _pm(agg: pd.DataFrame, algorithm: str, column: str, scale: float = 100.0, digits: int = 1) -> str:
    mean, std = agg.loc[algorithm, f"{column}_mean"], agg.loc[algorithm, f"{column}_std"]
    if pd.isna(mean):
        return "-"
    if pd.isna(std):
        return f"{mean * scale:.{digits}f}"
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


def _optional_pm(agg: pd.DataFrame, algorithm: str, column: str, digits: int) -> str:
    """A column only runs with the simulated clock have ('-' without it)."""
    return _pm(agg, algorithm, column, 1.0, digits) if f"{column}_mean" in agg else "-"


def markdown(agg: pd.DataFrame, relative: Optional[pd.DataFrame], reference: Optional[str], context: str) -> str:
    lines = [
        "# Comparison",
        "",
        context,
        "",
        "| algorithm | seeds | clean | PGD | AutoAttack | strongest attack | global clean | global PGD | global AA "
        "| upload MB / round | total MB | sim. round s | sim. hours | wall s | sanity warnings |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    accuracies = (
        "clean_acc",
        "robust_acc",
        "autoattack_acc",
        "strongest_attack_acc",
        "global_clean_acc",
        "global_robust_acc",
        "global_autoattack_acc",
    )
    for algorithm in agg.index:
        cells = [algorithm, str(int(agg.loc[algorithm, "seeds"]))]
        cells += [_pm(agg, algorithm, column) for column in accuracies]
        cells += [
            _pm(agg, algorithm, "upload_mb_per_round", 1.0, 3),
            _pm(agg, algorithm, "total_mb", 1.0, 2),
            _optional_pm(agg, algorithm, "sim_round_s", 2),
            _optional_pm(agg, algorithm, "sim_hours", 3),
            _pm(agg, algorithm, "wall_s", 1.0, 0),
        ]
        cells.append(str(int(agg.loc[algorithm, "sanity_warnings_mean"] * agg.loc[algorithm, "seeds"])))
        lines.append("| " + " | ".join(cells) + " |")
    lines += transfer_markdown(agg)
    floor = agg["majority_rate_mean"].mean()
    if "autoattack_acc_samples_mean" in agg and agg["autoattack_acc_samples_mean"].notna().any():
        lines += [
            "",
            f"AutoAttack (the reference implementation) is measured on {agg['autoattack_acc_samples_mean'].mean():.0f} "
            f"test images per seed (binomial standard error of one seed's figure: "
            f"{agg['autoattack_acc_se_mean'].mean() * 100:.1f} points, mean over algorithms); the strongest-attack "
            "figure (an image is robust only if it survived every attack run on it) on the same images.",
        ]
    lines += [
        "",
        f"Majority-class constant predictor (per client: its most frequent training label; perfectly 'robust'): "
        f"{floor * 100:.1f}% clean = PGD = AutoAttack (sample-weighted, mean over the seeds' partitions).",
        "",
    ]
    if relative is not None and reference is not None:
        lines += [
            f"## Relative to `{reference}`",
            "",
            "| algorithm | upload ratio (ref / alg) | Δ clean pts (%) | Δ PGD pts (%) | Δ AutoAttack pts (%) "
            "| Δ strongest pts (%) |",
            "|---|---|---|---|---|---|",
        ]
        for algorithm, row in relative.iterrows():
            ratio = "no upload" if math.isinf(row["upload_ratio"]) else f"{row['upload_ratio']:.1f}x"
            cells = []
            for metric in METRICS:
                pts, pct = row[f"{metric}_gain_points"], row[f"{metric}_gain_percent"]
                cells.append("-" if pd.isna(pts) else f"{pts:+.1f} ({pct:+.1f}%)")
            lines.append(f"| {algorithm} | {ratio} | {' | '.join(cells)} |")
        lines.append("")
    return "\n".join(lines)


def transfer_markdown(agg: pd.DataFrame) -> list[str]:
    """The transfer attacks' table (runs with evaluation.transfer only): client means, sample-weighted."""
    if "transfer_worst_acc_mean" not in agg:
        return []
    lines = [
        "",
        "Transfer attacks (crafted on the source, scored on each victim's own test split; per source its "
        "stronger attack, peers: mean over peers):",
        "",
        "| algorithm | white-box strongest | public | global | peers | worst transfer | strongest (all) |",
        "|---|---|---|---|---|---|---|",
    ]
    columns = ("strongest_whitebox_acc", *TRANSFER_METRICS[1:], "strongest_attack_acc")
    for algorithm in agg.index:
        cells = [_pm(agg, algorithm, c) if f"{c}_mean" in agg else "-" for c in columns]
        lines.append(f"| {algorithm} | " + " | ".join(cells) + " |")
    return lines


#: Matplotlib's ten default colours; beyond ten algorithms the marker (and bar hatch) changes too,
#: so ``compare``'s default twelve stay distinguishable.
MARKERS = ("o", "s", "^", "D")
HATCHES = ("", "//", "..", "xx")


def _style(index: int) -> dict[str, str]:
    cycle = index // 10 % len(MARKERS)
    return {"color": f"C{index % 10}", "marker": MARKERS[cycle], "hatch": HATCHES[cycle]}


def plot_pareto(out: Path, frame: pd.DataFrame, agg: pd.DataFrame) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 5))
    for index, algorithm in enumerate(agg.index):
        style = _style(index)
        color = style["color"]
        seeds = frame[(frame["algorithm"] == algorithm) & (frame["status"] == "ok")]
        ax.scatter(
            seeds["clean_acc"] * 100, seeds["robust_acc"] * 100, color=color, marker=style["marker"], alpha=0.35, s=18
        )
        ax.errorbar(
            agg.loc[algorithm, "clean_acc_mean"] * 100,
            agg.loc[algorithm, "robust_acc_mean"] * 100,
            xerr=np.nan_to_num(agg.loc[algorithm, "clean_acc_std"] * 100),
            yerr=np.nan_to_num(agg.loc[algorithm, "robust_acc_std"] * 100),
            fmt=style["marker"],
            color=color,
            label=algorithm,
            capsize=3,
        )
    floor = agg["majority_rate_mean"].mean() * 100
    ax.axvline(floor, color="grey", ls=":", lw=1)
    ax.axhline(floor, color="grey", ls=":", lw=1, label="majority-class floor")
    ax.set_xlabel("clean accuracy (%)")
    ax.set_ylabel("PGD accuracy (%)")
    ax.set_title("clean vs robust (mean ± std over seeds; faint: single seeds)")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    save_figure(fig, out / "pareto.png")


def plot_accuracy_vs_upload(out: Path, frame: pd.DataFrame) -> None:
    """Client-mean accuracy after each evaluated round against the bytes uploaded so far (first seed)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharex=True)
    first = frame[frame["status"] == "ok"].groupby("algorithm", sort=False).first()
    for index, (algorithm, row) in enumerate(first.iterrows()):
        rounds_path = Path(row["run_dir"]) / "rounds.csv"
        if not rounds_path.is_file():
            continue
        rounds = pd.read_csv(rounds_path)
        cumulative = rounds["bytes_up"].cumsum() / MB
        for ax, metric in zip(axes, ("clean_acc", "robust_acc")):
            if metric in rounds:
                keep = rounds[metric].notna()
                style = _style(index)
                ax.plot(
                    cumulative[keep],
                    rounds.loc[keep, metric] * 100,
                    marker=style["marker"],
                    markersize=4,
                    color=style["color"],
                    label=algorithm,
                )
    for ax, label in zip(axes, ("clean", "PGD")):
        ax.set_xscale("symlog", linthresh=0.01)
        ax.set_xlabel("cumulative upload (MB, all clients)")
        ax.set_ylabel(f"{label} accuracy (%, client mean)")
    axes[1].legend(fontsize=7)
    fig.suptitle("accuracy vs communication (first seed; no-upload algorithms sit at 0)")
    fig.tight_layout()
    save_figure(fig, out / "accuracy_vs_upload.png")


def plot_per_client(out: Path, frame: pd.DataFrame) -> None:
    """Each client's final PGD accuracy per algorithm, first seed (partitions differ between seeds)."""
    plt = pyplot()
    first = frame[frame["status"] == "ok"].groupby("algorithm", sort=False).first()
    if first.empty:
        return
    per_client = {}
    for algorithm, row in first.iterrows():
        summary = read_json(Path(row["run_dir"]) / "summary.json")
        per_client[algorithm] = {int(r["client"]): r for r in summary["per_client"]}
    clients = sorted({c for rows in per_client.values() for c in rows})
    width = 0.8 / max(1, len(per_client))
    fig, axes = plt.subplots(2, 1, figsize=(max(8, len(clients) * 1.1), 7), sharex=True)
    for ax, metric, label in zip(axes, ("clean_acc", "robust_acc"), ("clean", "PGD")):
        for index, (algorithm, rows) in enumerate(per_client.items()):
            xs = np.arange(len(clients)) + index * width
            ax.bar(
                xs,
                [rows.get(c, {}).get(metric, np.nan) * 100 for c in clients],
                width,
                label=algorithm,
                color=_style(index)["color"],
                hatch=_style(index)["hatch"],
                edgecolor="white",
                linewidth=0,
            )
        majority = [
            next((rows[c]["majority_rate"] for rows in per_client.values() if c in rows), np.nan) * 100 for c in clients
        ]
        ax.scatter(
            np.arange(len(clients)) + 0.4 - width / 2,
            majority,
            marker="_",
            s=300,
            color="black",
            label="majority class",
            zorder=3,
        )
        ax.set_ylabel(f"{label} accuracy (%)")
    axes[1].set_xticks(np.arange(len(clients)) + 0.4 - width / 2, [str(c) for c in clients])
    axes[1].set_xlabel("client (first seed's partition)")
    axes[0].legend(fontsize=6, ncol=7, loc="lower left", bbox_to_anchor=(0.0, 1.02))  # above the bars, not over them
    fig.tight_layout()
    save_figure(fig, out / "per_client.png")


def ran_on(frame: pd.DataFrame) -> str:
    """What the runs ran on (the fields that decide whether figures repeat), one sentence."""
    columns = [c for c in frame.columns if c.startswith(ENV_PREFIX)]
    if not columns:
        return ""
    seen = {c.removeprefix(ENV_PREFIX): sorted({str(v) for v in frame[c].dropna()}) for c in columns}
    parts = [f"{name} {' / '.join(values)}" for name, values in seen.items() if values]
    return " Ran on: " + "; ".join(parts) + " (environment.json of each run)." if parts else ""


def write_report(
    out: Path,
    specs: list[RunSpec],
    summaries: dict[int, dict[str, Any]],
    errors: dict[int, str],
    reference: Optional[str],
) -> pd.DataFrame:
    frame = pd.DataFrame([summary_row(spec, summaries.get(i), errors.get(i)) for i, spec in enumerate(specs)])
    write_table(out / "comparison.csv", frame)
    if not (frame["status"] == "ok").any():
        return frame
    agg = aggregate_seeds(frame)
    relative = relative_to(agg, reference) if reference is not None and reference in agg.index else None
    cfg = specs[0].cfg
    context = (
        f"Dataset {cfg.data.name}, {cfg.data.num_clients} clients, {cfg.data.partition} alpha {cfg.data.alpha}, "
        f"{cfg.federation.rounds} rounds, eps {cfg.attack.eps:g}; "
        f"PGD-{cfg.attack.eval_steps} (step {cfg.attack.eval_step():g}), "
        + (
            f"reference AutoAttack {cfg.attack.autoattack_steps} iterations / Square "
            f"{cfg.attack.autoattack_square_queries} queries on the first {cfg.evaluation.autoattack_max_samples} "
            "test samples per client. "
            if cfg.evaluation.autoattack
            else "AutoAttack off (evaluation.autoattack=false). "
        )
        + "Accuracies in % on each client's own test split, test-sample-weighted (mean ± std over seeds); "
        "'global' = the global model on the global test set (full-model FedAvg only). "
        "Upload: all clients' bytes per round, as serialised (safetensors)." + ran_on(frame)
    )
    if specs[0].threat is not None:
        from sylva_ray.experiments.threat_report import write_threat_report

        context += " Accuracies are the honest clients' only."
        write_threat_report(out, frame, context)
    atomic_write_text(out / "comparison.md", markdown(agg, relative, reference, context))
    plot_pareto(out, frame, agg)
    plot_accuracy_vs_upload(out, frame)
    plot_per_client(out, frame)
    return frame
