"""The Ray engine's driver side: the executor that fans jobs out to client actors, and the driver actor.

Ray lives in ``sylva_ray.distributed`` only; the engine and the math are Ray-free: an actor runs
the engine's jobs (``engine.jobs.run_*_job``) and the driver actor runs the engine's round loop.
Following Ray's own patterns:
  * large inputs (the data pools, the pre-trained weights) are ``ray.put`` once and every actor
    receives the same object reference; the backbone is built once per actor, never shipped per call;
  * the global adapter is ``ray.put`` once per round, not re-pickled per client;
  * results are collected with ``ray.wait`` as they finish, then ordered by client id;
  * a client's personal state travels with its job and comes back with the result, so a restarted
    actor (which re-runs ``__init__``) or a re-assigned client loses nothing.
The client actor is ``distributed.client_actor.ClientActor`` (its own module, so its processes
do not import the driver's tables and plots).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import psutil
import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayError
from ray.experimental import tqdm_ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from sylva_ray.base.config import ExperimentConfig
from sylva_ray.base.errors import named_user_error
from sylva_ray.distributed.client_actor import (
    ACTOR_LOG_FORMAT,
    BYTES_PER_MB,
    GPU_PEAK_METRIC,
    ClientActor,
)
from sylva_ray.distributed.gpu_visibility import hide_unreserved_gpus
from sylva_ray.distributed.placement import (
    ActorStartError,
    GPUMemoryError,
    PlacementError,
    PoolPlan,
    threads_for,
)
from sylva_ray.engine.federation import Federation
from sylva_ray.engine.jobs import Job, OnDone, Outcome, WorkerInfo
from sylva_ray.engine.phase2 import SilentBar
from sylva_ray.engine.runner import phase2_of
from sylva_ray.method.data import Partition

log = logging.getLogger(__name__)

#: While waiting for a restarted actor: each ping waits at most this long, with this pause between.
RESTART_PING_TIMEOUT_S, RESTART_PING_PAUSE_S = 5.0, 0.5


def main_process_log_level() -> int:
    """The level actors log at: the main process's, when it configured logging (``--log-level``);
    INFO otherwise (a Tune trial or a notebook that never called ``logging.basicConfig``)."""
    root = logging.getLogger()
    return root.level if root.handlers else logging.INFO


@dataclass
class FaultPlan:
    """Faults to inject, for drills and tests: (round, client) -> what to do and how many times."""

    kills: dict[tuple[int, int], int] = field(default_factory=dict)
    raises: dict[tuple[int, int], int] = field(default_factory=dict)
    ooms: dict[tuple[int, int], int] = field(default_factory=dict)


def gpu_memory_cause(exc: BaseException) -> Optional[GPUMemoryError]:
    """The ``GPUMemoryError`` inside a Ray error, if that is what it carries."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, GPUMemoryError):
        return cause
    return exc if isinstance(exc, GPUMemoryError) else None


def start_failure(exc: RayError, actor_index: int) -> Optional[Exception]:
    """The one-line error for a client actor whose constructor raised a user error (Ray passes it
    on only as text): ``GPUMemoryError`` for a model that does not fit the share, ``ActorStartError``
    naming the actor for any other; None for anything else (a bug keeps its traceback)."""
    named = named_user_error(str(exc)) if isinstance(exc, ActorDiedError) else None
    if named is None:
        return None
    name, message = named
    if name == GPUMemoryError.__name__:
        return GPUMemoryError(message)
    return ActorStartError(f"client actor {actor_index} could not start: {message}")


