"""What the driver makes of the transfer attacks' rows: ``transfer.csv``, ``transfer_matrix.png``
(victims x sources) and each victim's figures for ``summary.json`` (per source kind and the worst)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from sylva_ray.base.plots import pyplot, save_figure
from sylva_ray.engine.rundir import write_table
from sylva_ray.method.transfer import transfer_label, worst_transfer

TRANSFER_FILE, MATRIX_FILE = "transfer.csv", "transfer_matrix.png"
#: transfer.csv's columns, in order (an empty table keeps them).
COLUMNS = ("victim", "source", "kind", "attacker", "attack", "samples", "accuracy", "se", "source_detail")
#: Per-victim figures; accuracies are each source's worst attack (peers: the mean over peers of it).
FIGURES = ("transfer_public_acc", "transfer_global_acc", "transfer_peers_acc", "transfer_worst_acc")


def victim_figures(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One victim's transfer figures from its rows: per source kind the accuracy under the source's
    stronger attack (``peers``: the mean over peers; ``transfer_worst_peer_acc``: the worst peer),
    the worst (source, attack) over all, and on how many images (the evaluation attack's subset)."""
    if not rows:
        return {}
    frame = pd.DataFrame(list(rows))
    per_source = frame.groupby(["kind", "source"], sort=False)["accuracy"].min().reset_index()
    figures: dict[str, Any] = {"num_transfer": int(frame["samples"].iloc[0])}
    for kind, group in per_source.groupby("kind", sort=False):
        figures[f"transfer_{kind}_acc"] = float(group["accuracy"].mean())
        if kind == "peers":
            figures["transfer_worst_peer_acc"] = float(group["accuracy"].min())
    accuracies = {transfer_label(str(r.source), str(r.attack)): float(r.accuracy) for r in frame.itertuples()}
    figures["transfer_worst_source"], figures["transfer_worst_acc"] = worst_transfer(accuracies)
    return figures


#: The sources' order in tables and plots: the outsider's model first, then the insiders'.
KIND_ORDER = {"public": 0, "global": 1, "peers": 2}


def transfer_frame(rows: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    frame = pd.DataFrame(list(rows), columns=list(COLUMNS))
    frame["_kind"] = frame["kind"].map(KIND_ORDER)
    ordered = frame.sort_values(["victim", "_kind", "attacker", "attack"], kind="stable")
    return ordered.drop(columns="_kind").reset_index(drop=True)


def write_transfer_outputs(out_dir: Path, rows: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """``transfer.csv`` and ``transfer_matrix.png`` in ``out_dir``; returns the table."""
    frame = transfer_frame(rows)
    write_table(out_dir / TRANSFER_FILE, frame)
    if not frame.empty:
        plot_matrix(out_dir / MATRIX_FILE, frame)
    return frame


def _source_order(frame: pd.DataFrame) -> list[str]:
    sources = frame[["source", "kind", "attacker"]].drop_duplicates("source")
    ranked = sorted(
        sources.itertuples(index=False), key=lambda s: (KIND_ORDER.get(s.kind, len(KIND_ORDER)), s.attacker or 0)
    )
    return [s.source for s in ranked]


def plot_matrix(path: Path, frame: pd.DataFrame) -> None:
    """Victims x sources, one panel per attack; colour and number = the victim's accuracy on the
    images crafted on the source (a blank cell: the victim is the source, or it was not attacked)."""
    plt = pyplot()
    attacks = list(dict.fromkeys(frame["attack"]))
    sources, victims = _source_order(frame), sorted(frame["victim"].unique())
    width = 1.5 + 0.45 * len(sources)
    fig, axes = plt.subplots(
        1,
        len(attacks),
        figsize=(width * len(attacks) + 1.0, 2.0 + 0.35 * len(victims)),
        squeeze=False,
        layout="constrained",  # room for the rotated source names and the shared colour bar
    )
    image = None
    for ax, attack in zip(axes[0], attacks):
        grid = (
            frame[frame["attack"] == attack]
            .pivot(index="victim", columns="source", values="accuracy")
            .reindex(index=victims, columns=sources)
        )
        image = ax.imshow(grid.to_numpy(float), cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
        if len(victims) * len(sources) <= MAX_ANNOTATED_CELLS:
            for (i, j), value in np.ndenumerate(grid.to_numpy(float)):
                if not np.isnan(value):
                    ax.text(j, i, f"{100 * value:.0f}", ha="center", va="center", fontsize=6, color="white")
        ax.set_xticks(range(len(sources)), sources, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(len(victims)), [str(v) for v in victims], fontsize=7)
        ax.set_xlabel("source (where the attack was crafted)")
        ax.set_ylabel("victim")
        ax.set_title(f"{attack}: victim accuracy")
    if image is not None:
        fig.colorbar(image, ax=list(axes[0]), label="accuracy")
    save_figure(fig, path)


#: Cells up to which the matrix prints each accuracy (beyond, the numbers would overlap).
MAX_ANNOTATED_CELLS = 600
