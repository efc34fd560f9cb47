"""One measured process of ``sylva-ray bench startup``: a run's Phase-1 rounds, from a cold start.

    python -m sylva_ray.experiments.bench.startup_child --variant plain|ray --actors N --events FILE
        --out RUN_DIR --config FILE

It does what ``sylva-ray run`` does up to the end of Phase 1 -- resolve the config, check it before
any work, create the run directory, load the data, build the model(s), run the rounds with their
checkpoints -- with ``plain`` on the in-process engine (one process, no Ray: the plain loop) and
``ray`` on the Ray engine with ``--actors`` client actors. Rounds skip evaluation, so every variant
does the same training and aggregation. After each round it appends ``{"round": r, "unix_s": t}`` to
``--events`` (one JSON object per line) with the CPU seconds every process of this tree had used by
then: the parent reads the first aggregated model's time, the steady rounds and the CPU from it.
Imports happen inside ``main`` so the process pays for them after its clock started, as a user's does.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Optional, Sequence

import psutil


def process_kind(process: psutil.Process, root_pid: int) -> str:
    """A readable name for one process of the tree: Ray titles its workers ``ray::<Class>.<method>``."""
    if process.pid == root_pid:
        return "main process"
    cmdline = process.cmdline()  # psutil.Error if it exited: the caller skips it
    name = process.name()
    title = cmdline[0] if cmdline else name
    if title.startswith("ray::"):
        return title.split()[0].split(".")[0]  # ray::ClientActor, ray::DriverActor, ray::IDLE
    scripts = [Path(arg).name for arg in cmdline[1:] if arg.endswith(".py")]
    return scripts[0].removesuffix(".py") if scripts else Path(title).name


def cpu_by_process(root_pid: int) -> dict[str, float]:
    """User + system CPU seconds so far of every process under ``root_pid``, summed per kind."""
    root = psutil.Process(root_pid)
    seconds: dict[str, float] = {}
    for process in [root, *root.children(recursive=True)]:
        try:
            kind, times = process_kind(process, root_pid), process.cpu_times()
        except psutil.Error:  # exited meanwhile
            continue
        seconds[kind] = seconds.get(kind, 0.0) + times.user + times.system
    return seconds


def _event(path: Path, unix_s: float, **fields: object) -> None:
    with path.open("a") as handle:
        handle.write(json.dumps({**fields, "unix_s": unix_s}) + "\n")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sylva_ray.experiments.bench.startup_child")
    parser.add_argument("--variant", choices=["plain", "ray"], required=True)
    parser.add_argument("--actors", type=int, default=0)
    parser.add_argument("--events", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--config", required=True)
    args = parser.parse_args(argv)

    from sylva_ray.distributed.connect import check_before_start
    from sylva_ray.engine.resolve import load_config
    from sylva_ray.engine.rundir import create_run_dir, write_config

    engine = ["runtime.engine=inprocess"] if args.variant == "plain" else [f"runtime.num_actors={args.actors}"]
    cfg = load_config(config_file=args.config, overrides=engine)
    check_before_start(cfg, torch_free=args.variant == "ray")  # as `sylva-ray run` does
    run_dir = create_run_dir(cfg, args.out)
    write_config(run_dir, cfg)

    def rounds(session: object) -> None:
        for r in range(cfg.federation.rounds):
            session.run_round(evaluate=False)  # type: ignore[attr-defined]
            ended = time.time()
            # Where the CPU went, by this round's end: cheap reads (/proc/<pid>/stat) of every process,
            # exact where the parent's sampler (at the lowest priority) may be seconds late.
            _event(args.events, ended, round=r, cpu_s_by_process=cpu_by_process(os.getpid()))

    if args.variant == "plain":
        from sylva_ray.engine.federation import Federation
        from sylva_ray.engine.jobs import InProcessExecutor
        from sylva_ray.engine.rundir import prepare_data

        source, partition = prepare_data(cfg, run_dir, resume=False)
        rounds(Federation(cfg, run_dir, InProcessExecutor(cfg, source, partition)))
    else:
        from sylva_ray.distributed.launcher import remote_federation

        with remote_federation(cfg, run_dir, progress=False) as federation:
            rounds(federation)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
