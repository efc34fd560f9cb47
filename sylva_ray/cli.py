"""The ``sylva-ray`` entry point: parse the command line, resolve the configuration, run the command.

Each command imports what it runs when it runs (``sylva-ray config`` loads neither Ray nor the
launcher); that is the only reason for the imports inside the functions below. The text users
read (``sylva-ray --help`` and each command's) is in ``build_parser``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

from sylva_ray.base.config import PRESETS, ExperimentConfig
from sylva_ray.base.errors import USER_ERRORS, named_user_error
from sylva_ray.experiments.bench import BENCHES

if TYPE_CHECKING:
    from sylva_ray.experiments.compare import ThreatGrid

log = logging.getLogger("sylva_ray")


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="default", choices=sorted(PRESETS), help="named starting configuration")
    parser.add_argument("--config", dest="config_file", help="YAML file applied on top of the preset")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one field, e.g. --set federation.rounds=5 (repeatable)",
    )


def _config_from(
    args: argparse.Namespace, overrides: Optional[list[str]] = None, check_paths: bool = True
) -> ExperimentConfig:
    from sylva_ray.engine.resolve import load_config  # the registries import torch: a second or two

    return load_config(
        args.preset, args.config_file, args.overrides if overrides is None else overrides, check_paths=check_paths
    )


def _launch_overrides(args: argparse.Namespace) -> list[str]:
    """``--set`` values, then ``--address`` and ``--dashboard`` (flags for the two launch settings)."""
    launch = [f"runtime.address={args.address}"] if args.address else []
    return [*args.overrides, *launch, *(["runtime.dashboard=true"] if args.dashboard else [])]


def _report(run_dir: object, summary: dict) -> int:
    final = summary["final"]
    figures = [f"clean {final['clean_acc']:.4f}", f"PGD {final['robust_acc']:.4f}"]
    for key, name in (
        ("autoattack_acc", "AutoAttack"),
        ("transfer_worst_acc", "worst transfer attack"),
        ("strongest_attack_acc", "strongest attack"),
    ):
        if key in final:
            figures.append(f"{name} {final[key]:.4f} ± {final[f'{key}_se']:.4f} (n={final[f'{key}_samples']})")
    log.info("final client means: %s (%s)", ", ".join(figures), run_dir)
    print(json.dumps({"run_dir": str(run_dir), **summary["final"]}))
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from sylva_ray.distributed.connect import check_before_start
    from sylva_ray.distributed.launcher import run
    from sylva_ray.engine.rundir import create_run_dir

    overrides = _launch_overrides(args)
    cfg = _config_from(args, overrides)
    check_before_start(cfg, torch_free=True)  # before the run directory exists; this process stays torch-free
    run_dir = create_run_dir(cfg, args.out)
    log.info("run directory: %s", run_dir)
    args.interrupted = lambda: _interrupted_run(run_dir)
    return _report(run_dir, run(cfg, run_dir))


def _cmd_resume(args: argparse.Namespace) -> int:
    from sylva_ray.distributed.launcher import resume

    args.interrupted = lambda: _interrupted_run(args.run_dir)
    return _report(args.run_dir, resume(args.run_dir, address=args.address, dashboard=args.dashboard or None))


def _interrupted_run(run_dir: Path) -> str:
    """Where an interrupted run stands, read from what it wrote (its last checkpoint is whole)."""
    from sylva_ray.engine.checkpoint import FederationState, checkpoint_path

    if (Path(run_dir) / "summary.json").is_file():
        return f"interrupted after {run_dir} was complete; its results are whole"
    checkpoint = checkpoint_path(run_dir)
    try:
        state = FederationState.load(checkpoint) if checkpoint.is_file() else None
    except Exception:  # a damaged checkpoint is resume's to name, not this message's
        state = None
    where = f"in round {state.next_round + 1}" if state is not None else "before round 1 finished"
    return f"interrupted {where}; `sylva-ray resume {run_dir}` continues"


def _cmd_phase2(args: argparse.Namespace) -> int:
    from sylva_ray.distributed.launcher import run_phase2

    args.interrupted = lambda: f"interrupted; {args.run_dir} is untouched: run `sylva-ray phase2` again"
    out, summary = run_phase2(args.run_dir, args.overrides, args.address)
    return _report(out, summary)


def _cmd_config(args: argparse.Namespace) -> int:
    sys.stdout.write(_config_from(args).to_yaml())
    return 0


def _cmd_partition(args: argparse.Namespace) -> int:
    from sylva_ray.experiments.partition_view import show_partition

    frame, _ = show_partition(_config_from(args), args.out)
    sys.stdout.write(frame.round(3).to_string(index=False) + "\n")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from sylva_ray.engine.resolve import raw_config
    from sylva_ray.engine.rundir import resolve_result_path, utc_stamp
    from sylva_ray.experiments.compare import run_comparison
    from sylva_ray.method.algorithms import default_comparison

    overrides = _launch_overrides(args)
    out = resolve_result_path(args.out or Path("runs") / f"compare-{utc_stamp()}")  # --out again resumes it
    algorithms = (
        [a.strip() for a in args.algorithms.split(",") if a.strip()]
        if args.algorithms is not None
        else default_comparison()
    )
    raw = raw_config(args.preset, args.config_file, overrides)
    threat = _threat_grid(args, raw)
    args.interrupted = lambda: (
        f"interrupted; finished runs are kept in {out}: the same command with --out {out} goes on"
    )
    run_comparison(
        raw,
        algorithms,
        args.seeds,
        out,
        reference=args.reference,
        actors_per_run=args.actors_per_run,
        max_parallel=args.max_parallel,
        threat=threat,
    )
    log.info("comparison written to %s", out)
    sys.stdout.write((out / ("threat.md" if threat is not None else "comparison.md")).read_text())
    return 0


def _cmd_room(args: argparse.Namespace) -> int:
    from sylva_ray.base.config import ConfigError
    from sylva_ray.engine.resolve import raw_config
    from sylva_ray.experiments.room import check_room

    raw = raw_config(args.preset, args.config_file, args.overrides)
    try:
        rates = [float(x) for x in _comma_list(args.lrs)] if args.lrs else None
    except ValueError:
        raise ConfigError(f"--lrs {args.lrs!r}: give comma-separated numbers, e.g. --lrs 0.05,0.01") from None
    result = check_room(raw, args.seeds, Path(args.out) if args.out else None, args.threshold, rates)
    sys.stdout.write(json.dumps({k: v for k, v in result.items() if k != "setting"}, indent=2, default=str) + "\n")
    return 0


def _cmd_study(args: argparse.Namespace) -> int:
    from sylva_ray.engine.resolve import raw_config
    from sylva_ray.engine.rundir import resolve_result_path, utc_stamp
    from sylva_ray.experiments.study import DEFAULT_ALGORITHMS, DEFAULT_SETTINGS, run_study

    out = resolve_result_path(args.out or Path("runs") / f"study-{utc_stamp()}")
    raw = raw_config(args.preset, args.config_file, _launch_overrides(args))
    args.interrupted = lambda: (
        f"interrupted; finished runs are kept in {out}: the same command with --out {out} goes on"
    )
    run_study(
        raw,
        _comma_list(args.settings) if args.settings is not None else list(DEFAULT_SETTINGS),
        _comma_list(args.algorithms) if args.algorithms is not None else list(DEFAULT_ALGORITHMS),
        args.seeds,
        out,
        baseline=args.baseline or None,
        actors_per_run=args.actors_per_run,
        max_parallel=args.max_parallel,
    )
    sys.stdout.write((out / "study.md").read_text())
    return 0


#: The default threat grid: no attack, then 10, 20 and 30% malicious clients.
DEFAULT_THREAT_FRACTIONS = (0.0, 0.1, 0.2, 0.3)


def _comma_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _threat_grid(args: argparse.Namespace, raw: dict[str, Any]) -> Optional["ThreatGrid"]:
    """A threat sweep when any of --aggregations/--behaviours/--fractions is given; the others
    default to the config's aggregation, its adversary behaviour, and 0, 10, 20, 30%."""
    from sylva_ray.base.config import ConfigError
    from sylva_ray.experiments.compare import ThreatGrid

    if args.aggregations is None and args.behaviours is None and args.fractions is None:
        return None
    try:
        fractions = (
            [float(f) for f in _comma_list(args.fractions)]
            if args.fractions is not None
            else list(DEFAULT_THREAT_FRACTIONS)
        )
    except ValueError:
        raise ConfigError(f"--fractions {args.fractions!r}: give comma-separated numbers, e.g. 0,0.1,0.2,0.3") from None
    return ThreatGrid(
        aggregations=_comma_list(args.aggregations)
        if args.aggregations is not None
        else [raw.get("federation", {}).get("aggregation", "balltree")],
        behaviours=_comma_list(args.behaviours)
        if args.behaviours is not None
        else [raw.get("adversary", {}).get("behaviour", "sign_flip")],
        fractions=fractions,
    )


