"""Ray Tune glue: one federated experiment per trial, a report per round, sweeps as a few lines.

* ``federated_trainable(config)`` runs Phase 1 round by round (and Phase 2 after the last round)
  inside a trial, reporting once per round with a checkpoint, so ASHA can stop weak trials early
  and a trial resumes from its last round. No ``ray.init``/``ray.shutdown`` in here.
* ``trial_resources(cfg)``: a ``PlacementGroupFactory`` with one bundle for the trial process and
  its driver actor and one bundle per client actor; the engine sizes its pool from these bundles
  and places each client actor in its own bundle (``actors.start_client_actors``, from the trial process).
* ``run_sweep(...)``: build the grid from ``{dotted.field: [values]}``, run ``Tuner.fit`` (or
  ``Tuner.restore``), and return a tidy table (one row per trial).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import pandas as pd
import yaml

from sylva_ray.base.config import ConfigError, ExperimentConfig
from sylva_ray.base.config import apply_overrides as merge_overrides
from sylva_ray.base.storage import atomic_write_text
from sylva_ray.distributed.capacity import alive_nodes
from sylva_ray.distributed.connect import check_before_start, cluster_can_grow
from sylva_ray.distributed.gpu_visibility import hide_unreserved_gpus
from sylva_ray.distributed.launcher import remote_federation, stage_inputs
from sylva_ray.distributed.placement import PlacementError, gpu_problem, total
from sylva_ray.engine.environment import ENV_PREFIX, read_environment, repeat_fields
from sylva_ray.engine.resolve import build_config
from sylva_ray.engine.rundir import resolve_result_path, write_config
from sylva_ray.engine.runner import complete
from sylva_ray.engine.tracking import round_scalars

log = logging.getLogger(__name__)

#: Bundle 0 holds the trial's own process and the driver actor (num_cpus=0): a quarter CPU.
DRIVER_BUNDLE_CPUS = 0.25
#: Client actors per trial unless runtime.num_actors says otherwise.
DEFAULT_TRIAL_ACTORS = 1
#: The metric ASHA and "best trial" use.
METRIC, MODE = "robust_acc", "max"


def apply_overrides(base: dict[str, Any], overrides: dict[str, Any], check_paths: bool = True) -> ExperimentConfig:
    """``{"lora.rank": 16, ...}`` on top of a config dict; validated (local paths only where they are read)."""
    return build_config(merge_overrides(base, dict(overrides)), check_paths=check_paths)


#: Data fields that only decide how the pool is split, not what is loaded: trials that differ only
#: in these share one staged copy of the data and the backbone.
PARTITION_FIELDS = frozenset(
    {"num_clients", "partition", "alpha", "shards_per_client", "min_samples_per_client", "test_fraction"}
)


def inputs_key(cfg: ExperimentConfig) -> str:
    """What the staged data and backbone depend on: the data source and the model, not the split."""
    data = {k: v for k, v in dataclasses.asdict(cfg.data).items() if k not in PARTITION_FIELDS}
    return json.dumps({"data": data, "model": dataclasses.asdict(cfg.model)}, sort_keys=True, default=str)


def stage_sweep_inputs(configs: list[ExperimentConfig]) -> dict[str, Any]:
    """Read every distinct data source and backbone once, here, into the object store.

    Trials land on any node; with these references none of them needs the data folder, a weight
    file or hub access, and none re-checks local paths."""
    staged: dict[str, Any] = {}
    for cfg in configs:
        key = inputs_key(cfg)
        if key not in staged:
            staged[key] = stage_inputs(cfg)
    log.info("staged %d data/backbone input set(s) for the sweep's trials", len(staged))
    return staged


def trial_resources(cfg: ExperimentConfig, gpus_available: bool = True) -> Any:
    """One bundle for the trial and its driver, one per client actor. ``gpus_available=False``
    (a laptop cluster without GPUs, which cannot grow) drops a GPU share, as runs do."""
    from ray.tune import PlacementGroupFactory

    actors = min(cfg.runtime.num_actors or DEFAULT_TRIAL_ACTORS, cfg.data.num_clients)
    client = {"CPU": float(cfg.runtime.client_resources.get("num_cpus", 1.0))}
    if cfg.runtime.client_resources.get("num_gpus", 0) > 0 and gpus_available:
        client["GPU"] = float(cfg.runtime.client_resources["num_gpus"])
    return PlacementGroupFactory([{"CPU": DRIVER_BUNDLE_CPUS}] + [dict(client) for _ in range(actors)])


def _checkpoint_dir(run_dir: Path) -> Path:
    """What a Tune checkpoint of a run holds: enough to resume it (``engine.checkpoint``)."""
    staging = Path(tempfile.mkdtemp(prefix="sylva-ckpt-"))
    for name in ("config.yaml", "partition.json"):
        shutil.copy2(run_dir / name, staging / name)
    (staging / "checkpoints").mkdir()
    shutil.copy2(run_dir / "checkpoints" / "checkpoint.pt", staging / "checkpoints" / "checkpoint.pt")
    return staging


def federated_trainable(config: dict[str, Any], staged: Optional[dict[str, Any]] = None) -> None:
    """A Tune function trainable: ``config = {"base": <config dict>, "overrides": {dotted: value}}``
    (Tune samples the overrides; the base is the preset/config the sweep started from).
    ``staged``: ``inputs_key -> StagedInputs`` read by the sweep's main process."""
    from ray import tune

    hide_unreserved_gpus()  # the trial's own process (bundle 0) reserves no GPU; its client actors do
    cfg = apply_overrides(config["base"], config.get("overrides", {}), check_paths=staged is None)
    inputs = (staged or {}).get(inputs_key(cfg))
    run_dir = Path(tune.get_context().get_trial_dir()) / "run"
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = tune.get_checkpoint()
    resume, state = checkpoint is not None, None
    if resume:
        from sylva_ray.engine.checkpoint import check_resumable

        with checkpoint.as_directory() as saved:
            shutil.copytree(saved, run_dir, dirs_exist_ok=True)
        state = check_resumable(run_dir, cfg)
    else:
        write_config(run_dir, cfg)
    cumulative_up = 0
    with remote_federation(cfg, run_dir, resume=resume, state=state, staged=inputs, progress=False) as federation:
        status = federation.status
        for done in range(status["next_round"] + 1, status["rounds"] + 1):
            summary = federation.run_round()
            cumulative_up += int(summary["bytes_up"])
            # The run's own round figures under the names its TensorBoard files use (round/<name>):
            # Tune's event files show them as ray/tune/<name> beside them.
            metrics: dict[str, Any] = round_scalars(summary)
            metrics.update(round=done, cumulative_bytes_up=cumulative_up)
            if done == status["rounds"]:
                final = complete(federation, cfg, run_dir)  # Phase 2 first: the last report scores the final models
                metrics.update({f"final_{k}": v for k, v in final["final"].items()})
                metrics.update({f"phase1_{k}": v for k, v in final["phase1"].items()})
                metrics.update(repeat_fields(read_environment(run_dir) or {}))  # whether its figures repeat elsewhere
            staging = _checkpoint_dir(run_dir)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(str(staging)))
            shutil.rmtree(staging, ignore_errors=True)


