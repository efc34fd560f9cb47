"""Sweep LoRA rank x PGD epsilon x heterogeneity (Dirichlet alpha, plus IID) on the embedded default.

    python sweeps/rank_eps.py                                  # 3 ranks x 3 eps x 3 heterogeneity levels
    python sweeps/rank_eps.py --smoke-test                     # a tiny grid in well under a minute
    python sweeps/rank_eps.py --grid lora.rank=4,8 --heterogeneity 0.1,iid --scheduler asha
    python sweeps/rank_eps.py --grid loss.similarity_weight=0,0.5,1 --set federation.rounds=5
    python sweeps/rank_eps.py --storage-path s3://bucket/sylva --address auto     # on a cluster
    python sweeps/rank_eps.py --resume --name rank_eps                          # Tuner.restore

Writes, next to Tune's own results (``STORAGE_PATH/NAME/``): ``trials.csv`` (one row per trial:
its parameters and final metrics) and plots: robust and clean accuracy against rank and against
eps (one line per heterogeneity level) and the robustness-accuracy trade-off.
"""

from __future__ import annotations

import argparse
import logging
import sys

from sylva_ray.cli import EXIT_INTERRUPTED, explain
from sylva_ray.distributed.connect import connect
from sylva_ray.distributed.tune import parse_grid, run_sweep, validate_sweep
from sylva_ray.engine.resolve import load_config
from sylva_ray.engine.rundir import resolve_result_path
from sylva_ray.experiments.sweep_report import heterogeneity_axis, write_report

log = logging.getLogger("sweeps.rank_eps")

DEFAULT_GRID = ["lora.rank=4,8,16", "attack.eps=0.03,0.05,0.1"]
DEFAULT_HETEROGENEITY = "0.1,1.0,iid"
SMOKE_GRID = ["lora.rank=2,4"]
SMOKE_HETEROGENEITY = "0.5"
SMOKE_OVERRIDES = [
    "federation.rounds=2",
    "data.num_clients=3",
    "layer_selection.coalition_steps=2",
    "layer_selection.finetune_steps=2",
    "attack.eval_max_samples=16",
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="default")
    parser.add_argument("--config", dest="config_file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument(
        "--grid",
        action="append",
        default=None,
        metavar="FIELD=V1,V2",
        help=f"a swept field (repeatable); default {' '.join(DEFAULT_GRID)}",
    )
    parser.add_argument(
        "--heterogeneity",
        default=None,
        help=f"Dirichlet alphas and/or 'iid', comma-separated (default {DEFAULT_HETEROGENEITY})",
    )
    parser.add_argument("--samples", type=int, default=1, help="repeats of every grid point")
    parser.add_argument("--scheduler", choices=["none", "asha"], default="none")
    parser.add_argument("--concurrency", type=int, default=None, help="max concurrent trials (default: what fits)")
    parser.add_argument("--storage-path", default="runs/sweeps", help="local folder or s3://bucket/prefix")
    parser.add_argument("--name", default="rank_eps")
    parser.add_argument(
        "--resume", action="store_true", help="continue the experiment STORAGE_PATH/NAME (Tuner.restore)"
    )
    parser.add_argument("--address", default=None, help="Ray cluster to join (default: a local cluster)")
    parser.add_argument("--smoke-test", action="store_true", help="a tiny grid on the smoke preset (what CI runs)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return sweep(args)
    except KeyboardInterrupt:  # Tune saved the experiment's state; say how to go on, no traceback
        log.error("interrupted; `python sweeps/rank_eps.py --resume` (same --name and --storage-path) goes on")
        return EXIT_INTERRUPTED
    except Exception as exc:  # a user's error is one line and exit code 2, as with sylva-ray
        message = explain(exc)
        if message is None:
            raise
        log.error("%s", message)
        return 2


def sweep(args: argparse.Namespace) -> int:
    preset = "smoke" if args.smoke_test else args.preset
    overrides = (SMOKE_OVERRIDES if args.smoke_test else []) + list(args.overrides)
    base = load_config(preset, args.config_file, overrides)
    grid = parse_grid(args.grid or (SMOKE_GRID if args.smoke_test else DEFAULT_GRID))
    axes = {
        "heterogeneity": heterogeneity_axis(
            args.heterogeneity or (SMOKE_HETEROGENEITY if args.smoke_test else DEFAULT_HETEROGENEITY)
        )
    }
    # Relative local paths land under $SYLVA_RAY_HOME (set on the cluster's head), else the current folder.
    storage = args.storage_path if "://" in args.storage_path else str(resolve_result_path(args.storage_path))
    validate_sweep(base, grid, axes, name=args.name, storage_path=storage, resume=args.resume)  # before Ray starts
    connect(args.address)
    table = run_sweep(
        base,
        grid,
        axes,
        name=args.name,
        storage_path=storage,
        samples=args.samples,
        scheduler=args.scheduler,
        concurrency=args.concurrency,
        resume=args.resume,
    )
    out = write_report(table, storage, args.name)
    log.info("%d trials; table and plots in %s", len(table), out)
    sys.stdout.write(table.to_string(index=False) + "\n")
    return 0 if (table["status"] == "OK").all() else 1


if __name__ == "__main__":
    sys.exit(main())
