"""The run directory: resolved config, partition, metrics tables, summary, models, plots.

Layout (``runs/<UTC timestamp>-<name>/`` by default, or ``--out DIR``)::

    config.yaml        the resolved configuration (preset + file + overrides)
    partition.json     per-client train/test indices into the private pool
    metrics.csv        one row per round per client (accuracies, loss terms, bytes, seconds)
    rounds.csv         one row per round (client means)
    summary.json       final / phase1 means, communication totals, per-client rows
    models/            each client's final personalised adapter + head (safetensors)
    accuracy.png       clean and robust accuracy over rounds

Every file is written atomically; an existing non-empty directory is never written into.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import pandas as pd

from sylva_ray.config import ExperimentConfig
from sylva_ray.storage import atomic_write_text, atomic_write_with

log = logging.getLogger(__name__)


class RunDirectoryError(FileExistsError):
    """The requested run directory would overwrite earlier results."""


def create_run_dir(cfg: ExperimentConfig, out: str | Path | None = None) -> Path:
    """A new run directory: ``out`` if given (must be absent or empty), else a fresh timestamped one."""
    if out is not None:
        path = Path(out)
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise RunDirectoryError(f"--out {str(path)!r} exists and is not empty; choose a new folder (results are never overwritten)")
    else:
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        path = Path(cfg.output.root) / f"{stamp}-{cfg.name}"
        suffix = 1
        while path.exists():
            suffix += 1
            path = Path(cfg.output.root) / f"{stamp}-{cfg.name}-{suffix}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_config(run_dir: Path, cfg: ExperimentConfig) -> None:
    atomic_write_text(run_dir / "config.yaml", cfg.to_yaml())


def write_table(path: Path, frame: pd.DataFrame) -> None:
    atomic_write_with(path, lambda tmp: frame.to_csv(tmp, index=False))


def write_json(path: Path, payload: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=False, default=float))


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def plot_accuracy(run_dir: Path, rounds: pd.DataFrame) -> Path | None:
    """Client-mean clean and robust accuracy per evaluated round (a person would rather look)."""
    evaluated = rounds.dropna(subset=["clean_acc"])
    if evaluated.empty:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(evaluated["round"], evaluated["clean_acc"], marker="o", label="clean")
    ax.plot(evaluated["round"], evaluated["robust_acc"], marker="s", label="robust")
    if "majority_rate" in evaluated:
        ax.axhline(float(evaluated["majority_rate"].iloc[-1]), color="grey", ls="--", lw=1, label="majority class")
    ax.set_xlabel("round")
    ax.set_ylabel("client-mean accuracy")
    ax.set_ylim(0, 1)
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    target = run_dir / "accuracy.png"
    atomic_write_with(target, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)
    return target
