"""``sylva-ray bench tracking``: what the live tracking costs a run, side by side.

The same configuration (same seed, data and weights) run twice in one session, once with
``tracking.tensorboard`` off and once on, the order alternating over ``--repeats``. Reported per
leg: wall seconds, the tracker's own seconds (``summary.json`` ``seconds_by_stage.tracking``,
timed inside the run around every tracker call), the event files' bytes, and the final figures,
which must not move (tracking only reads what the run computes). The wall-time difference of two
runs is noisy at the second level; the tracker's own seconds are the precise figure.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pandas as pd

from sylva_ray.base.config import ConfigError, ExperimentConfig
from sylva_ray.distributed.launcher import run
from sylva_ray.engine.resolve import build_config
from sylva_ray.engine.tracking import TENSORBOARD_DIR

log = logging.getLogger(__name__)

#: Runs per variant unless ``--repeats`` says otherwise (the CLI's default too).
DEFAULT_REPEATS = 2


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0


def _leg(cfg: ExperimentConfig, tracked: bool, run_dir: Path) -> dict[str, object]:
    """One run of ``cfg`` with TensorBoard on or off (MLflow always off: a server's latency is not
    the tracker's cost), timed as a whole."""
    raw = cfg.to_dict()
    raw["tracking"] = {**raw["tracking"], "tensorboard": tracked, "mlflow_uri": ""}
    leg = build_config(raw)
    run_dir.mkdir(parents=True)
    started = time.perf_counter()
    summary = run(leg, run_dir, progress=False)
    wall = time.perf_counter() - started
    assert summary is not None  # a run without stop_after always finishes
    final = summary["final"]
    return {
        "variant": "tensorboard on" if tracked else "tracking off",
        "wall_s": wall,
        "tracking_s": float(summary["seconds_by_stage"].get("tracking", 0.0)),
        "event_bytes": _folder_bytes(run_dir / TENSORBOARD_DIR),
        "clean_acc": final["clean_acc"],
        "robust_acc": final["robust_acc"],
    }


def bench_tracking(cfg: ExperimentConfig, out: Path, repeats: int = DEFAULT_REPEATS) -> pd.DataFrame:
    """Per leg, then the per-variant means with ``vs_untracked`` (wall ratio) and the tracker's
    share of the tracked run's wall time."""
    if repeats < 1:
        raise ConfigError(f"--repeats {repeats}: give at least 1 (each repeat runs the configuration twice)")
    legs = []
    for repeat in range(repeats):
        for tracked in (False, True) if repeat % 2 == 0 else (True, False):
            row = _leg(cfg, tracked, out / f"{'tracked' if tracked else 'untracked'}-{repeat}")
            log.info("tracking bench: %s, repeat %d: %.1f s", row["variant"], repeat, row["wall_s"])
            legs.append({"repeat": repeat, **row})
    frame = pd.DataFrame(legs)
    means = frame.groupby("variant", sort=False)[["wall_s", "tracking_s", "event_bytes"]].mean().reset_index()
    untracked = float(means.loc[means["variant"] == "tracking off", "wall_s"].iloc[0])
    means["repeat"] = "mean"
    means["vs_untracked"] = means["wall_s"] / untracked
    means["tracking_share"] = means["tracking_s"] / means["wall_s"]
    same = frame.groupby("variant")[["clean_acc", "robust_acc"]].nunique().eq(1).all().all() and (
        frame[["clean_acc", "robust_acc"]].nunique().eq(1).all()
    )
    if not same:
        log.warning("tracking bench: the final figures differ between legs; tracking should not change them")
    return pd.concat([frame, means], ignore_index=True)