def start_client_actors(
    cfg: ExperimentConfig,
    plan: PoolPlan,
    source_ref: ray.ObjectRef,
    partition: Partition,
    backbone_ref: ray.ObjectRef,
    placement_group: Any = None,
    log_level: int = logging.INFO,
) -> list[Any]:
    """Start the pool's client actors; each builds its worker (imports, model) as soon as it runs.

    Called where the inputs were staged, before the driver actor exists, so the actors' imports and
    model builds overlap the driver's start instead of following it (docs explanation/engine.md).
    The caller keeps ``source_ref`` and ``backbone_ref`` alive for the run: a restarted actor re-reads
    its constructor arguments from the object store.
    """
    threads = threads_for(cfg.runtime.client_resources, cfg.runtime.torch_threads)
    options = dict(plan.actor_options, max_restarts=cfg.runtime.max_actor_restarts, max_task_retries=0)
    actors = [
        ClientActor.options(**options, **_bundle(placement_group, 1 + i)).remote(
            cfg, source_ref, partition, backbone_ref, threads, plan.gpu_fraction, log_level
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


class RayExecutor:
    """Runs jobs on a pool of client actors; retries failed clients, drops them after that.

    An actor that dies is restarted by Ray (``runtime.max_actor_restarts``); one that is not back
    within ``runtime.actor_restart_timeout_s`` (its node is gone and nothing else has room) leaves
    the pool, and its clients move to the remaining actors. CUDA out-of-memory is not retried.
    """

    def __init__(self, cfg: ExperimentConfig, actors: Sequence[Any], faults: Optional[FaultPlan] = None) -> None:
        """``actors``: client-actor handles (``start_client_actors``), started by whoever had the
        inputs first, so that they build their models while the driver starts."""
        self.cfg = cfg
        self.faults = faults or FaultPlan()
        self.actors = list(actors)
        self.retired: set[int] = set()
        #: Peak GPU memory (MiB) of any job of each stage this session: the sizing figure for a share.
        self.gpu_peak_mb: dict[str, float] = {}

    @property
    def live(self) -> list[int]:
        return [i for i in range(len(self.actors)) if i not in self.retired]

    def info(self) -> WorkerInfo:
        """The common starting point, once every actor has built its model: a constructor that
        failed on a user error (a model too large for the GPU share, a refused share) stops the
        run here with that error's one line, before round 1, instead of dropping clients later."""
        pings = {actor.ping.remote(): index for index, actor in enumerate(self.actors)}
        pending, limit = list(pings), self.cfg.runtime.resource_timeout_s or None
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=limit)
            if not ready:  # never placed (their resources vanished after planning), or stuck building
                raise PlacementError(
                    f"client actors {sorted(pings[ref] for ref in pending)} did not start within "
                    f"runtime.resource_timeout_s={limit:g}s; `ray status` shows what the cluster could not place"
                )
            try:
                ray.get(ready[0])
            except RayError as exc:
                failure = start_failure(exc, pings[ready[0]])
                if failure is None:
                    raise
                raise failure from None
        return ray.get(self.actors[0].info.remote(self.cfg.data.num_clients))

    def train(self, jobs: Sequence[Job], global_payload: bytes, round_index: int) -> list[Outcome]:
        payload_ref = ray.put(global_payload)  # one copy in the object store for every client this round

        def submit(actor: Any, job: Job) -> ray.ObjectRef:
            fault = (
                "raise"
                if self._take(self.faults.raises, round_index, job.client_id)
                else "oom"
                if self._take(self.faults.ooms, round_index, job.client_id)
                else None
            )
            ref = actor.train.remote(job, payload_ref, round_index, fault)
            if self._take(self.faults.kills, round_index, job.client_id):
                log.warning(
                    "fault drill: killing the actor running client %d in round %d", job.client_id, round_index + 1
                )
                ray.kill(actor, no_restart=False)
            return ref

        return self._run(jobs, submit, self.cfg.federation.round_timeout_s, stage="train")

    def evaluate(self, jobs: Sequence[Job], adapter_payload: bytes) -> list[Outcome]:
        payload_ref = ray.put(adapter_payload)
        return self._run(jobs, lambda actor, job: actor.evaluate.remote(job, payload_ref), None, stage="evaluation")

    def coalitions(self, jobs: Sequence[Job], adapter_payload: bytes, on_done: OnDone = None) -> list[Outcome]:
        """Phase 2 coalition evaluations of every client at once; a client's jobs go to one actor
        (its game and fused model are built there once), another only if that actor is gone."""
        payload_ref = ray.put(adapter_payload)
        submit = lambda actor, job: actor.coalition.remote(job, payload_ref)  # noqa: E731
        return self._run(jobs, submit, None, affinity=True, on_done=on_done, stage="phase2_game")

    def tailor(self, jobs: Sequence[Job], adapter_payload: bytes, on_done: OnDone = None) -> list[Outcome]:
        payload_ref = ray.put(adapter_payload)
        submit = lambda actor, job: actor.tailor.remote(job, payload_ref)  # noqa: E731
        return self._run(jobs, submit, None, affinity=True, on_done=on_done, stage="tailoring")

    def protocol(self, jobs: Sequence[Job], adapter_payload: bytes, on_done: OnDone = None) -> list[Outcome]:
        """The final-model protocol of every tailored model on whichever actor is free (no affinity):
        its attacks are most of Phase 2's time, and the caller orders the jobs largest first."""
        payload_ref = ray.put(adapter_payload)
        submit = lambda actor, job: actor.protocol.remote(job, payload_ref)  # noqa: E731
        return self._run(jobs, submit, None, on_done=on_done, stage="protocol")

    def home_actor(self, client_id: int) -> int:
        """The actor a client's Phase 2 jobs go to: a fixed spread of clients over the pool."""
        return client_id % len(self.actors)

    @staticmethod
    def _take(budget: dict[tuple[int, int], int], round_index: int, client_id: int) -> bool:
        key = (round_index, client_id)
        if budget.get(key, 0) > 0:
            budget[key] -= 1
            return True
        return False

    def _next_job(self, pending: deque[int], jobs: Sequence[Job], actor_index: int, affinity: bool) -> Optional[int]:
        """The first pending job this actor should run: any job, or with affinity one of its own
        clients' (or of a client whose home actor has left the pool)."""
        for position, job_index in enumerate(pending):
            home = self.home_actor(jobs[job_index].client_id)
            if not affinity or home == actor_index or home in self.retired:
                del pending[position]
                return job_index
        return None

    def _run(
        self,
        jobs: Sequence[Job],
        submit: Callable[[Any, Job], ray.ObjectRef],
        timeout_s: Optional[float],
        affinity: bool = False,
        on_done: OnDone = None,
        stage: str = "",
    ) -> list[Outcome]:
        """One job per idle actor; collect with ``ray.wait``; retry a failure, then drop the job.

        ``stage`` names the jobs' kind in ``gpu_peak_mb``; a training job keeps its own peak in its
        metrics too (``metrics.csv``), the others' peaks leave their results here (a protocol
        job's metrics are a client's row of ``summary.json``, which holds no machine figures)."""
        pending: deque[int] = deque(range(len(jobs)))
        idle: deque[int] = deque(self.live)
        attempts = [0] * len(jobs)
        in_flight: dict[ray.ObjectRef, tuple[int, int]] = {}  # ref -> (actor index, job index)
        outcomes: dict[int, Outcome] = {}
        deadline = time.monotonic() + timeout_s if timeout_s else None
        while pending or in_flight:
            for actor_index in list(idle):
                job_index = self._next_job(pending, jobs, actor_index, affinity)
                if job_index is None:
                    continue
                idle.remove(actor_index)
                attempts[job_index] += 1
                in_flight[submit(self.actors[actor_index], jobs[job_index])] = (actor_index, job_index)
            if not in_flight:
                raise PlacementError(
                    "every client actor has left the pool (their nodes are gone): nothing can run the "
                    "remaining jobs; resume the run once the cluster has room again"
                )
            wait_s = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=wait_s)
            if not ready:
                self._drop_stragglers(jobs, in_flight, pending, attempts, outcomes)
                break
            for ref in ready:
                actor_index, job_index = in_flight.pop(ref)
                job = jobs[job_index]
                try:
                    outcome = ray.get(ref)
                    outcome.attempts = attempts[job_index]
                    self._record_gpu_peak(stage, outcome)
                    outcomes[job_index] = outcome
                    idle.append(actor_index)
                    if on_done is not None:
                        on_done(outcome)
                except RayError as exc:
                    oom = gpu_memory_cause(exc)
                    if oom is not None:
                        raise GPUMemoryError(str(oom)) from None
                    tries = attempts[job_index]
                    log.error("client %d failed on actor %d (attempt %d):\n%s", job.client_id, actor_index, tries, exc)
                    if isinstance(exc, (ActorDiedError, ActorUnavailableError)):
                        # Ray fails calls to a restarting actor at once: wait until it answers again,
                        # or the retry would fail the same way (seen under load).
                        self._await_restart([actor_index])
                    if actor_index not in self.retired:
                        idle.append(actor_index)
                    if tries <= self.cfg.runtime.client_retries:
                        pending.appendleft(job_index)
                    else:
                        outcomes[job_index] = Outcome(
                            job.client_id, attempts=tries, error=f"{type(exc).__name__}: {exc}"
                        )
                        if on_done is not None:
                            on_done(outcomes[job_index])
        return [outcomes[i] for i in range(len(jobs))]

    def _record_gpu_peak(self, stage: str, outcome: Outcome) -> None:
        peak = outcome.metrics.get(GPU_PEAK_METRIC) if stage == "train" else outcome.metrics.pop(GPU_PEAK_METRIC, None)
        if peak is not None:
            self.gpu_peak_mb[stage] = max(self.gpu_peak_mb.get(stage, 0.0), float(peak))

    def _drop_stragglers(
        self, jobs: Sequence[Job], in_flight: dict, pending: deque, attempts: list[int], outcomes: dict[int, Outcome]
    ) -> None:
        """Deadline passed: drop unfinished jobs; restart the busy actors (a running task cannot be cancelled)."""
        for actor_index, job_index in in_flight.values():
            outcomes[job_index] = Outcome(
                jobs[job_index].client_id, attempts=attempts[job_index], error="round deadline exceeded"
            )
            ray.kill(self.actors[actor_index], no_restart=False)
        for job_index in pending:
            outcomes[job_index] = Outcome(
                jobs[job_index].client_id, attempts=attempts[job_index], error="round deadline exceeded (not started)"
            )
        log.warning(
            "round deadline: dropped clients %s",
            sorted(jobs[j].client_id for j in [*(j for _, j in in_flight.values()), *pending]),
        )
        killed = sorted({actor_index for actor_index, _ in in_flight.values()})
        in_flight.clear()
        pending.clear()
        self._await_restart(killed)

    def _await_restart(self, indices: list[int]) -> None:
        """Block until killed actors answer again, so the next jobs do not race their restart; an
        actor not back within ``runtime.actor_restart_timeout_s`` leaves the pool."""
        for index in indices:
            deadline = time.monotonic() + self.cfg.runtime.actor_restart_timeout_s
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self._retire(index)
                    break
                try:
                    ray.get(self.actors[index].ping.remote(), timeout=min(RESTART_PING_TIMEOUT_S, remaining))
                    break
                except (RayError, TimeoutError):
                    time.sleep(min(RESTART_PING_PAUSE_S, max(0.0, deadline - time.monotonic())))

    def _retire(self, index: int) -> None:
        self.retired.add(index)
        ray.kill(self.actors[index], no_restart=True)
        log.warning(
            "client actor %d did not come back within runtime.actor_restart_timeout_s=%gs (its node may be gone): "
            "continuing with %d actors",
            index,
            self.cfg.runtime.actor_restart_timeout_s,
            len(self.live),
        )

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)


