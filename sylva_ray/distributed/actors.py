"""The Ray engine as the launching process sees it: the client actors it starts, the driver actor
that owns the federation, and the handle the runner drives it through.

Ray lives in ``sylva_ray.distributed`` only; the engine and the math are Ray-free: a client actor
runs the engine's jobs (``engine.jobs.run_*_job``, through ``distributed.client_host``) and the
driver actor runs the engine's round loop, fanning jobs out with ``distributed.executor``.
Large inputs (the data pools, the pre-trained weights) are ``ray.put`` once and every actor
receives the same object reference; the backbone is built once per actor, never shipped per call.

This module imports no torch: the launching process holds none (~600 MiB and seconds of CPU saved
for the whole run); the actors' processes import what they run in their constructors.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import psutil
import ray
from ray.experimental import tqdm_ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from sylva_ray.base.config import ExperimentConfig, ModelConfig
from sylva_ray.distributed.actor_common import ACTOR_LOG_FORMAT, BYTES_PER_MB
from sylva_ray.distributed.client_actor import RemoteClientActor
from sylva_ray.distributed.gpu_visibility import hide_unreserved_gpus
from sylva_ray.distributed.placement import PoolPlan, threads_for

if TYPE_CHECKING:
    from sylva_ray.engine.checkpoint import FederationState
    from sylva_ray.method.data import DataSource, Partition

log = logging.getLogger(__name__)


def main_process_log_level() -> int:
    """The level actors log at: the main process's, when it configured logging (``--log-level``);
    INFO otherwise (a Tune trial or a notebook that never called ``logging.basicConfig``)."""
    root = logging.getLogger()
    return root.level if root.handlers else logging.INFO


def start_client_actors(
    cfg: ExperimentConfig,
    plan: PoolPlan,
    source_ref: ray.ObjectRef,
    partition: Partition,
    backbone_ref: Optional[ray.ObjectRef],
    placement_group: Any = None,
    log_level: int = logging.INFO,
    *,
    actor_class: Any = RemoteClientActor,
) -> list[Any]:
    """Start the pool's client actors; each imports torch and the method as soon as it runs, then
    waits for ``backbone_ref`` (handed over one level deep, so Ray does not hold the actor back until
    the weights exist: the driver actor may still be staging them) and builds its worker; None:
    no pre-trained weights (``model.pretrained=none``), each actor draws the same seeded init.

    The caller keeps ``source_ref`` and ``backbone_ref`` alive for the run: a restarted actor re-reads
    its constructor arguments from the object store. ``actor_class``: the Ray actor class to start
    (a test's ``ray.remote`` subclass of ``ClientActor``; a run's is ``RemoteClientActor``).
    """
    threads = threads_for(cfg.runtime.client_resources, cfg.runtime.torch_threads)
    options = dict(plan.actor_options, max_restarts=cfg.runtime.max_actor_restarts, max_task_retries=0)
    actors = [
        actor_class.options(**options, **_bundle(placement_group, 1 + i)).remote(
            cfg, source_ref, partition, [backbone_ref], threads, plan.gpu_fraction, log_level
        )
        for i in range(plan.size)
    ]
    log.info(
        "starting %d client actors (%s each, %d torch threads) for %d clients",
        plan.size,
        plan.actor_options,
        threads,
        cfg.data.num_clients,
    )
    return actors


def _bundle(placement_group: Any, index: int) -> dict[str, Any]:
    """Schedule into bundle ``index`` of a Tune trial's placement group (bundle 0 is the driver's)."""
    if placement_group is None:
        return {}
    return {
        "scheduling_strategy": PlacementGroupSchedulingStrategy(placement_group, placement_group_bundle_index=index)
    }


class DriverActor:
    """Owns the federation: the round loop, the run directory, and the client actors' work.

    Started before the client actors, in two steps: ``stage_backbone`` gets the pre-trained weights
    (pre-training on the public slice, a checkpoint, hub weights) while the clients import torch,
    and ``start`` takes the client actors over once they exist. The driver reads no data folder;
    the launcher put the data in the object store. ``RemoteDriverActor`` is this class as a Ray
    actor class (the one a run starts); a test subclasses this one (its fault drills).
    """

    def __init__(
        self,
        cfg: ExperimentConfig,
        run_dir: str,
        state: Optional[FederationState],
        log_level: int = logging.INFO,
        progress: bool = True,
        track: bool = True,
    ) -> None:
        """``state``: the checkpoint a resume continues from (read once, by the launcher; it arrives
        through the object store), None for a new run; ``log_level``: the main process's, so
        ``--log-level`` reaches every actor; ``progress``: Phase 2's bars on or off, as the
        launcher's; ``track``: live figures into ``run_dir``."""
        hide_unreserved_gpus()  # the driver reserves no GPU: it aggregates on the CPU
        logging.basicConfig(level=log_level, format=ACTOR_LOG_FORMAT)
        self.cfg, self.run_dir, self.state = cfg, Path(run_dir), state
        self.progress, self.track = progress, track
        self.plan: Optional[PoolPlan] = None

    def stage_backbone(self, source: DataSource, model: ModelConfig) -> tuple[dict[str, Any], float]:
        """The pre-trained backbone as the clients load it (numpy arrays: ``staging.shareable_state``),
        and the seconds it took; called with ``num_returns=2``, so the weights are one object.
        ``model``: the run's ``model`` section with its paths absolute where the launcher runs
        (this process's working folder is Ray's, not the user's)."""
        from sylva_ray.distributed.staging import staged_backbone

        return staged_backbone(self.cfg, source, model)

    def start(self, actors: list[Any], plan: PoolPlan, pretraining_seconds: float = 0.0) -> None:
        """Take over the client actors (``start_client_actors``) and build the federation;
        ``pretraining_seconds``: the time to get the weights (``summary.json`` ``seconds_by_stage``)."""
        from sylva_ray.engine.federation import Federation
        from sylva_ray.engine.progress import SilentBar

        self.plan = plan
        self.federation = Federation(
            self.cfg, self.run_dir, self.make_executor(actors), state=self.state, track=self.track
        )
        self.federation.pretraining_seconds = pretraining_seconds
        # Phase 2's bars are drawn in the main process (Ray forwards tqdm_ray's updates to it).
        self.federation.progress_bar = tqdm_ray.tqdm if self.progress else SilentBar

    def make_executor(self, actors: list[Any]) -> Any:
        """The executor that fans the federation's jobs out to ``actors``."""
        from sylva_ray.distributed.executor import RayExecutor

        return RayExecutor(self.cfg, actors)

    def status(self) -> dict[str, Any]:
        return {
            "next_round": self.federation.state.next_round,
            "rounds": self.federation.cfg.federation.rounds,
            "actors": self.plan.size if self.plan is not None else 0,
            "done": self.federation.done,
        }

    def run_round(self, evaluate: Optional[bool] = None) -> dict[str, Any]:
        summary = self.federation.run_round(evaluate=evaluate)
        summary["driver_rss_mb"] = psutil.Process().memory_info().rss / BYTES_PER_MB
        return summary

    def run_phase2(self, out_dir: str) -> dict[str, Any]:
        return self.federation.run_phase2(Path(out_dir))

    def finish(self, phase2: Optional[dict[str, Any]] = None) -> dict[str, Any]:
        try:
            return self.federation.finish(phase2)
        finally:
            self.federation.executor.shutdown()

    def shutdown(self) -> None:
        if not hasattr(self, "federation"):  # never started: no federation, no executor
            return
        self.federation.close()
        self.federation.executor.shutdown()