def _cmd_bench(args: argparse.Namespace) -> int:
    from sylva_ray.base.config import ConfigError
    from sylva_ray.experiments.bench import run_bench

    bench = BENCHES.get(args.which)
    if args.run is not None and not bench.takes_run:
        readers = " or ".join(
            f"`sylva-ray bench {name}`" for name in BENCHES.registered() if BENCHES.get(name).takes_run
        )
        raise ConfigError(f"--run is read by {readers} only, not by `bench {args.which}`")
    if bench.fresh_processes:  # measures fresh processes from a parent that imports no torch
        frame = bench(args.preset, args.config_file, args.overrides, args.out, args.repeats)
        sys.stdout.write(frame.to_string(index=False) + "\n")
        return 0
    if args.run is not None:
        if args.preset != "default" or args.config_file or args.overrides:
            raise ConfigError(
                "--run attacks the run's models with the run's own configuration: leave out --preset, --config "
                "and --set (or leave out --run to bench a configuration's pre-trained model)"
            )
        run_dir, cfg = _finished_run(Path(args.run))
        frame = run_bench(args.which, cfg, args.out, run_dir=run_dir)
    else:
        cfg = _config_from(args, check_paths=not bench.path_free)
        options = {"repeats": args.repeats} if bench.repeated else {}
        frame = run_bench(args.which, cfg, args.out, **options)
    sys.stdout.write(frame.to_string(index=False) + "\n")
    return 0


