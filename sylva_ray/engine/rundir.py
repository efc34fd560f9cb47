"""The run directory: resolved config, partition, metrics tables, summary, models, plots.

Layout (``runs/<UTC timestamp>-<name>/`` by default, or ``--out DIR``)::

    config.yaml        the resolved configuration (preset + file + overrides)
    partition.json     per-client train/test indices into the private pool, and each client's
                       label distance from the pool (Hellinger, Jensen-Shannon)
    partition.png      clients x classes label counts at a glance
    environment.json   what the run ran on: versions, CPU, GPUs, the Ray cluster
    tb/                TensorBoard event files (``tensorboard --logdir runs/``)
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
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

import pandas as pd
import yaml

from sylva_ray.base.config import ConfigError, ExperimentConfig
from sylva_ray.base.plots import pyplot, save_figure
from sylva_ray.base.storage import (
    atomic_write_text,
    atomic_write_with,
    remove_orphaned_temp_files,
)
from sylva_ray.engine.resolve import build_config
from sylva_ray.method.data import DataSource, Partition, load_source, make_partition

log = logging.getLogger(__name__)

#: The federation's checkpoint in RUN/checkpoints/ (``engine.federation`` writes it).
CHECKPOINT_NAME = "checkpoint.pt"


class RunDirectoryError(FileExistsError):
    """The requested run directory would overwrite earlier results."""


#: Relative result paths resolve against this folder when it is set (a cluster's head sets it).
HOME_ENV = "SYLVA_RAY_HOME"
#: Where relative result paths land in a ``ray job submit --working-dir`` job if HOME_ENV is unset:
#: the job's working directory is a Ray temp folder, deleted with the session.
JOB_FALLBACK_HOME = Path("~/sylva_ray")


def _ray_temp_root() -> Path:
    return Path(os.environ.get("RAY_TMPDIR", tempfile.gettempdir())).resolve() / "ray"


def results_base() -> Path:
    """The folder relative result paths (``output.root``, ``--out``, a sweep's local storage path)
    are taken from: $SYLVA_RAY_HOME if set, else the current directory unless that is a Ray job's
    temporary working directory (then ``~/sylva_ray``, so results outlive the job)."""
    if os.environ.get(HOME_ENV):
        return Path(os.environ[HOME_ENV]).expanduser().resolve()
    cwd = Path.cwd().resolve()
    if cwd.is_relative_to(_ray_temp_root()):
        log.warning(
            "running inside a Ray job's temporary working directory: results go under %s (set %s to choose)",
            JOB_FALLBACK_HOME,
            HOME_ENV,
        )
        return JOB_FALLBACK_HOME.expanduser().resolve()
    return cwd


def resolve_result_path(path: str | Path) -> Path:
    """An absolute path for results: absolute paths as given, relative ones under ``results_base()``."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else results_base() / path


def create_run_dir(cfg: ExperimentConfig, out: str | Path | None = None) -> Path:
    """A new run directory, always absolute: ``out`` if given (must be absent or empty), else a fresh
    timestamped one under ``output.root`` (relative paths: see ``results_base``)."""
    if out is not None:
        path = resolve_result_path(out)
        if path.is_dir():
            remove_orphaned_temp_files(path)  # a write killed before it finished left only these
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            if (path / "config.yaml").is_file() and not (path / "summary.json").is_file():
                raise RunDirectoryError(
                    f"--out {str(path)!r} holds a run that did not finish; continue it with "
                    f"`sylva-ray resume {path}`, or choose a new folder (results are never overwritten)"
                )
            raise RunDirectoryError(
                f"--out {str(path)!r} exists and is not empty; choose a new folder (results are never overwritten)"
            )
        path.mkdir(parents=True, exist_ok=True)
        return path
    return new_unique_dir(resolve_result_path(cfg.output.root), f"{utc_stamp()}-{cfg.name}")


#: UTC time in folder names: sortable, no characters a shell or a bucket would mind.
STAMP_FORMAT = "%Y%m%d-%H%M%S"


def utc_stamp() -> str:
    return time.strftime(STAMP_FORMAT, time.gmtime())


def new_unique_dir(parent: Path, name: str) -> Path:
    """Create ``parent/name``, or ``name-2``, ``name-3``, ... if taken (never an existing folder)."""
    suffix = 1
    while True:
        path = parent / (name if suffix == 1 else f"{name}-{suffix}")
        try:
            path.mkdir(parents=True, exist_ok=False)
            return path
        except FileExistsError:
            suffix += 1


def write_config(run_dir: Path, cfg: ExperimentConfig) -> None:
    atomic_write_text(run_dir / "config.yaml", cfg.to_yaml())


def write_table(path: Path, frame: pd.DataFrame) -> None:
    atomic_write_with(path, lambda tmp: frame.to_csv(tmp, index=False))


def write_json(path: Path, payload: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=False, default=float))


