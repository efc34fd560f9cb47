"""The main process: start or join Ray, start the driver actor, show progress. No math here.

    run(cfg, run_dir)      a new run (the run directory is new or empty)
    resume(run_dir)        continue from the run's last checkpoint, with the run's own config

The driver actor is pinned to this node (the run directory is on this node's disk). With
``runtime.engine = inprocess`` the same ``Federation`` runs here without Ray.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import yaml
from tqdm.auto import tqdm

from sylva_ray.config import ConfigError, ExperimentConfig, build_config
from sylva_ray.data import DataSource, Partition, load_source, make_partition
from sylva_ray.federation import CHECKPOINT_NAME, Federation, FederationState, InProcessExecutor
from sylva_ray.results import read_json, write_config
from sylva_ray.storage import remove_orphaned_temp_files

log = logging.getLogger(__name__)

#: Seconds to wait for a TCP answer from a cluster address before calling it unreachable.
CONNECT_PROBE_TIMEOUT_S = 3.0


def prepare_data(cfg: ExperimentConfig, run_dir: Path, resume: bool, source: Optional[DataSource] = None) -> tuple[DataSource, Partition]:
    """Load the data (unless given); make and save the partition for a new run, reload it when resuming."""
    source = source if source is not None else load_source(cfg.data)
    partition_path = run_dir / "partition.json"
    if resume and partition_path.is_file():
        return source, Partition.load(partition_path, expected_fingerprint=source.fingerprint())
    partition = make_partition(source, cfg.data, cfg.runtime.seed)
    partition.save(partition_path)
    return source, partition


def cluster_can_grow() -> bool:
    """Whether resources missing now may still appear (an autoscaler, nodes joining): False when
    this process's ``ray.init`` started the head itself (``Node.head``), as on a laptop."""
    import ray

    return not bool(getattr(ray._private.worker.global_worker.node, "head", False))


def connect(address: Optional[str]) -> None:
    """Join a running cluster, or start a local one; reuse Ray if this process already started it.

    A ``host:port`` address is probed with a short TCP connect first: an unreachable cluster is a
    clear error in seconds instead of Ray's minutes of retries.
    """
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address and address not in {"auto", "local"}:
        probe_address(address)
    ray.init(address=address, log_to_driver=True)


def probe_address(address: str) -> None:
    """Raise ``ConnectionError`` unless something accepts a TCP connection at ``host:port``."""
    host, port = address.removeprefix("ray://").rsplit(":", 1)
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_PROBE_TIMEOUT_S).close()
    except OSError as exc:
        raise ConnectionError(
            f"runtime.address / --address {address!r}: nothing answers there ({exc}); start the cluster with "
            "`ray start --head` (or `ray up`) and pass the address it prints, or omit --address to run locally"
        ) from None


def run(cfg: ExperimentConfig, run_dir: Path, *, resume: bool = False, stop_after: Optional[int] = None,
        faults: Optional[dict[str, Any]] = None, progress: bool = True) -> Optional[dict[str, Any]]:
    """Run (or continue) Phase 1 into ``run_dir``; returns the summary, or None if stopped early.

    ``stop_after`` ends the session after that many rounds in total, as an interruption would
    (the checkpoint is written after every round); ``faults`` is a fault drill for the Ray engine.
    """
    if not resume:
        write_config(run_dir, cfg)
    if cfg.runtime.engine == "inprocess":
        check_local_device(cfg)
        source, partition = prepare_data(cfg, run_dir, resume)
        return _drive(Federation(cfg, run_dir, InProcessExecutor(cfg, source, partition), resume=resume), stop_after, progress)

    with remote_federation(cfg, run_dir, resume, progress=progress) as federation:
        if faults:
            federation.inject_faults(faults.get("kills", {}), faults.get("raises", {}), faults.get("ooms", {}))
        log.info("driver ready: %d client actors for %d clients", federation.status["actors"], cfg.data.num_clients)
        return _drive(federation, stop_after, progress)