#: Our own record of a sweep, plain JSON next to Tune's state: ``--resume`` hands a folder to Tune
#: (which unpickles ``tuner.pkl``, i.e. runs code from it) only when this says it is the same sweep.
MANIFEST = "sweep.json"
WORLD_WRITABLE = 0o002


def _read_text(uri_or_path: str) -> Optional[str]:
    """A small file's text from a local path or a pyarrow-supported URI; None if absent."""
    if "://" not in uri_or_path:
        path = Path(uri_or_path)
        return path.read_text() if path.is_file() else None
    import pyarrow.fs as pafs

    filesystem, path = pafs.FileSystem.from_uri(uri_or_path)
    if filesystem.get_file_info(path).type != pafs.FileType.File:
        return None
    with filesystem.open_input_stream(path) as stream:
        return stream.read().decode()


def _write_text(uri_or_path: str, text: str) -> None:
    if "://" not in uri_or_path:
        atomic_write_text(uri_or_path, text)
        return
    import pyarrow.fs as pafs

    filesystem, path = pafs.FileSystem.from_uri(uri_or_path)
    filesystem.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with filesystem.open_output_stream(path) as stream:
        stream.write(text.encode())


def refuse_world_writable(storage: str) -> None:
    """A local storage folder anyone may write lets anyone plant Tune's pickled state: refused."""
    if "://" in storage:
        return
    path = Path(storage).resolve()
    for folder in [path, *path.parents]:
        if folder.exists():
            mode = folder.stat().st_mode
            sticky = bool(mode & 0o1000)  # /tmp-like folders: others cannot replace what we create inside
            if mode & WORLD_WRITABLE and not (sticky and folder != path):
                raise ConfigError(
                    f"--storage-path {storage!r}: {folder} is world-writable, so anyone on this machine could "
                    "plant a sweep state that Tune would unpickle (run code) on --resume; use a folder only you "
                    f"can write (chmod o-w {folder})"
                )
            break