def _cmd_doctor(args: argparse.Namespace) -> int:
    from sylva_ray.experiments.doctor import run_doctor, to_text

    cfg = _config_from(args, check_paths=False)  # the doctor checks this machine, not the data's paths
    frame, code = run_doctor(cfg, args.address, args.against)
    sys.stdout.write(to_text(frame) + "\n")
    return code


def _finished_run(run_dir: Path) -> tuple[Path, ExperimentConfig]:
    """A run directory (or a ``sylva-ray phase2`` result folder) with its config and every client's
    final model, and its config: checked before any work starts (``bench autoattack --run``)."""
    from sylva_ray.base.config import ConfigError
    from sylva_ray.engine.rundir import load_run_config
    from sylva_ray.experiments.api import phase1_dir

    cfg = load_run_config(run_dir)  # names the folder when it holds no readable config.yaml
    models = phase1_dir(run_dir) / "models"
    missing = [c for c in range(cfg.data.num_clients) if not (models / f"client_{c:04d}.safetensors").is_file()]
    if missing:
        raise ConfigError(
            f"--run {run_dir}: no final model of clients {missing[:5]} under {models}; give a finished run "
            "(output.save_models on), or leave --run out to bench the configuration's pre-trained model"
        )
    return run_dir, cfg


#: ``sylva-ray --help``: what the tool does, then the commands a researcher runs first.
DESCRIPTION = """\
Simulate personalized federated adversarial fine-tuning of pre-trained vision models on Ray:
Sylva (CCS 2025) and the baselines it is judged against, from a laptop to a GPU cluster.

Phase 1 fine-tunes LoRA adapters adversarially across clients; Phase 2 scores each client's layers
by Shapley values and tailors one model per client. Every command that takes --preset, --config
and --set resolves the configuration the same way: the preset, then the file, then each --set."""