@dataclass(frozen=True)
class StagedInputs:
    """The data and the pre-trained backbone, read once where the run starts and shared through
    Ray's object store: no other node needs the data folder, the weight file or hub access."""

    source: Any  # ray.ObjectRef of a DataSource
    backbone: Any  # ray.ObjectRef of the backbone's state dict (CPU tensors)


def stage_inputs(cfg: ExperimentConfig, source: Optional[DataSource] = None) -> StagedInputs:
    """Load the data (unless given) and resolve the pre-trained weights here; ``ray.put`` both once."""
    import ray

    from sylva_ray.models import pretrained_backbone_state

    source = source if source is not None else load_source(cfg.data)
    return StagedInputs(source=ray.put(source), backbone=ray.put(pretrained_backbone_state(cfg.model, cfg.data, source)))


def runs_on_this_machine_only(cfg: ExperimentConfig) -> bool:
    """True for the in-process engine, and for a Ray run that will start (or has started, in this
    process) its own one-machine cluster: no ``--address``, no ``RAY_ADDRESS`` (set inside
    ``ray job submit`` jobs), not a worker of an existing cluster (a Tune trial)."""
    if cfg.runtime.engine == "inprocess":
        return True
    if cfg.runtime.address is not None or os.environ.get("RAY_ADDRESS"):
        return False
    import ray

    return not ray.is_initialized() or not cluster_can_grow()


def check_local_device(cfg: ExperimentConfig) -> None:
    """``runtime.device=cuda`` for a run on this machine alone where torch sees no CUDA: refused
    before any work, with what to set instead (on a cluster, the actors' GPU share decides)."""
    if cfg.runtime.device != "cuda" or not runs_on_this_machine_only(cfg):
        return
    import torch

    if not torch.cuda.is_available():
        raise ConfigError("runtime.device='cuda' but this machine has no CUDA device: use runtime.device=auto or cpu, "
                          "or join a GPU cluster with --address (client actors then need runtime.client_resources.num_gpus)")


@contextlib.contextmanager
def remote_federation(cfg: ExperimentConfig, run_dir: Path, resume: bool = False, staged: Optional[StagedInputs] = None,
                      progress: bool = True) -> Iterator["RemoteFederation"]:
    """A driver actor on this node (or in bundle 0 of a Tune trial's placement group), torn down
    with its client actors on exit.

    What runs here, in the main process, before the driver starts, cheapest check first: the GPU
    policy on the nodes there are; the data and backbone are read and put in the object store
    (``staged`` when a Tune sweep already did) and the partition is written; then the client-actor
    pool is planned, waiting for an autoscaler if the cluster can grow (GPU nodes cost from here on).
    """
    import ray
    from ray.util.placement_group import get_current_placement_group
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

    from sylva_ray.actors import DriverActor
    from sylva_ray.capacity import acquire_pool, alive_nodes, bundles_of, check_gpus, release_request
    from sylva_ray.placement import plan_pool

    connect(cfg.runtime.address)
    check_local_device(cfg)
    group = get_current_placement_group()  # set inside a Tune trial: everything goes into its bundles
    if group is None:
        check_gpus(cfg, alive_nodes())
    # Data and weights next: a bad folder or weight file fails here, before GPU nodes are paid for.
    if staged is None:
        source, partition = prepare_data(cfg, run_dir, resume)
        staged = stage_inputs(cfg, source)
    else:
        _, partition = prepare_data(cfg, run_dir, resume, source=ray.get(staged.source))
    requested = False
    if group is not None:
        bundles = bundles_of(group)  # fixed by the trial; without GPUs in them, the GPU share is moot
        plan = plan_pool(bundles, cfg.runtime.client_resources, cfg.data.num_clients, len(bundles), drop_gpu_without_gpus=True)
        where = PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=0)
    else:
        plan, requested = acquire_pool(cfg, cluster_can_grow(), progress=progress)
        where = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    driver = None
    try:
        driver = DriverActor.options(scheduling_strategy=where).remote(
            cfg, str(run_dir), resume, {"source": staged.source, "backbone": staged.backbone}, partition, plan, group)
        federation = RemoteFederation(driver)
        federation.status  # noqa: B018 -- the driver and its actors are up (or their error surfaces) here
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
            ray.kill(driver)