def sweep_manifest(name: str, base: dict[str, Any], grid: dict[str, list[Any]], axes: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps({"name": name, "base": base, "grid": grid, "axes": axes}, sort_keys=True, default=str))


def check_sweep_manifest(experiment: str, manifest: dict[str, Any]) -> None:
    """Before ``Tuner.restore``: our manifest must be there and describe this very sweep."""
    where = f"{experiment.rstrip('/')}/{MANIFEST}"
    text = _read_text(where)
    if text is None:
        raise ConfigError(
            f"{where}: missing, so {experiment} was not written by this sweep; --resume refuses to hand it "
            "to Tune (whose state is pickled and would run code). Start a new sweep (another --name)"
        )
    try:
        saved = json.loads(text)
    except ValueError:
        raise ConfigError(f"{where}: not valid JSON; --resume refuses this folder") from None
    changed = sorted(key for key in manifest if saved.get(key) != manifest[key])
    if changed:
        raise ConfigError(
            f"{where} records another sweep (differs in {changed}); repeat the original arguments, or start a "
            "new sweep with another --name"
        )


def parse_grid(items: list[str]) -> dict[str, list[Any]]:
    """``["lora.rank=4,8,16", "attack.eps=0.03,0.05"]`` -> ``{"lora.rank": [4, 8, 16], ...}``
    (values parsed as YAML)."""
    grid: dict[str, list[Any]] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--grid {item!r}: expected FIELD=V1,V2,... e.g. --grid lora.rank=4,8,16")
        key, values = item.split("=", 1)
        grid[key.strip()] = [yaml.safe_load(v) for v in values.split(",") if v.strip()]
        if not grid[key.strip()]:
            raise ConfigError(f"--grid {item!r}: no values")
    return grid


def check_grid(
    base: dict[str, Any], grid: dict[str, list[Any]], axes: dict[str, dict[str, dict[str, Any]]]
) -> list[ExperimentConfig]:
    """Every combination must be a valid config: fail before any trial starts. Returns them all."""
    names = list(grid) + list(axes)
    choices = [grid[k] for k in grid] + [list(axes[k]) for k in axes]
    return [apply_overrides(base, expand(dict(zip(names, combo)), axes)) for combo in itertools.product(*choices)]


