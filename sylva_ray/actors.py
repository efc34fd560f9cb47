"""The Ray engine: client actors, the executor that fans jobs out to them, and the driver actor.

Ray lives here and in ``simulation.py`` only; the math (``federation``, ``aggregation``,
``training``) is Ray-free. Following Ray's own patterns:
  * large inputs (the data pools, the pre-trained weights) are ``ray.put`` once and every actor
    receives the same object reference; the backbone is built once per actor, never shipped per call;
  * the global adapter is ``ray.put`` once per round, not re-pickled per client;
  * results are collected with ``ray.wait`` as they finish, then ordered by client id;
  * a client's personal state travels with its job and comes back with the result, so a restarted
    actor (which re-runs ``__init__``) or a re-assigned client loses nothing.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import psutil
import ray
import torch
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayError

from sylva_ray.client import ClientWorker
from sylva_ray.config import ExperimentConfig
from sylva_ray.data import DataSource, Partition
from sylva_ray.federation import (
    Federation,
    Job,
    Outcome,
    WorkerInfo,
    payload_key,
    run_coalition_job,
    run_eval_job,
    run_tailor_job,
    run_train_job,
    worker_info,
)
from sylva_ray.models import build_pretrained_model, decode_state
from sylva_ray.placement import PoolPlan, plan_pool, threads_for

log = logging.getLogger(__name__)

BYTES_PER_MB = 1024 * 1024
#: After a deadline kill: up to 30 pings, 60 s each, 0.5 s apart, before giving up on waiting.
RESTART_PING_TRIES, RESTART_PING_TIMEOUT_S, RESTART_PING_PAUSE_S = 30, 60.0, 0.5


class InjectedFault(RuntimeError):
    """Raised inside a client job on purpose (fault drills and tests)."""


@ray.remote
class ClientActor:
    """Hosts one ``ClientWorker`` (model built once) and runs jobs for any client."""

    def __init__(self, cfg: ExperimentConfig, source: DataSource, partition: Partition,
                 backbone_state: dict[str, torch.Tensor], threads: int, gpu_fraction: float) -> None:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        torch.set_num_threads(threads)
        if gpu_fraction > 0 and torch.cuda.is_available():
            # Ray's num_gpus is bookkeeping only: cap this process's share of the card to match it.
            torch.cuda.set_per_process_memory_fraction(min(1.0, gpu_fraction))
        self.worker = ClientWorker(cfg, source, partition, backbone_state)
        self._decoded: tuple[Optional[str], dict[str, torch.Tensor]] = (None, {})

    def _adapter(self, payload: bytes) -> dict[str, torch.Tensor]:
        """Decode each broadcast once per actor, however many virtual clients use it."""
        key = payload_key(payload)
        if self._decoded[0] != key:
            self._decoded = (key, decode_state(payload))
        return self._decoded[1]

    def info(self, num_clients: int) -> WorkerInfo:
        return worker_info(self.worker, num_clients)

    def ping(self) -> int:
        return os.getpid()

    def train(self, job: Job, global_payload: bytes, round_index: int, fault: Optional[str] = None) -> Outcome:
        if fault == "raise":
            raise InjectedFault(f"injected fault in client {job.client_id}, round {round_index + 1}")
        outcome = run_train_job(self.worker, job, self._adapter(global_payload), round_index)
        outcome.metrics["actor_rss_mb"] = psutil.Process().memory_info().rss / BYTES_PER_MB
        outcome.metrics["actor_pid"] = os.getpid()
        return outcome

    def evaluate(self, job: Job, adapter_payload: bytes) -> Outcome:
        return run_eval_job(self.worker, job, self._adapter(adapter_payload))

    def coalition(self, job: Job, adapter_payload: bytes) -> Outcome:
        adapter = self._adapter(adapter_payload)
        return run_coalition_job(self.worker, job, adapter, self._decoded[0] or "")

    def tailor(self, job: Job, adapter_payload: bytes) -> Outcome:
        adapter = self._adapter(adapter_payload)
        return run_tailor_job(self.worker, job, adapter, self._decoded[0] or "")


@dataclass
class FaultPlan:
    """Faults to inject, for drills and tests: (round, client) -> what to do and how many times."""

    kills: dict[tuple[int, int], int] = field(default_factory=dict)
    raises: dict[tuple[int, int], int] = field(default_factory=dict)


class RayExecutor:
    """Runs jobs on a pool of client actors; retries failed clients, drops them after that."""

    def __init__(self, cfg: ExperimentConfig, plan: PoolPlan, source_ref: ray.ObjectRef, partition: Partition,
                 backbone_ref: ray.ObjectRef, faults: Optional[FaultPlan] = None, placement_group: Any = None) -> None:
        self.cfg = cfg
        self.faults = faults or FaultPlan()
        # Held for the executor's lifetime: a restarted actor re-reads its constructor arguments
        # from the object store, so they must not go out of scope.
        self._pinned = (source_ref, backbone_ref)
        threads = threads_for(cfg.runtime.client_resources, cfg.runtime.torch_threads)
        options = dict(plan.actor_options, max_restarts=cfg.runtime.max_actor_restarts, max_task_retries=0)
        self.actors = [
            ClientActor.options(**options, **_bundle(placement_group, 1 + i)).remote(
                cfg, source_ref, partition, backbone_ref, threads, plan.gpu_fraction)
            for i in range(plan.size)
        ]
        log.info("started %d client actors (%s each, %d torch threads) for %d clients",
                 plan.size, plan.actor_options, threads, cfg.data.num_clients)

    def info(self) -> WorkerInfo:
        return ray.get(self.actors[0].info.remote(self.cfg.data.num_clients))

    def train(self, jobs: Sequence[Job], global_payload: bytes, round_index: int) -> list[Outcome]:
        payload_ref = ray.put(global_payload)  # one copy in the object store for every client this round

        def submit(actor: Any, job: Job) -> ray.ObjectRef:
            fault = self._take(self.faults.raises, round_index, job.client_id) and "raise"
            ref = actor.train.remote(job, payload_ref, round_index, fault or None)
            if self._take(self.faults.kills, round_index, job.client_id):
                log.warning("fault drill: killing the actor running client %d in round %d", job.client_id, round_index + 1)
                ray.kill(actor, no_restart=False)
            return ref

        return self._run(jobs, submit, self.cfg.federation.round_timeout_s)

    def evaluate(self, jobs: Sequence[Job], adapter_payload: bytes) -> list[Outcome]:
        payload_ref = ray.put(adapter_payload)
        return self._run(jobs, lambda actor, job: actor.evaluate.remote(job, payload_ref), None)

    def coalitions(self, jobs: Sequence[Job], adapter_payload: bytes) -> list[Outcome]:
        """Phase 2 coalition evaluations of every client at once, spread over all actors."""
        payload_ref = ray.put(adapter_payload)
        return self._run(jobs, lambda actor, job: actor.coalition.remote(job, payload_ref), None)

    def tailor(self, jobs: Sequence[Job], adapter_payload: bytes) -> list[Outcome]:
        payload_ref = ray.put(adapter_payload)
        return self._run(jobs, lambda actor, job: actor.tailor.remote(job, payload_ref), None)

    @staticmethod
    def _take(budget: dict[tuple[int, int], int], round_index: int, client_id: int) -> bool:
        key = (round_index, client_id)
        if budget.get(key, 0) > 0:
            budget[key] -= 1
            return True
        return False

    def _run(self, jobs: Sequence[Job], submit: Callable[[Any, Job], ray.ObjectRef], timeout_s: Optional[float]) -> list[Outcome]:
        """One job per idle actor; collect with ``ray.wait``; retry a failure, then drop the job."""
        pending: deque[int] = deque(range(len(jobs)))
        idle: deque[int] = deque(range(len(self.actors)))
        attempts = [0] * len(jobs)
        in_flight: dict[ray.ObjectRef, tuple[int, int]] = {}  # ref -> (actor index, job index)
        outcomes: dict[int, Outcome] = {}
        deadline = time.monotonic() + timeout_s if timeout_s else None
        while pending or in_flight:
            while pending and idle:
                actor_index, job_index = idle.popleft(), pending.popleft()
                attempts[job_index] += 1
                in_flight[submit(self.actors[actor_index], jobs[job_index])] = (actor_index, job_index)
            wait_s = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=wait_s)
            if not ready:
                self._drop_stragglers(jobs, in_flight, pending, attempts, outcomes)
                break
            for ref in ready:
                actor_index, job_index = in_flight.pop(ref)
                idle.append(actor_index)
                job = jobs[job_index]
                try:
                    outcome = ray.get(ref)
                    outcome.attempts = attempts[job_index]
                    outcomes[job_index] = outcome
                except RayError as exc:
                    tries = attempts[job_index]
                    log.error("client %d failed on actor %d (attempt %d):\n%s", job.client_id, actor_index, tries, exc)
                    if isinstance(exc, (ActorDiedError, ActorUnavailableError)):
                        # Ray fails calls to a restarting actor at once: wait until it answers again,
                        # or the retry would fail the same way (seen under load).
                        self._await_restart([actor_index])
                    if tries <= self.cfg.runtime.client_retries:
                        pending.appendleft(job_index)
                    else:
                        outcomes[job_index] = Outcome(job.client_id, attempts=tries, error=f"{type(exc).__name__}: {exc}")
        return [outcomes[i] for i in range(len(jobs))]

    def _drop_stragglers(self, jobs: Sequence[Job], in_flight: dict, pending: deque, attempts: list[int], outcomes: dict[int, Outcome]) -> None:
        """Deadline passed: drop unfinished jobs; restart the busy actors (a running task cannot be cancelled)."""
        for actor_index, job_index in in_flight.values():
            outcomes[job_index] = Outcome(jobs[job_index].client_id, attempts=attempts[job_index], error="round deadline exceeded")
            ray.kill(self.actors[actor_index], no_restart=False)
        for job_index in pending:
            outcomes[job_index] = Outcome(jobs[job_index].client_id, attempts=attempts[job_index], error="round deadline exceeded (not started)")
        log.warning("round deadline: dropped clients %s", sorted(jobs[j].client_id for j in [*(j for _, j in in_flight.values()), *pending]))
        killed = sorted({actor_index for actor_index, _ in in_flight.values()})
        in_flight.clear()
        pending.clear()
        self._await_restart(killed)

    def _await_restart(self, indices: list[int]) -> None:
        """Block until killed actors answer again, so the next jobs do not race their restart."""
        for index in indices:
            for _ in range(RESTART_PING_TRIES):
                try:
                    ray.get(self.actors[index].ping.remote(), timeout=RESTART_PING_TIMEOUT_S)
                    break
                except RayError:
                    time.sleep(RESTART_PING_PAUSE_S)

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)


def _bundle(placement_group: Any, index: int) -> dict[str, Any]:
    """Schedule into bundle ``index`` of a Tune trial's placement group (bundle 0 is the driver's)."""
    if placement_group is None:
        return {}
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    return {"scheduling_strategy": PlacementGroupSchedulingStrategy(placement_group, placement_group_bundle_index=index)}


def bundle_totals(placement_group: Any) -> tuple[dict[str, float], int]:
    """Resources of the client bundles (all but bundle 0) and how many there are."""
    clients = placement_group.bundle_specs[1:]
    totals: dict[str, float] = {}
    for bundle in clients:
        for key, value in bundle.items():
            totals[key] = totals.get(key, 0.0) + value
    return totals, len(clients)


@ray.remote(num_cpus=0)
class DriverActor:
    """Owns the federation: data and weights resolved once, client actors, the round loop, the run directory."""

    def __init__(self, cfg: ExperimentConfig, run_dir: str, resume: bool, placement_group: Any = None) -> None:
        """``placement_group``: a Tune trial's reservation; the pool is then sized from its bundles,
        not from the whole cluster, and every client actor is placed in its own bundle."""
        from sylva_ray.simulation import prepare_data

        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        self.faults = FaultPlan()
        source, partition = prepare_data(cfg, Path(run_dir), resume)
        base = build_pretrained_model(cfg.model, cfg.data, source)  # embedded pre-training / hub / file, once
        backbone_ref = ray.put({k: v.detach().cpu() for k, v in base.backbone.state_dict().items()})
        source_ref = ray.put(source)
        if placement_group is None:
            self.plan = plan_pool(ray.cluster_resources(), cfg.runtime.client_resources, cfg.data.num_clients, cfg.runtime.num_actors)
        else:
            totals, bundles = bundle_totals(placement_group)
            self.plan = plan_pool(totals, cfg.runtime.client_resources, cfg.data.num_clients, bundles)
        executor = RayExecutor(cfg, self.plan, source_ref, partition, backbone_ref, self.faults, placement_group)
        self.federation = Federation(cfg, Path(run_dir), executor, resume=resume)

    def status(self) -> dict[str, Any]:
        return {"next_round": self.federation.state.next_round, "rounds": self.federation.cfg.federation.rounds,
                "actors": self.plan.size, "done": self.federation.done}

    def inject_faults(self, kills: dict[tuple[int, int], int], raises: dict[tuple[int, int], int]) -> None:
        """Fault drill: kill the actor running (round, client), or make the job raise, n times."""
        self.faults.kills.update(kills)
        self.faults.raises.update(raises)

    def run_round(self, evaluate: Optional[bool] = None) -> dict[str, Any]:
        summary = self.federation.run_round(evaluate=evaluate)
        summary["driver_rss_mb"] = psutil.Process().memory_info().rss / BYTES_PER_MB
        return summary

    def phase2(self, out_dir: str) -> dict[str, Any]:
        return self.federation.phase2(Path(out_dir))

    def finish(self) -> dict[str, Any]:
        try:
            return self.federation.finish()
        finally:
            self.federation.executor.shutdown()

    def shutdown(self) -> None:
        self.federation.executor.shutdown()