def _bundle(placement_group: Any, index: int) -> dict[str, Any]:
    """Schedule into bundle ``index`` of a Tune trial's placement group (bundle 0 is the driver's)."""
    if placement_group is None:
        return {}
    return {
        "scheduling_strategy": PlacementGroupSchedulingStrategy(placement_group, placement_group_bundle_index=index)
    }


@ray.remote(num_cpus=0)
class DriverActor:
    """Owns the federation: the round loop, the run directory, and the client actors' work.

    The client actors are started by the launching process (which staged the data and weights)
    and handed over: the driver reads no data folder and builds no model itself.
    """

    def __init__(
        self,
        cfg: ExperimentConfig,
        run_dir: str,
        resume: bool,
        actors: list[Any],
        plan: PoolPlan,
        log_level: int = logging.INFO,
        pretraining_seconds: float = 0.0,
        progress: bool = True,
        track: bool = True,
    ) -> None:
        """``actors``: the client-actor handles (``start_client_actors``); ``log_level``: the main
        process's, so ``--log-level`` reaches every actor; ``pretraining_seconds``: the launcher's
        time to get the pre-trained weights (``summary.json`` ``seconds_by_stage``); ``progress``:
        Phase 2's bars on or off, as the launcher's; ``track``: live figures into ``run_dir``."""
        hide_unreserved_gpus()  # the driver reserves no GPU: it aggregates on the CPU
        logging.basicConfig(level=log_level, format=ACTOR_LOG_FORMAT)
        self.faults = FaultPlan()
        self.plan = plan
        self.federation = Federation(
            cfg, Path(run_dir), RayExecutor(cfg, actors, self.faults), resume=resume, track=track
        )
        self.federation.pretraining_seconds = pretraining_seconds
        # Phase 2's bars are drawn in the main process (Ray forwards tqdm_ray's updates to it).
        self.federation.progress_bar = tqdm_ray.tqdm if progress else SilentBar

    def status(self) -> dict[str, Any]:
        return {
            "next_round": self.federation.state.next_round,
            "rounds": self.federation.cfg.federation.rounds,
            "actors": self.plan.size,
            "done": self.federation.done,
        }

    def inject_faults(
        self,
        kills: dict[tuple[int, int], int],
        raises: dict[tuple[int, int], int],
        ooms: Optional[dict[tuple[int, int], int]] = None,
    ) -> None:
        """Fault drill: kill the actor running (round, client), make the job raise, or run out of GPU
        memory, n times."""
        self.faults.kills.update(kills)
        self.faults.raises.update(raises)
        self.faults.ooms.update(ooms or {})

    def run_round(self, evaluate: Optional[bool] = None) -> dict[str, Any]:
        summary = self.federation.run_round(evaluate=evaluate)
        summary["driver_rss_mb"] = psutil.Process().memory_info().rss / BYTES_PER_MB
        return summary

    def phase2(self, out_dir: str) -> dict[str, Any]:
        return phase2_of(self.federation, Path(out_dir))

    def finish(self, phase2: Optional[dict[str, Any]] = None) -> dict[str, Any]:
        try:
            return self.federation.finish(phase2)
        finally:
            self.federation.executor.shutdown()

    def shutdown(self) -> None:
        self.federation.close()
        self.federation.executor.shutdown()


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

    def phase2(self, out_dir: Path) -> dict[str, Any]:
        return self._ray.get(self._driver.phase2.remote(str(out_dir)))

    def inject_faults(self, kills: dict, raises: dict, ooms: Optional[dict] = None) -> None:
        self._ray.get(self._driver.inject_faults.remote(kills, raises, ooms or {}))