def expand(point: dict[str, Any], axes: dict[str, dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """Named axes (e.g. ``heterogeneity: {"iid": {...}, "0.1": {...}}``) become field overrides."""
    overrides = {k: v for k, v in point.items() if k not in axes}
    for axis, table in axes.items():
        if axis in point:
            overrides.update(table[point[axis]])
    return overrides


def validate_sweep(
    base: ExperimentConfig,
    grid: dict[str, list[Any]],
    axes: Optional[dict[str, dict[str, dict[str, Any]]]] = None,
    *,
    name: str,
    storage_path: str,
    resume: bool,
) -> tuple[list[ExperimentConfig], dict[str, Any]]:
    """Everything about a sweep that can be refused before Ray starts: every grid point's config
    (and its model/data preflight), the storage folder's permissions, and on ``--resume`` our own
    manifest. Returns the configs and the manifest."""
    axes = axes or {}
    configs = check_grid(base.to_dict(), grid, axes)
    checked: set[str] = set()
    for cfg in configs:
        key = json.dumps(
            [inputs_key(cfg), dataclasses.asdict(cfg.lora), dataclasses.asdict(cfg.layer_selection)], sort_keys=True
        )
        if key not in checked:
            checked.add(key)
            check_before_start(cfg)
    refuse_world_writable(storage_path)
    manifest = sweep_manifest(name, base.to_dict(), grid, axes)
    if resume:
        check_sweep_manifest(f"{storage_path.rstrip('/')}/{name}", manifest)
    return configs, manifest


def run_sweep(
    base: ExperimentConfig,
    grid: dict[str, list[Any]],
    axes: Optional[dict[str, dict[str, dict[str, Any]]]] = None,
    *,
    name: str = "sweep",
    storage_path: str = "runs/sweeps",
    samples: int = 1,
    scheduler: str = "none",
    concurrency: Optional[int] = None,
    resume: bool = False,
) -> pd.DataFrame:
    """Run (or resume) a grid sweep; returns one row per trial with its parameters and final metrics."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    axes = axes or {}
    base_dict = base.to_dict()
    storage = storage_path if "://" in storage_path else str(resolve_result_path(storage_path))
    experiment = f"{storage.rstrip('/')}/{name}"
    configs, manifest = validate_sweep(base, grid, axes, name=name, storage_path=storage, resume=resume)
    gpus = total(alive_nodes(), "GPU")
    problem = gpu_problem(base.runtime.client_resources, base.runtime.device, gpus)
    if problem:
        raise PlacementError(problem)
    staged = stage_sweep_inputs(configs)
    space: dict[str, Any] = {"base": base_dict, "point": {k: tune.grid_search(v) for k, v in grid.items()}}
    space["point"].update({axis: tune.grid_search(list(table)) for axis, table in axes.items()})

    def trainable(config: dict[str, Any], staged: dict[str, Any]) -> None:
        federated_trainable({"base": config["base"], "overrides": expand(config["point"], axes)}, staged)

    resources = tune.with_resources(
        tune.with_parameters(trainable, staged=staged),
        trial_resources(base, gpus_available=gpus > 0 or cluster_can_grow()),
    )
    # A node released by the autoscaler takes its disk along: every report uploads the trial's
    # run directory (artifacts) to storage_path, which must then be shared (s3://, NFS) on a cluster.
    if resume:
        tuner = tune.Tuner.restore(experiment, resources, resume_errored=True, param_space=space)
    else:
        _write_text(f"{experiment}/{MANIFEST}", json.dumps(manifest, indent=2, sort_keys=True))
        asha = (
            ASHAScheduler(time_attr="training_iteration", max_t=base.federation.rounds, grace_period=1)
            if scheduler == "asha"
            else None
        )
        tuner = tune.Tuner(
            resources,
            param_space=space,
            tune_config=tune.TuneConfig(
                metric=METRIC, mode=MODE, num_samples=samples, scheduler=asha, max_concurrent_trials=concurrency
            ),
            run_config=tune.RunConfig(
                name=name, storage_path=storage, sync_config=tune.SyncConfig(sync_artifacts=True)
            ),
        )
    results = tuner.fit()
    return trials_table(results)


def trials_table(results: Any) -> pd.DataFrame:
    """One row per trial: its grid point, the last reported metrics, its status."""
    rows = []
    for result in results:
        point = dict(result.config.get("point", {}))
        metrics = dict(result.metrics or {})
        rows.append(
            {
                **point,
                "trial": Path(result.path).name,
                "status": "ERROR" if result.error else "OK",
                "rounds_done": metrics.get("round"),
                **{k: v for k, v in metrics.items() if k.startswith(ENV_PREFIX)},
                **{
                    k: metrics.get(k)
                    for k in (
                        "clean_acc",
                        "robust_acc",
                        "final_clean_acc",
                        "final_robust_acc",
                        "phase1_clean_acc",
                        "phase1_robust_acc",
                        "cumulative_bytes_up",
                        "time_total_s",
                    )
                },
            }
        )
    return pd.DataFrame(rows)