EXAMPLES = """\
examples:
  - sylva-ray run --preset smoke                  # a complete run on a laptop, in under a minute
  - sylva-ray run                                 # the default run: digits, 10 clients, a pico ViT
  - sylva-ray run --set federation.rounds=5 --out runs/five-rounds
  - sylva-ray config --preset paper               # the resolved configuration; nothing runs
  - sylva-ray doctor --preset paper --address HEAD:6379   # can this cluster run the paper preset?
  - sylva-ray resume RUN_DIR                      # continue an interrupted run from its checkpoint
  - sylva-ray phase2 RUN_DIR --set layer_selection.top_k=1   # Phase 2 again, into a new folder
  - sylva-ray compare --algorithms sylva,fat,fedtrades,local_at --seeds 3 --reference fat
  - sylva-ray compare --algorithms sylva-no_phase2 --aggregations fedavg,krum --behaviours alie
  - sylva-ray study --seeds 3 --out runs/study    # the comparison over kinds of heterogeneity
  - sylva-ray partition --preset shift            # the split among clients, without training
  - sylva-ray bench comm                          # a benchmark; sylva-ray bench --help lists them
  - python sweeps/rank_eps.py                     # a Ray Tune sweep (a script, not a command)

Each command's own options and examples: sylva-ray COMMAND --help."""

ADDRESS_HELP = "join a running Ray cluster (host:port, ray://host:port or auto)"
DASHBOARD_HELP = "start Ray's dashboard with the local cluster (off by default)"


