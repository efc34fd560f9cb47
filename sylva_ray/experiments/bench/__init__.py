"""``sylva-ray bench``: figures measured side by side in one run, reported as ratios.

One module per bench; ``BENCHES`` names them, each with its one-line help, whether it takes
``--repeats`` and where its function lives. The command line builds its choices and its help from
it. This module imports no bench (nor torch): a bench's module loads when the bench runs.

Every bench's table is also written as CSV under ``--out`` (default ``runs/bench-<which>-<timestamp>``).
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from sylva_ray.base.registry import Registry

if TYPE_CHECKING:
    import pandas as pd

    from sylva_ray.base.config import ExperimentConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Bench:
    """One bench: its name on the command line, a one-line help, and its runner.

    ``runner`` is ``"module:function"`` (the module relative to this package), imported when the
    bench runs. The runner of a bench is called ``runner(cfg, out, **options)`` and returns its
    table, except for a bench with ``fresh_processes``: it measures fresh child processes from a
    parent that imports no torch, so it is given the configuration's sources instead, ``runner(preset,
    config_file, overrides, out, repeats)``, and writes its own tables.
    """

    name: str
    help: str
    runner: str
    #: Takes ``--repeats``: the bench runs its variants alternately, that many times each.
    repeated: bool = False
    #: Costs a configuration without reading its data or weights (``--preset paper`` works anywhere).
    path_free: bool = False
    #: Reads ``--run``: a finished run's final models instead of the configured pre-trained model.
    takes_run: bool = False
    #: Measures fresh child processes and resolves the configuration in them (see above).
    fresh_processes: bool = False

    def load(self) -> Callable[..., "pd.DataFrame"]:
        """The bench's function (its module is imported here)."""
        module, _, function = self.runner.partition(":")
        return getattr(importlib.import_module(module, __name__), function)

    def __call__(self, *args: Any, **kwargs: Any) -> "pd.DataFrame":
        return self.load()(*args, **kwargs)


BENCHES: Registry[Bench] = Registry("bench")


def register(bench: Bench) -> Bench:
    """Add ``bench`` to ``BENCHES`` under its name (a second bench of the same name is an error)."""
    return BENCHES.register(bench.name)(bench)


register(
    Bench(
        "comm",
        "bytes of one LoRA upload vs one full-model upload (the configured model, ViT-B/16)",
        ".comm:bench_comm",
    )
)
register(
    Bench(
        "engine",
        "Phase-1 rounds: a plain in-process loop vs the Ray engine with 1 and 2 actors",
        ".engine:bench_engine",
    )
)
register(
    Bench(
        "scale",
        "1,000 virtual clients at 5% participation: seconds and memory per round",
        ".scale:bench_scale",
    )
)
register(
    Bench(
        "phase2",
        "Shapley top-k vs Phase 1 only, head only, random k, last k, all layers on one run",
        ".phase2:bench_phase2",
    )
)
register(
    Bench(
        "estimator",
        "Shapley estimators vs the exact values of real 8-player games, at equal budgets",
        ".estimator:bench_estimator",
    )
)
register(
    Bench(
        "memory",
        "estimated accelerator memory per client actor: this config and the paper preset",
        ".memory:bench_memory",
        path_free=True,
    )
)
register(
    Bench(
        "clock",
        "simulated round time of Sylva vs FAT on device mixes, without training",
        ".clock:bench_clock",
        path_free=True,
    )
)
register(
    Bench(
        "startup",
        "cold start and memory in fresh processes: plain loop vs Ray with 1 and 2 actors",
        ".startup:bench_startup",
        repeated=True,
        fresh_processes=True,
    )
)
register(
    Bench(
        "autoattack",
        "where AutoAttack's time goes: its model passes vs a plain loop and the GEMM rate",
        ".autoattack:bench_autoattack",
        takes_run=True,
    )
)
register(
    Bench(
        "data",
        "an image source loaded three ways: torchvision float32, uint8 parallel, cached",
        ".data:bench_data",
    )
)
register(
    Bench(
        "tracking",
        "a run with TensorBoard tracking off and on, alternately: seconds, event bytes",
        ".tracking:bench_tracking",
        repeated=True,
    )
)
register(
    Bench(
        "pretrain",
        "embedded pre-training of the pico ViT and its 8-block variant: seconds, size",
        ".pretrain:bench_pretrain",
    )
)
register(
    Bench(
        "transfer",
        "the final protocol with transfer attacks off and on, alternately: its seconds",
        ".transfer:bench_transfer",
        repeated=True,
    )
)


def run_bench(which: str, cfg: "ExperimentConfig", out: Path | None = None, **options: object) -> "pd.DataFrame":
    """Run one bench into ``out`` (a new folder by default); ``options`` go to the bench (``run_dir``
    for ``autoattack``, ``repeats`` for the repeated ones)."""
    from sylva_ray.engine.rundir import new_unique_dir, resolve_result_path, utc_stamp, write_table
    from sylva_ray.engine.tracking import log_table

    bench = BENCHES.get(which)
    if bench.fresh_processes:
        raise ValueError(f"bench {which} resolves its configuration in fresh processes: run `sylva-ray bench {which}`")
    if out is None:
        out = new_unique_dir(resolve_result_path(cfg.output.root), f"bench-{which}-{utc_stamp()}")
    else:
        out = resolve_result_path(out)
        out.mkdir(parents=True, exist_ok=True)
    frame = bench(cfg, out, **options)
    write_table(out / f"bench_{which}.csv", frame)
    log_table(out, f"bench_{which}", frame)
    log.info("bench %s written to %s", which, out / f"bench_{which}.csv")
    return frame