def write_bookkeeping(path: Path, payload: Callable[[], dict[str, Any]]) -> None:
    """A file *about* the results (``robustbench.json``, ``environment.json``): written like a result,
    but a failure to make it is a warning, never the end of a run whose results are whole."""
    try:
        write_json(path, payload())
    except Exception as exc:  # noqa: BLE001 -- the results come first
        log.warning("%s could not be written (%s: %s); the results are unaffected", path.name, type(exc).__name__, exc)


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def plot_accuracy(
    run_dir: Path, rounds: pd.DataFrame, x: str = "round", xlabel: str = "round", name: str = "accuracy.png"
) -> Path | None:
    """Client-mean clean and robust accuracy per evaluated round (a person would rather look),
    against the round or another column of ``rounds`` (the simulated clock's hours)."""
    evaluated = rounds.dropna(subset=["clean_acc"]) if "clean_acc" in rounds else rounds.iloc[0:0]
    if evaluated.empty or x not in evaluated:
        return None
    fig, ax = pyplot().subplots(figsize=(5, 3.2))
    ax.plot(evaluated[x], evaluated["clean_acc"], marker="o", label="clean")
    ax.plot(evaluated[x], evaluated["robust_acc"], marker="s", label="robust")
    if "majority_rate" in evaluated:
        ax.axhline(float(evaluated["majority_rate"].iloc[-1]), color="grey", ls="--", lw=1, label="majority class")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("client-mean accuracy")
    ax.set_ylim(0, 1)
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, run_dir / name)


def prepare_data(
    cfg: ExperimentConfig, run_dir: Path, resume: bool, source: Optional[DataSource] = None
) -> tuple[DataSource, Partition]:
    """Load the data (unless given); make and save the partition for a new run, reload it when resuming."""
    source = source if source is not None else load_source(cfg.data)
    partition_path = run_dir / "partition.json"
    if resume and partition_path.is_file():
        return source, Partition.load(partition_path, expected_fingerprint=source.fingerprint())
    partition = make_partition(source, cfg.data, cfg.runtime.seed)
    partition.save(partition_path)
    plot_partition(run_dir / PARTITION_PLOT, partition)
    return source, partition


PARTITION_PLOT = "partition.png"
#: Above this many clients the heat map drops its per-cell numbers (they would not be readable).
ANNOTATED_CLIENTS_MAX = 30
#: Figure size in inches: a base plus a share per class (width) or per client (height), capped.
WIDTH_BASE, WIDTH_PER_CLASS, WIDTH_MIN = 1.5, 0.45, 4.5
HEIGHT_BASE, HEIGHT_PER_CLIENT, HEIGHT_MAX = 1.2, 0.28, 12.0
#: Font size of the per-cell counts and the per-client labels; the colour bar's gap from them.
SMALL_FONT, COLORBAR_PAD = 7, 0.25


def plot_partition(path: Path, partition: Partition) -> Optional[Path]:
    """Clients x classes heat map of label counts, each client's size and its Hellinger distance
    from the pool on the right: the split at a glance (a person would rather look)."""
    info = partition.heterogeneity
    if not info:
        return None
    import numpy as np

    counts = np.asarray(info["class_counts"])
    num_clients, num_classes = counts.shape
    size = (
        max(WIDTH_MIN, WIDTH_BASE + WIDTH_PER_CLASS * num_classes),
        min(HEIGHT_MAX, HEIGHT_BASE + HEIGHT_PER_CLIENT * num_clients),
    )
    fig, ax = pyplot().subplots(figsize=size)
    image = ax.imshow(counts, aspect="auto", cmap="viridis")
    if num_clients <= ANNOTATED_CLIENTS_MAX:
        for (row, col), value in np.ndenumerate(counts):
            colour = "white" if value else "grey"
            ax.text(col, row, str(value), ha="center", va="center", fontsize=SMALL_FONT, color=colour)
    ax.set_xlabel("class")
    ax.set_ylabel("client")
    ax.set_xticks(range(num_classes))
    ax.set_yticks(range(num_clients))
    right = ax.secondary_yaxis("right")
    right.set_yticks(range(num_clients))
    right.set_yticklabels([f"n={c['samples']}  H={c['hellinger']:.2f}" for c in info["clients"]], fontsize=SMALL_FONT)
    ax.set_title(
        f"labels per client (mean Hellinger {info['mean_hellinger']:.2f}, JS {info['mean_jensen_shannon']:.2f})",
        fontsize=SMALL_FONT + 2,
    )
    fig.colorbar(image, ax=ax, pad=COLORBAR_PAD, label="samples")
    fig.tight_layout()
    return save_figure(fig, path)


def partition_summary(run_dir: Path) -> Optional[dict[str, Any]]:
    """summary.json's ``partition`` block: the means and each client's size and distances."""
    path = Path(run_dir) / "partition.json"
    info = json.loads(path.read_text()).get("heterogeneity") if path.is_file() else None
    if not info:
        return None
    kept = ("mean_hellinger", "mean_jensen_shannon", "mean_feature_distance", "clients")
    return {k: info[k] for k in kept if k in info}


def load_run_config(run_dir: Path) -> ExperimentConfig:
    """The run's own config.yaml, validated; a missing or unreadable one names the file."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{run_dir}: no config.yaml here; is this a sylva-ray run directory?")
    try:
        raw = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]}); the file is damaged") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected the run's configuration (a YAML mapping); the file is damaged")
    try:
        return build_config(raw)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
