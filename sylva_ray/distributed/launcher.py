"""Launching a run from the main process: start or join Ray, start the client actors and the driver
actor, drive it.

    run(cfg, run_dir)             a new run (the run directory is new or empty)
    resume(run_dir)               continue from the run's last checkpoint, with the run's own config
    run_phase2(run_dir, ...)      Phase 2 alone on a finished run, into a new sub-folder

A Ray run's launching process holds no torch, timm or peft: configuration, the checks that need
none, the data (numpy), the partition and the run directory stay here; the model checks run in a
short-lived child (``engine.preflight``), the driver actor stages the pre-trained weights while
the client actors import torch, and the client actors build their models. The driver actor is
pinned to this node (the run directory is on this node's disk); the engine's runner
(``engine.runner.drive``) calls it round by round, then Phase 2, then the summary. With
``runtime.engine = inprocess`` the same ``Federation`` runs here without Ray (and with torch).
No math here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional

from sylva_ray.base.config import ConfigError, ExperimentConfig, ModelConfig, apply_overrides
from sylva_ray.base.storage import remove_orphaned_temp_files
from sylva_ray.distributed.connect import (
    check_before_start,
    check_local_device,
    cluster_can_grow,
    connect,
)
from sylva_ray.distributed.placement import plan_pool
from sylva_ray.engine.environment import ENVIRONMENT_FILE, environment_record, write_environment
from sylva_ray.engine.resolve import address_problem, build_config
from sylva_ray.engine.robustbench import ROBUSTBENCH_FILE, robustbench_record
from sylva_ray.engine.rundir import (
    CHECKPOINT_NAME,
    load_run_config,
    new_unique_dir,
    partition_summary,
    prepare_data,
    read_json,
    utc_stamp,
    write_bookkeeping,
    write_config,
    write_json,
)
from sylva_ray.engine.runner import drive
from sylva_ray.engine.tracking import RunTracker
from sylva_ray.method.data import DataSource, load_source

if TYPE_CHECKING:  # imported when a Ray run starts: an in-process run never loads Ray
    from sylva_ray.distributed.actors import ActorClasses, DriverHandle
    from sylva_ray.engine.checkpoint import FederationState
    from sylva_ray.engine.federation import Federation

log = logging.getLogger(__name__)
#: ``model.pretrained`` value for a backbone at its seeded random init: nothing to stage, since every
#: client draws the same init itself (``method.models.seeded_create``), and the driver needs no timm.
NO_PRETRAINED_WEIGHTS = "none"


def run(
    cfg: ExperimentConfig,
    run_dir: Path,
    *,
    resume: bool = False,
    state: Optional[FederationState] = None,
    stop_after: Optional[int] = None,
    progress: bool = True,
    actor_classes: Optional[ActorClasses] = None,
) -> Optional[dict[str, Any]]:
    """Run (or continue) Phase 1 into ``run_dir``; returns the summary, or None if stopped early.

    ``stop_after`` ends the session after that many rounds in total, as an interruption would
    (the checkpoint is written after every round); ``actor_classes``: the Ray engine's actor classes
    (None: a run's own; a test passes its subclasses).
    """
    if not resume:
        write_config(run_dir, cfg)
    elif state is None:  # the caller has not read the checkpoint: read (and check) it here, once
        from sylva_ray.engine.checkpoint import check_resumable

        state = check_resumable(run_dir, cfg)
    if cfg.runtime.engine == "inprocess":
        from sylva_ray.engine.runner import LocalSession

        check_local_device(cfg)
        federation = local_federation(cfg, run_dir, resume, state, record_in=run_dir)
        if not progress:
            from sylva_ray.engine.progress import SilentBar

            federation.progress_bar = SilentBar
        try:
            return drive(LocalSession(federation), cfg, run_dir, stop_after, progress)
        finally:
            federation.close()

    with remote_federation(cfg, run_dir, resume, state, progress=progress, actor_classes=actor_classes) as federation:
        log.info("driver ready: %d client actors for %d clients", federation.status["actors"], cfg.data.num_clients)
        return drive(federation, cfg, run_dir, stop_after, progress)


def local_federation(
    cfg: ExperimentConfig,
    run_dir: Path,
    resume: bool,
    state: Optional[FederationState],
    record_in: Path,
    track: bool = True,
) -> Federation:
    """The in-process engine's federation (torch in this process): data, weights and clients here."""
    from sylva_ray.engine.federation import Federation
    from sylva_ray.engine.jobs import InProcessExecutor

    source, partition = prepare_data(cfg, run_dir, resume)
    executor = InProcessExecutor(cfg, source, partition)
    record_environment(record_in, lambda: environment_record(str(executor.worker.device)))
    log.info("pre-trained weights ready in %.1fs", executor.worker.pretraining_seconds)
    federation = Federation(cfg, run_dir, executor, state=state, track=track)
    federation.pretraining_seconds = executor.worker.pretraining_seconds
    return federation


@dataclass(frozen=True)
class StagedInputs:
    """The data and the pre-trained backbone, read once where the run starts and shared through
    Ray's object store: no other node needs the data folder, the weight file or hub access."""

    source: Any  # ray.ObjectRef of a DataSource
    backbone: Any  # ray.ObjectRef of the backbone's state dict (numpy arrays; bf16 stays a tensor)
    pretraining_seconds: float = 0.0  # getting the weights: pre-training on the public slice, or reading them


def stage_inputs(cfg: ExperimentConfig, source: Optional[DataSource] = None) -> StagedInputs:
    """Load the data (unless given) and get the pre-trained weights in this process; ``ray.put`` both
    once. For a Tune sweep, whose trials share them (this process then holds torch); a run's own
    launcher leaves the weights to its driver actor (``remote_federation``)."""
    import ray

    from sylva_ray.distributed.staging import staged_backbone

    source = source if source is not None else load_source(cfg.data)
    backbone, seconds = staged_backbone(cfg, source)
    return StagedInputs(source=ray.put(source), backbone=ray.put(backbone), pretraining_seconds=seconds)


@contextlib.contextmanager
def remote_federation(
    cfg: ExperimentConfig,
    run_dir: Path,
    resume: bool = False,
    state: Optional[FederationState] = None,
    staged: Optional[StagedInputs] = None,
    progress: bool = True,
    track: bool = True,
    record_in: Optional[Path] = None,
    actor_classes: Optional[ActorClasses] = None,
) -> Iterator[DriverHandle]:
    """A driver actor on this node (or in bundle 0 of a Tune trial's placement group), torn down
    with its client actors on exit.

    What runs here, in the main process (which holds no torch), cheapest check first: the GPU
    policy on the nodes there are; the data is read, put in the object store once and the partition
    written (``staged`` when a Tune sweep already did, weights included). Then the driver actor
    starts and stages the pre-trained weights while the client-actor pool is planned (waiting for
    an autoscaler if the cluster can grow: GPU nodes cost from here on) and the client actors start
    and import torch; last, the driver takes the actors over. ``track``: the run's live figures and
    ``environment.json`` go into ``run_dir`` (off when the federation only serves a Phase 2
    re-run); ``record_in``: where ``environment.json`` goes instead (a Phase 2 re-run's own folder);
    ``actor_classes``: the driver's and the client actors' Ray classes (None: ``ActorClasses()``).
    """
    import ray
    from ray.util.placement_group import get_current_placement_group
    from ray.util.scheduling_strategies import (
        NodeAffinitySchedulingStrategy,
        PlacementGroupSchedulingStrategy,
    )

    from sylva_ray.distributed.actors import (
        ActorClasses,
        DriverHandle,
        main_process_log_level,
        start_client_actors,
    )
    from sylva_ray.distributed.capacity import (
        acquire_pool,
        alive_nodes,
        bundles_of,
        check_gpus,
        check_trial_gpus,
        release_request,
    )

    connect(cfg.runtime.address, cfg.runtime.dashboard)
    group = get_current_placement_group()  # set inside a Tune trial: everything goes into its bundles
    if group is None:
        check_gpus(cfg, alive_nodes())
    # The data next: a bad folder fails here, before GPU nodes are paid for.
    if staged is None:
        source, partition = prepare_data(cfg, run_dir, resume)
        source_ref = ray.put(source)
    else:
        _, partition = prepare_data(cfg, run_dir, resume, source=ray.get(staged.source))
        source_ref = staged.source
    if group is not None:
        where = PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=0)
    else:
        where = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    log_level = main_process_log_level()
    classes = actor_classes or ActorClasses()
    driver, actors, requested = None, [], False
    try:
        driver = classes.driver.options(scheduling_strategy=where).remote(
            cfg, str(run_dir), state, log_level, progress, track
        )
        if staged is not None:
            backbone_ref, pretraining_seconds = staged.backbone, staged.pretraining_seconds
        elif cfg.model.pretrained == NO_PRETRAINED_WEIGHTS:  # every client draws the same seeded init itself
            backbone_ref, pretraining_seconds = None, 0.0
        else:  # the driver gets the weights (torch, timm) while the pool is planned and the clients import
            backbone_ref, pretraining_seconds = driver.stage_backbone.options(num_returns=2).remote(
                source_ref, absolute_paths(cfg.model)
            )
        if group is not None:
            bundles = bundles_of(group)  # fixed by the trial; without GPUs in them, the GPU share is moot
            plan = plan_pool(
                bundles, cfg.runtime.client_resources, cfg.data.num_clients, len(bundles), drop_gpu_without_gpus=True
            )
            check_trial_gpus(cfg, plan, group)  # the sweep checked the GPUs alive at its start; these are where it runs
        else:
            plan, requested = acquire_pool(cfg, cluster_can_grow(), progress=progress)
        actors = start_client_actors(
            cfg, plan, source_ref, partition, backbone_ref, group, log_level, actor_class=classes.client
        )
        # The driver and its actors are up here, or the first error (the weights', an actor's) surfaces.
        ray.get(driver.start.remote(actors, plan, pretraining_seconds))
        federation = DriverHandle(driver)
        if track or record_in is not None:
            record_environment(record_in or run_dir, lambda: cluster_environment(actors))
        if requested:
            release_request()  # the actors hold their resources now
        yield federation
    finally:
        if requested:
            release_request()
        if driver is not None:
            try:
                ray.get(driver.shutdown.remote())
            except Exception:  # the driver may already be gone; nothing to clean then
                pass
            with contextlib.suppress(Exception):
                ray.kill(driver)
        for actor in actors:  # also when the driver never started; one failed kill must not skip the rest
            with contextlib.suppress(Exception):
                ray.kill(actor, no_restart=True)


