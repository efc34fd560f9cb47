"""``sylva-ray partition``: a configuration's split among clients, without training.

Before paying for a run, a researcher wants to see what ``data.partition`` and its alpha or shard
count make of the data: each client's size, the classes it holds and how far its labels are from
the pool's (``method.heterogeneity``). The same split a run would make (same seed, same code),
written as ``partition.json`` and ``partition.png`` into a folder of its own.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import pandas as pd

from sylva_ray.base.config import ConfigError, ExperimentConfig
from sylva_ray.engine.rundir import (
    PARTITION_PLOT,
    new_unique_dir,
    plot_partition,
    resolve_result_path,
    utc_stamp,
    write_table,
)
from sylva_ray.method.data import load_source, make_partition

log = logging.getLogger(__name__)


def show_partition(cfg: ExperimentConfig, out: Optional[Path] = None) -> tuple[pd.DataFrame, Path]:
    """The split's table (one row per client: sizes, classes present, both distances, label counts)
    and the folder holding ``partition.json``, ``partition.csv`` and ``partition.png``."""
    folder = (
        new_unique_dir(resolve_result_path(cfg.output.root), f"partition-{utc_stamp()}-{cfg.name}")
        if out is None
        else resolve_result_path(out)
    )
    if out is not None and folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise ConfigError(
            f"--out {str(folder)!r} exists and is not empty (a run's own partition.json must never be "
            "rewritten); choose a new folder"
        )
    folder.mkdir(parents=True, exist_ok=True)
    source = load_source(cfg.data)
    partition = make_partition(source, cfg.data, cfg.runtime.seed)
    partition.save(folder / "partition.json")
    plot_partition(folder / PARTITION_PLOT, partition)
    info = partition.heterogeneity or {}
    frame = pd.DataFrame(info.get("clients", []))
    frame.insert(2, "train", [len(t) for t in partition.train])
    frame.insert(3, "test", [len(t) for t in partition.test])
    counts = pd.DataFrame(info.get("class_counts", []))
    frame = pd.concat([frame, counts.add_prefix("class_")], axis=1)
    write_table(folder / "partition.csv", frame)
    log.info(
        "%s, %d clients, %s: mean Hellinger %.3f, mean Jensen-Shannon %.3f (%s)",
        cfg.data.name,
        cfg.data.num_clients,
        cfg.data.partition,
        info.get("mean_hellinger", float("nan")),
        info.get("mean_jensen_shannon", float("nan")),
        folder / PARTITION_PLOT,
    )
    return frame, folder