class RemoteFederation:
    """The driver actor seen through the ``Federation`` interface the progress loop uses."""

    def __init__(self, driver: Any) -> None:
        import ray

        self._ray, self._driver = ray, driver

    @property
    def status(self) -> dict[str, Any]:
        return self._ray.get(self._driver.status.remote())

    def run_round(self, evaluate: Optional[bool] = None) -> dict[str, Any]:
        return self._ray.get(self._driver.run_round.remote(evaluate))

    def finish(self) -> dict[str, Any]:
        return self._ray.get(self._driver.finish.remote())

    def phase2(self, out_dir: Path) -> dict[str, Any]:
        return self._ray.get(self._driver.phase2.remote(str(out_dir)))

    def inject_faults(self, kills: dict, raises: dict, ooms: Optional[dict] = None) -> None:
        self._ray.get(self._driver.inject_faults.remote(kills, raises, ooms or {}))


def _drive(federation: Any, stop_after: Optional[int], progress: bool = True) -> Optional[dict[str, Any]]:
    """The progress loop: one call per round, a bar with the latest client means."""
    if isinstance(federation, Federation):
        start, total = federation.state.next_round, federation.cfg.federation.rounds
    else:
        status = federation.status
        start, total = status["next_round"], status["rounds"]
    with tqdm(total=total, initial=start, desc="phase 1 rounds", disable=not progress) as bar:
        for done_rounds in range(start + 1, total + 1):
            summary = federation.run_round()
            bar.update(1)
            bar.set_postfix({k: f"{summary[k]:.3f}" for k in ("clean_acc", "robust_acc") if k in summary})
            if stop_after is not None and done_rounds >= stop_after and done_rounds < total:
                log.info("stopping after round %d (checkpoint written)", done_rounds)
                return None
    return federation.finish()