def resume(
    run_dir: Path,
    address: Optional[str] = None,
    stop_after: Optional[int] = None,
    progress: bool = True,
    dashboard: Optional[bool] = None,
) -> dict[str, Any]:
    """Continue an interrupted run from its last checkpoint; a finished run just returns its summary
    (after rewriting its tables from the checkpoint if they were damaged)."""
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    if address is not None:
        problem = address_problem(address)
        if problem:
            raise ConfigError(f"--address {address!r}: {problem}")
        cfg.runtime.address = address
    if dashboard is not None:
        cfg.runtime.dashboard = dashboard
    from sylva_ray.engine.checkpoint import check_resumable, restore_tables

    state = check_resumable(run_dir, cfg)
    for orphan in remove_orphaned_temp_files(run_dir):
        log.info("removed %s, left by a write that was killed", orphan)
    if (run_dir / "summary.json").is_file():
        if state is not None:
            restore_tables(run_dir, state)
        log.info("%s is already complete", run_dir)
        return read_json(run_dir / "summary.json")
    check_before_start(cfg)
    if state is None:
        log.info("%s has no checkpoint yet: starting it from round 1", run_dir)
    return run(cfg, run_dir, resume=True, state=state, stop_after=stop_after, progress=progress)


def run_phase2(run_dir: Path, overrides: list[str], address: Optional[str] = None) -> tuple[Path, dict[str, Any]]:
    """Phase 2 alone on a finished Phase-1 run, with its own overrides, into a *new* folder
    ``RUN_DIR/phase2-<UTC timestamp>/`` (config.yaml, shapley.csv, summary.json, plots, models);
    the original results are never touched."""
    run_dir = Path(run_dir)
    base = load_run_config(run_dir)
    raw = apply_overrides(base.to_dict(), list(overrides))
    if address is not None:
        raw["runtime"]["address"] = address
    raw["layer_selection"]["enabled"] = True
    cfg = build_config(raw)
    check_before_start(cfg)  # before the new folder exists
    if not (run_dir / "checkpoints" / CHECKPOINT_NAME).is_file() or not (run_dir / "summary.json").is_file():
        raise ConfigError(
            f"{run_dir}: Phase 1 has not finished here (no summary.json/checkpoint); run or resume it first"
        )
    from sylva_ray.engine.checkpoint import check_resumable

    state = check_resumable(run_dir, base)
    out = new_unique_dir(run_dir, f"phase2-{utc_stamp()}")
    write_config(out, cfg)
    (out / "phase1_run.txt").write_text(str(run_dir.resolve()) + "\n")
    if cfg.runtime.engine == "inprocess":
        result = local_federation(cfg, run_dir, True, state, record_in=out, track=False).run_phase2(out)
    else:
        with remote_federation(cfg, run_dir, resume=True, state=state, track=False, record_in=out) as federation:
            result = federation.run_phase2(out)
    phase1 = read_json(run_dir / "summary.json")["phase1"]
    summary = {
        "phase1_run": str(run_dir.resolve()),
        "phase1": phase1,
        "phase2": result["means"],
        "final": result["means"],
        "selected_layers": result["selected"],
        "evaluations": result["evaluations"],
        "seconds": result["seconds"],
        "seconds_by_stage": result["seconds_by_stage"],
        "per_client": result["per_client"],
    }
    tracker = RunTracker(cfg, out)
    tracker.log_phase2(result, out)
    tracker.finish(summary)
    summary["seconds_by_stage"] = {**summary["seconds_by_stage"], "tracking": tracker.seconds}
    summary["environment"] = ENVIRONMENT_FILE
    summary["partition"] = partition_summary(run_dir)
    write_bookkeeping(out / ROBUSTBENCH_FILE, lambda: robustbench_record(cfg, summary))
    write_json(out / "summary.json", summary)
    tracker.publish()
    return out, summary