def _command(
    sub: "argparse._SubParsersAction[argparse.ArgumentParser]",
    name: str,
    summary: str,
    description: str,
    examples: Sequence[str] = (),
) -> argparse.ArgumentParser:
    """A subcommand with its one-line ``summary`` (in ``sylva-ray --help``), its ``description``
    and examples (in ``sylva-ray NAME --help``), laid out as written."""
    epilog = "examples:\n" + "\n".join(f"  - {line}" for line in examples) if examples else None
    return sub.add_parser(
        name,
        help=summary,
        description=description,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def bench_list() -> str:
    """Every registered bench with its one-line help, in the registry's order."""
    width = max(len(name) for name in BENCHES.registered())
    return "\n".join(f"  - {name:<{width}}  {BENCHES.get(name).help}" for name in BENCHES.registered())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sylva-ray",
        description=DESCRIPTION,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="how much to log (default INFO)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = _command(
        sub,
        "run",
        "run one experiment into a new run directory",
        "Run one experiment: Phase 1 (federated adversarial fine-tuning of LoRA adapters), Phase 2\n"
        "(each client's layers chosen by a Shapley game, then tailored) and the final evaluation.\n"
        "Writes a new run directory (summary.json, per-round tables, plots, models, checkpoints) and\n"
        "prints the run directory and the final client means as one line of JSON.",
        [
            "sylva-ray run --preset smoke",
            "sylva-ray run --config my.yaml --set federation.rounds=5 --out runs/five-rounds",
            "sylva-ray run --preset paper --address auto",
        ],
    )
    _add_config_options(run)
    run.add_argument("--out", help="run directory (must be new or empty); default runs/<timestamp>-<name>")
    run.add_argument("--address", help=ADDRESS_HELP)
    run.add_argument("--dashboard", action="store_true", help=DASHBOARD_HELP)
    run.set_defaults(handler=_cmd_run)

    again = _command(
        sub,
        "resume",
        "continue an interrupted run from its last checkpoint",
        "Continue an interrupted run from its last checkpoint, with the configuration it was started\n"
        "with. A run interrupted with Ctrl-C names this command.",
        ["sylva-ray resume RUN_DIR", "sylva-ray resume RUN_DIR --address HEAD:6379   # on another cluster"],
    )
    again.add_argument("run_dir", type=Path, help="the interrupted run's directory")
    again.add_argument("--address", help=ADDRESS_HELP)
    again.add_argument("--dashboard", action="store_true", help=DASHBOARD_HELP)
    again.set_defaults(handler=_cmd_resume)

    tailor = _command(
        sub,
        "phase2",
        "run Phase 2 alone on a finished Phase-1 run, into RUN_DIR/phase2-<timestamp>/",
        "Run Phase 2 alone (the layer game, tailoring and the final evaluation) on the Phase-1 models\n"
        "of a finished run, into a new folder RUN_DIR/phase2-<timestamp>/; the run itself is left as\n"
        "it is. --set changes Phase 2's settings for this time, e.g. the layers kept or the estimator.",
        [
            "sylva-ray phase2 RUN_DIR --set layer_selection.top_k=1",
            "sylva-ray phase2 RUN_DIR --set layer_selection.selection=random",
        ],
    )
    tailor.add_argument("run_dir", type=Path, help="a finished run's directory")
    tailor.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a field for this Phase 2, e.g. --set layer_selection.top_k=1",
    )
    tailor.add_argument("--address", help="join a running Ray cluster")
    tailor.set_defaults(handler=_cmd_phase2)

    show = _command(
        sub,
        "config",
        "print the resolved configuration",
        "Print the configuration a run would use, resolved from --preset, --config and --set, as YAML.\n"
        "Nothing runs and no data is read.",
        ["sylva-ray config --preset paper", "sylva-ray config --set data.alpha=0.5 > my.yaml"],
    )
    _add_config_options(show)
    show.set_defaults(handler=_cmd_config)

    split = _command(
        sub,
        "partition",
        "show how a configuration splits the data among clients (sizes, classes, label skew), without training",
        "Show how a configuration splits the data among clients (sizes, classes, label skew) without\n"
        "training: a table on the terminal, and partition.json/.csv/.png under --out.",
        ["sylva-ray partition --preset shift", "sylva-ray partition --set data.alpha=0.1 --out runs/split-alpha0.1"],
    )
    _add_config_options(split)
    split.add_argument("--out", help="folder for partition.json/.csv/.png (default runs/partition-<timestamp>-<name>)")
    split.set_defaults(handler=_cmd_partition)

    compare = _command(
        sub,
        "compare",
        "run algorithms x seeds on the same partitions; write comparison.csv/.md and plots",
        "Run algorithms x seeds on the same partitions, in parallel as the cluster allows, and write\n"
        "comparison.csv/.md and plots. Finished runs are kept: the same command with the same --out\n"
        "goes on where an interrupted comparison stopped. Any of --aggregations, --behaviours and\n"
        "--fractions makes it a threat sweep against malicious clients instead (threat.csv/.md/.png).",
        [
            "sylva-ray compare --algorithms sylva,fat,fedtrades,local_at --seeds 3 --reference fat --out runs/cmp",
            "sylva-ray compare --algorithms sylva-no_phase2 --aggregations fedavg,balltree,median,krum "
            "--behaviours sign_flip,alie",
        ],
    )
    _add_config_options(compare)
    compare.add_argument(
        "--algorithms",
        help="comma-separated algorithm names; sylva takes ablation suffixes, e.g. sylva-no_phase2 "
        "(default: every registered algorithm and Sylva's ablations)",
    )
    compare.add_argument("--seeds", type=int, default=3, help="seeds per algorithm: runtime.seed, +1, ... (default 3)")
    compare.add_argument("--reference", help="algorithm the relative figures are computed against, e.g. fat")
    compare.add_argument(
        "--out", help="comparison folder (new, or an earlier comparison to resume); default runs/compare-<timestamp>"
    )
    compare.add_argument("--address", help=ADDRESS_HELP)
    compare.add_argument(
        "--actors-per-run",
        type=int,
        default=1,
        help="client actors per run (runs go in parallel as the cluster allows)",
    )
    compare.add_argument(
        "--max-parallel", type=int, help="cap on runs at once (default: as many as the cluster's resources hold)"
    )
    compare.add_argument("--dashboard", action="store_true", help=DASHBOARD_HELP)
    room = _command(
        sub,
        "room",
        "pooled vs local-only adversarial training on a configuration's split: does the data leave "
        "collaboration room to help? (no federated method is run)",
        "Train adversarially on all clients' data pooled and on each client's data alone, on a\n"
        "configuration's split, and say whether pooling gains --threshold robust points: whether the\n"
        "data leaves collaboration room to help. No federated method is run. Writes room.csv/.json.",
        ["sylva-ray room --preset shift --lrs 0.05,0.01", "sylva-ray room --seeds 3"],
    )
    _add_config_options(room)
    room.add_argument("--seeds", type=int, default=1, help="seeds: runtime.seed, +1, ... (default 1)")
    room.add_argument(
        "--threshold", type=float, default=5.0, help="robust points pooled must gain over local (default 5)"
    )
    room.add_argument(
        "--lrs", help="comma-separated learning rates; each arm is judged at its best (default: train.lr alone)"
    )
    room.add_argument("--out", help="folder for room.csv/.json (new; default runs/room-<timestamp>-<name>)")
    room.set_defaults(handler=_cmd_room, preset="shift")

    study = _command(
        sub,
        "study",
        "compare the same algorithms and seeds over kinds of heterogeneity; write study.csv/.md/.png",
        "Compare the same algorithms and seeds over several kinds of heterogeneity (iid, Dirichlet\n"
        "label skew alpha<A>, domain shift, and '+'-joined combinations of them), with paired\n"
        "differences against a baseline; writes study.csv/.md/.png. Resumable like compare.",
        ["sylva-ray study --seeds 3 --out runs/study", "sylva-ray study --settings iid,alpha0.1,shift --seeds 1"],
    )
    _add_config_options(study)
    study.add_argument(
        "--settings",
        default=None,
        help="comma-separated settings, each '+'-joined parts: iid, alpha<A>, shift (default: the five of docs "
        "results/benchmark.md)",
    )
    study.add_argument(
        "--algorithms",
        default=None,
        help="comma-separated algorithm names (default: sylva,sylva-no_phase2,fedavg_lora_at,local_at,fat)",
    )
    study.add_argument("--seeds", type=int, default=3, help="seeds per algorithm and setting (default 3)")
    study.add_argument(
        "--baseline", default="local_at", help="algorithm the paired differences are taken against ('' for none)"
    )
    study.add_argument(
        "--out", help="study folder (new, or an earlier study to resume); default runs/study-<timestamp>"
    )
    study.add_argument("--address", help=ADDRESS_HELP)
    study.add_argument("--actors-per-run", type=int, default=1, help="client actors per run")
    study.add_argument("--max-parallel", type=int, help="cap on runs at once")
    study.add_argument("--dashboard", action="store_true", help="start Ray's dashboard with the local cluster")
    study.set_defaults(handler=_cmd_study, preset="shift")

    threat = compare.add_argument_group(
        "threat sweep", "any of these runs algorithms x aggregations x (behaviour x fraction) x seeds instead"
    )
    threat.add_argument("--aggregations", help="comma-separated federation.aggregation rules, e.g. fedavg,krum")
    threat.add_argument("--behaviours", help="comma-separated adversary.behaviour names, e.g. sign_flip,alie")
    threat.add_argument("--fractions", help="comma-separated malicious fractions (default 0,0.1,0.2,0.3)")
    compare.set_defaults(handler=_cmd_compare)

    bench = _command(
        sub,
        "bench",
        "measured side-by-side benchmarks",
        "Measure figures side by side in one session and report them as ratios. Each bench's table\n"
        "is printed and written as CSV under --out. The benches:\n\n" + bench_list(),
        [
            "sylva-ray bench comm",
            "sylva-ray bench memory --preset paper",
            "sylva-ray bench phase2 --set runtime.seed=1 --set evaluation.autoattack=false",
            "sylva-ray bench startup --repeats 3 --out runs/startup",
            "sylva-ray bench autoattack --run RUN_DIR",
        ],
    )
    bench.add_argument(
        "which",
        nargs="?",
        default="comm",
        choices=BENCHES.registered(),
        metavar="BENCH",
        help="the bench to run, one of those listed above (default comm)",
    )
    bench.add_argument("--out", help="folder for the bench CSV (default runs/bench-<which>-<timestamp>)")
    bench.add_argument(
        "--repeats",
        type=int,
        default=2,
        help="startup: fresh processes per variant; tracking, transfer: runs per variant; run alternately (default 2)",
    )
    bench.add_argument(
        "--run",
        help="autoattack: a finished run (or phase2 folder) whose final model of the client with the most "
        "AutoAttack images is attacked (default: the configured pre-trained model)",
    )
    _add_config_options(bench)
    bench.set_defaults(handler=_cmd_bench)

    doctor = _command(
        sub,
        "doctor",
        "check that a run of this configuration can start here: libraries, cache, disk, Ray, GPUs",
        "Check that a run of this configuration can start here (libraries, cache, disk, Ray, GPUs)\n"
        "before paying for the machines; with --against, whether a run's figures should repeat here.\n"
        "Exits non-zero when a check fails.",
        [
            "sylva-ray doctor --preset smoke",
            "sylva-ray doctor --preset paper --address HEAD:6379",
            "sylva-ray doctor --against RUN_DIR",
        ],
    )
    _add_config_options(doctor)
    doctor.add_argument(
        "--address", help="check this running Ray cluster (host:port, ray://host:port or auto) instead of a local one"
    )
    doctor.add_argument(
        "--against",
        metavar="RUN",
        help="a run directory: say whether its figures should repeat here (from its environment.json)",
    )
    doctor.set_defaults(handler=_cmd_doctor)
    return parser


def explain(exc: BaseException) -> Optional[str]:
    """The user-facing message inside ``exc``, also when Ray wrapped it (a task's error arrives as
    ``RayTaskError`` with the original as ``cause``; an actor's failed constructor only as the text
    of an ``ActorDiedError``, from which the last named user error is taken)."""
    for candidate in (getattr(exc, "cause", None), exc):
        if candidate is None:
            continue
        names = {cls.__name__ for cls in type(candidate).__mro__}
        if names & set(USER_ERRORS) or isinstance(candidate, (FileExistsError, ConnectionError)):
            return str(candidate.args[0]) if candidate.args else str(candidate)
    named = named_user_error(str(exc))
    return named[1] if named else None


#: The shell's exit status for a process ended by Ctrl-C (128 + SIGINT).
EXIT_INTERRUPTED = 130


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.handler(args)
    except KeyboardInterrupt:  # Ctrl-C: one line saying what to do next, not a traceback from inside Ray
        message = getattr(args, "interrupted", lambda: "interrupted")()
        log.error("%s", message)
        return EXIT_INTERRUPTED
    except Exception as exc:
        message = explain(exc)
        if message is None:
            raise
        log.error("%s", message)
        return 2


if __name__ == "__main__":
    sys.exit(main())
