"""``sylva-ray bench scale``: 1,000 virtual clients at 5% participation on the tiny model: seconds
per round and the driver's / client actors' resident memory per round (flat = no growth with
rounds).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from sylva_ray.base.config import ExperimentConfig
from sylva_ray.engine.resolve import build_config
from sylva_ray.experiments.bench.engine import ray_rounds

log = logging.getLogger(__name__)

#: The scale benchmark's shape: 1,000 virtual clients, 5% of them per round.
SCALE_CLIENTS, SCALE_PARTICIPATION = 1000, 0.05


def bench_scale(cfg: ExperimentConfig, out: Path) -> pd.DataFrame:
    """1,000 virtual clients, 5% per round, synthetic 8x8 data, the tiny ViT, 2 local steps."""
    base = cfg.to_dict()
    base["data"].update(
        name="synthetic",
        num_clients=SCALE_CLIENTS,
        partition="iid",
        synthetic_num_samples=20000,
        min_samples_per_client=10,
        max_samples=None,
    )
    base["model"].update(pretrain_epochs=5)
    base["federation"].update(participation=SCALE_PARTICIPATION)
    base["train"].update(local_steps=2)
    base["attack"].update(train_steps=2)
    scale_cfg = build_config(base)
    _, seconds, rows = ray_rounds(scale_cfg, actors=scale_cfg.runtime.num_actors or 2)
    frame = pd.DataFrame(rows)[["round", "participants", "seconds", "driver_rss_mb", "actor_rss_mb_max"]]
    frame["round"] += 1
    log.info("scale: %d rounds in %.1fs", len(rows), seconds)
    return frame.round(2)
