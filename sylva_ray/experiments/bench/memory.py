"""``sylva-ray bench memory``: estimated accelerator memory of one client actor
(``sylva_ray.method.cost``): activation bytes measured on the CPU, scaled to the batch; the given
config and the ``paper`` preset.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from sylva_ray.base.config import ExperimentConfig
from sylva_ray.engine.resolve import load_config
from sylva_ray.method.cost import algorithm_needs_benign, estimate_actor_memory
from sylva_ray.method.data import known_inputs, load_source

#: The ``paper`` preset's alternatives the memory table sets side by side: (train batch, eval batch, precision).
PAPER_MEMORY_VARIANTS = [(64, 256, "fp32"), (64, 128, "fp32"), (32, 64, "fp32"), (32, 64, "bf16")]


def bench_memory(cfg: ExperimentConfig, out: Path) -> pd.DataFrame:
    """Estimated accelerator memory per client actor (``sylva_ray.method.cost``): the configuration
    given, then the ``paper`` preset and the batch/precision alternatives around it."""

    def inputs(c: ExperimentConfig) -> tuple[tuple[int, int, int], int]:
        known = known_inputs(c.data.name)  # the dataset's files may not be on this machine
        if known is not None:
            return known.image_shape, known.num_classes
        source = load_source(c.data)
        return source.image_shape, source.num_classes

    needs_benign = algorithm_needs_benign(cfg)
    rows = [{"config": "given", **estimate_actor_memory(cfg, *inputs(cfg), needs_benign=needs_benign)}]
    for train_batch, eval_batch, precision in PAPER_MEMORY_VARIANTS:
        paper = load_config(
            "paper",
            overrides=[
                f"train.batch_size={train_batch}",
                f"train.eval_batch_size={eval_batch}",
                f"runtime.precision={precision}",
            ],
            check_paths=False,
        )
        rows.append({"config": "paper", **estimate_actor_memory(paper, *inputs(paper), needs_benign=True)})
    return pd.DataFrame(rows)