def absolute_paths(model: ModelConfig) -> ModelConfig:
    """``model.checkpoint`` and ``model.cache_dir`` resolved against this process's working folder,
    for the driver actor that reads them from Ray's (the run's config.yaml keeps what was given)."""
    return dataclasses.replace(
        model,
        checkpoint=str(Path(model.checkpoint).resolve()) if model.checkpoint else model.checkpoint,
        cache_dir=str(Path(model.cache_dir).resolve()) if model.cache_dir else model.cache_dir,
    )


def cluster_environment(actors: list[Any]) -> dict[str, Any]:
    """This process's record, the cluster's nodes, and what each client actor computes on (its
    device, the GPUs it sees, its threads, torch's build), read back from the actors themselves:
    this process holds no torch."""
    import ray

    from sylva_ray.distributed.capacity import cluster_record

    runtimes = ray.get([actor.runtime.remote() for actor in actors])
    device = runtimes[0]["device"] if runtimes else None
    compute = ray.get(actors[0].compute_record.remote()) if actors else {"torch": None, "gpus": []}
    return environment_record(device, cluster_record(), client_actors=runtimes, compute=compute)


def record_environment(folder: Path, make_record: Callable[[], dict[str, Any]]) -> None:
    """``environment.json`` in ``folder``: a record *about* the run, so a failure to make it is a
    warning, never the end of the run."""
    try:
        write_environment(folder, make_record())
    except Exception as exc:  # noqa: BLE001 -- the run's results come first
        log.warning("environment.json could not be written (%s: %s); the run goes on", type(exc).__name__, exc)