def load_run_config(run_dir: Path) -> ExperimentConfig:
    """The run's own config.yaml, validated; a missing or unreadable one names the file."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{run_dir}: no config.yaml here; is this a sylva-ray run directory?")
    try:
        raw = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]}); the file is damaged") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected the run's configuration (a YAML mapping); the file is damaged")
    try:
        return build_config(raw)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def check_resumable(run_dir: Path, cfg: ExperimentConfig) -> Optional[FederationState]:
    """Before anything starts: the checkpoint is readable and belongs to *this* config (a hand-edited
    config.yaml would otherwise overwrite results with another experiment's), the partition is
    readable. Returns the checkpoint's state, or None when the run has none yet."""
    from sylva_ray.federation import FederationState, config_fingerprint, fingerprint_differences

    partition = run_dir / "partition.json"
    if partition.is_file():
        try:
            json.loads(partition.read_text())
        except (ValueError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{partition}: not valid JSON ({exc}); the file is damaged") from None
    checkpoint = run_dir / "checkpoints" / CHECKPOINT_NAME
    if not checkpoint.is_file():
        return None
    state = FederationState.load(checkpoint)
    if not state.fingerprint:
        log.warning("%s predates configuration fingerprints: config.yaml cannot be checked against it", checkpoint)
        return state
    current = config_fingerprint(cfg)
    if partition.is_file():  # the weights' digest is checked by the driver, once it has built the model
        current["inputs.partition_sha256"] = hashlib.sha256(partition.read_bytes()).hexdigest()
    saved = {k: v for k, v in state.fingerprint.items() if k in current}
    differences = fingerprint_differences(saved, current)
    if differences:
        raise ConfigError(f"{run_dir}: config.yaml (or partition.json) differs from what the run's checkpoint was made with, "
                          "so resuming would mix two experiments:\n  " + "\n  ".join(differences)
                          + "\nrestore the run's files, or start a new run with these values")
    return state


def resume(run_dir: Path, address: Optional[str] = None, stop_after: Optional[int] = None, progress: bool = True) -> dict[str, Any]:
    """Continue an interrupted run from its last checkpoint; a finished run just returns its summary
    (after rewriting its tables from the checkpoint if they were damaged)."""
    from sylva_ray.preflight import preflight

    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    if address is not None:
        from sylva_ray.placement import address_problem

        problem = address_problem(address)
        if problem:
            raise ConfigError(f"--address {address!r}: {problem}")
        cfg.runtime.address = address
    state = check_resumable(run_dir, cfg)
    for orphan in remove_orphaned_temp_files(run_dir):
        log.info("removed %s, left by a write that was killed", orphan)
    if (run_dir / "summary.json").is_file():
        if state is not None:
            restore_tables(run_dir, state)
        log.info("%s is already complete", run_dir)
        return read_json(run_dir / "summary.json")
    preflight(cfg)
    if state is None:
        log.info("%s has no checkpoint yet: starting it from round 1", run_dir)
    return run(cfg, run_dir, resume=True, stop_after=stop_after, progress=progress)


def restore_tables(run_dir: Path, state: "FederationState") -> None:
    """metrics.csv and rounds.csv as the checkpoint holds them (rewritten only if they differ)."""
    import pandas as pd

    from sylva_ray.results import write_table

    for name, rows in (("metrics.csv", state.rows), ("rounds.csv", state.round_rows)):
        path = run_dir / name
        expected = pd.DataFrame(rows).to_csv(index=False)
        try:
            current = path.read_text()
        except (OSError, UnicodeDecodeError):
            current = None
        if current != expected:
            log.warning("%s did not match the checkpoint: rewritten from it", path)
            write_table(path, pd.DataFrame(rows))


def phase2_only(run_dir: Path, overrides: list[str], address: Optional[str] = None) -> tuple[Path, dict[str, Any]]:
    """Phase 2 alone on a finished Phase-1 run, with its own overrides, into a *new* folder
    ``RUN_DIR/phase2-<UTC timestamp>/`` (config.yaml, shapley.csv, summary.json, plots, models);
    the original results are never touched."""
    import time

    from sylva_ray.config import apply_overrides
    from sylva_ray.results import write_json

    run_dir = Path(run_dir)
    base = load_run_config(run_dir)
    raw = apply_overrides(base.to_dict(), list(overrides))
    if address is not None:
        raw["runtime"]["address"] = address
    raw["layer_selection"]["enabled"] = True
    cfg = build_config(raw)
    from sylva_ray.preflight import preflight

    preflight(cfg)  # before the new folder exists
    if not (run_dir / "checkpoints" / CHECKPOINT_NAME).is_file() or not (run_dir / "summary.json").is_file():
        raise ConfigError(f"{run_dir}: Phase 1 has not finished here (no summary.json/checkpoint); run or resume it first")
    check_resumable(run_dir, base)
    out = run_dir / f"phase2-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
    suffix = 1
    while out.exists():
        suffix += 1
        out = run_dir / f"phase2-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{suffix}"
    out.mkdir(parents=True)
    write_config(out, cfg)
    (out / "phase1_run.txt").write_text(str(run_dir.resolve()) + "\n")
    if cfg.runtime.engine == "inprocess":
        source, partition = prepare_data(cfg, run_dir, resume=True)
        result = Federation(cfg, run_dir, InProcessExecutor(cfg, source, partition), resume=True).phase2(out)
    else:
        with remote_federation(cfg, run_dir, resume=True) as federation:
            result = federation.phase2(out)
    phase1 = read_json(run_dir / "summary.json")["phase1"]
    summary = {"phase1_run": str(run_dir.resolve()), "phase1": phase1, "phase2": result["means"], "final": result["means"],
               "selected_layers": result["selected"], "evaluations": result["evaluations"], "seconds": result["seconds"],
               "per_client": result["per_client"]}
    write_json(out / "summary.json", summary)
    return out, summary