#: The driver actor as Ray starts it (``launcher.remote_federation``): on the launching node, holding no CPU.
RemoteDriverActor = ray.remote(num_cpus=0)(DriverActor)


@dataclass(frozen=True)
class ActorClasses:
    """The Ray actor classes a run starts: a run's are these; a test passes ``ray.remote``
    subclasses of ``DriverActor`` and ``ClientActor`` (its fault drills)."""

    driver: Any = RemoteDriverActor
    client: Any = RemoteClientActor


class DriverHandle:
    """The driver actor seen from the main process as an ``engine.runner.Session``: the runner calls
    it round by round, then Phase 2, then the summary, as it calls an in-process federation."""

    def __init__(self, driver: Any) -> None:
        self._ray, self._driver = ray, driver

    @property
    def status(self) -> dict[str, Any]:
        return self._ray.get(self._driver.status.remote())

    def run_round(self, evaluate: Optional[bool] = None) -> dict[str, Any]:
        return self._ray.get(self._driver.run_round.remote(evaluate))

    def finish(self, phase2: Optional[dict[str, Any]] = None) -> dict[str, Any]:
        return self._ray.get(self._driver.finish.remote(phase2))

    def run_phase2(self, out_dir: Path) -> dict[str, Any]:
        return self._ray.get(self._driver.run_phase2.remote(str(out_dir)))
