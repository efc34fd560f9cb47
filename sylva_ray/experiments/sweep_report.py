"""Tables and plots of a sweep (pandas + matplotlib), written where the sweep's results live.

The storage path may be a local folder or a URI such as ``s3://bucket/prefix``: files are made in
a local temporary folder and copied with ``pyarrow.fs`` (the file-system layer Ray Tune itself
uses), so the table and plots land next to Tune's results either way.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd

from sylva_ray.base.config import ConfigError
from sylva_ray.base.plots import pyplot, save_figure
from sylva_ray.base.storage import atomic_write_bytes

log = logging.getLogger(__name__)


def heterogeneity_axis(spec: str) -> dict[str, dict[str, Any]]:
    """``"0.1,1.0,iid"`` -> level name -> field overrides (Dirichlet label skew, or IID)."""
    axis: dict[str, dict[str, Any]] = {}
    for level in (part.strip() for part in spec.split(",") if part.strip()):
        if level == "iid":
            axis[level] = {"data.partition": "iid"}
            continue
        try:
            alpha = float(level)
        except ValueError:
            raise ConfigError(f"--heterogeneity {level!r}: use Dirichlet alphas (> 0) and/or 'iid'") from None
        if alpha <= 0:
            raise ConfigError(f"--heterogeneity {level!r}: a Dirichlet alpha must be > 0")
        axis[level] = {"data.partition": "dirichlet", "data.alpha": alpha}
    if not axis:
        raise ConfigError("--heterogeneity is empty")
    return axis


def _score_columns(table: pd.DataFrame) -> tuple[str, str]:
    """Final (after Phase 2) scores when the trials got that far, else the last round's."""
    if "final_robust_acc" in table and table["final_robust_acc"].notna().any():
        return "final_clean_acc", "final_robust_acc"
    return "clean_acc", "robust_acc"


def plot_sweep(table: pd.DataFrame, folder: Path) -> list[Path]:
    plt = pyplot()
    clean, robust = _score_columns(table)
    written = []
    group = "heterogeneity" if "heterogeneity" in table else None
    for axis_field in [c for c in ("lora.rank", "attack.eps") if c in table]:
        fig, axes = plt.subplots(1, 2, figsize=(8, 3.2), sharey=True)
        for ax, metric in zip(axes, (robust, clean)):
            for level, rows in table.groupby(group) if group else [("all", table)]:
                means = rows.groupby(axis_field)[metric].mean()
                ax.plot(means.index, means.values, marker="o", label=f"{group}={level}" if group else None)
            ax.set_xlabel(axis_field)
            ax.set_title(metric)
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("client-mean accuracy")
        if group:
            axes[0].legend(fontsize=8)
        fig.tight_layout()
        written.append(save_figure(fig, folder / f"accuracy_vs_{axis_field.split('.')[-1]}.png"))
    fig, ax = plt.subplots(figsize=(4.5, 3.5))
    for level, rows in table.groupby(group) if group else [("all", table)]:
        ax.scatter(rows[clean], rows[robust], label=f"{group}={level}" if group else None)
    ax.set_xlabel(f"{clean} (benign)")
    ax.set_ylabel(f"{robust} (PGD)")
    ax.set_title("robustness-accuracy trade-off")
    ax.grid(alpha=0.3)
    if group:
        ax.legend(fontsize=8)
    fig.tight_layout()
    written.append(save_figure(fig, folder / "tradeoff.png"))
    return written


def write_report(table: pd.DataFrame, storage_path: str, name: str) -> str:
    """``trials.csv`` and the plots into ``storage_path/name`` (local or a pyarrow-supported URI)."""
    target = f"{storage_path.rstrip('/')}/{name}"
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        table.to_csv(folder / "trials.csv", index=False)
        plot_sweep(table, folder)
        if "://" not in storage_path:
            destination = Path(target)
            destination.mkdir(parents=True, exist_ok=True)
            for file in folder.iterdir():
                atomic_write_bytes(destination / file.name, file.read_bytes())
            return str(destination)
        import pyarrow.fs as pafs

        filesystem, root = pafs.FileSystem.from_uri(target)
        filesystem.create_dir(root, recursive=True)
        for file in folder.iterdir():
            with filesystem.open_output_stream(f"{root}/{file.name}") as stream:
                stream.write(file.read_bytes())
        return target
