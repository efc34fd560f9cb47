"""The Ray engine: client actors, the executor that fans jobs out to them, and the driver actor.

Ray lives in ``sylva_ray.distributed`` only; the engine and the math are Ray-free: an actor runs
the engine's jobs (``engine.jobs.run_*_job``) and the driver actor runs the engine's round loop.
Following Ray's own patterns:
  * large inputs (the data pools, the pre-trained weights) are ``ray.put`` once and every actor
    receives the same object reference; the backbone is built once per actor, never shipped per call;
  * the global adapter is ``ray.put`` once per round, not re-pickled per client;
  * results are collected with ``ray.wait`` as they finish, then ordered by client id;
  * a client's personal state travels with its job and comes back with the result, so a restarted
    actor (which re-runs ``__init__``) or a re-assigned client loses nothing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import psutil
import ray
import torch
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayError
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from sylva_ray.base.config import ExperimentConfig
from sylva_ray.base.precision import configure_runtime
from sylva_ray.distributed.placement import (
    GPUMemoryError,
    PlacementError,
    PoolPlan,
    threads_for,
)
from sylva_ray.engine.client import ClientWorker
from sylva_ray.engine.federation import Federation
from sylva_ray.engine.jobs import (
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
from sylva_ray.engine.runner import phase2_of
from sylva_ray.method.data import DataSource, Partition
from sylva_ray.method.models import decode_state

log = logging.getLogger(__name__)

BYTES_PER_MB = 1024 * 1024
#: Memory a CUDA process needs outside torch's allocator (context, cuBLAS/cuDNN workspaces): kept
#: out of the allocator's cap, or two actors at half a card each could still overfill it.
CUDA_CONTEXT_RESERVE_BYTES = 1024**3
#: Texts of CUDA allocation failures that torch raises as a plain RuntimeError, not OutOfMemoryError.
CUDA_OOM_TEXTS = ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED")
#: While waiting for a restarted actor: each ping waits at most this long, with this pause between.
RESTART_PING_TIMEOUT_S, RESTART_PING_PAUSE_S = 5.0, 0.5


#: How actors format their log lines (Ray prefixes each with the actor's name and pid).
ACTOR_LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"


def main_process_log_level() -> int:
    """The level actors log at: the main process's, when it configured logging (``--log-level``);
    INFO otherwise (a Tune trial or a notebook that never called ``logging.basicConfig``)."""
    root = logging.getLogger()
    return root.level if root.handlers else logging.INFO


class InjectedFault(RuntimeError):
    """Raised inside a client job on purpose (fault drills and tests)."""


def gpu_memory_message(cfg: ExperimentConfig, client_id: int, job: str, gpu_fraction: float, detail: str) -> str:
    """What to change after a CUDA out-of-memory error: the share, the model and the batch sizes."""
    card = ""
    if torch.cuda.is_available():
        total_gb = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / 1024**3
        card = f" of a {total_gb:.1f} GB {torch.cuda.get_device_name()}"
    return (
        f"CUDA out of memory in client {client_id}'s {job} job: this actor may use {gpu_fraction:g}{card} "
        f"(runtime.client_resources.num_gpus={gpu_fraction:g}) for model.name={cfg.model.name!r} at "
        f"train.batch_size={cfg.train.batch_size}, train.eval_batch_size={cfg.train.eval_batch_size}, "
        f"runtime.precision={cfg.runtime.precision!r}. Raise num_gpus (fewer actors per GPU), lower the batch sizes, "
        f"or train in bf16; README 'GPU memory' has the arithmetic. The run stops here: its last checkpoint is intact. "
        f"({detail.splitlines()[0] if detail else 'no detail'})"
    )


@ray.remote
class ClientActor:
    """Hosts one ``ClientWorker`` (model built once) and runs jobs for any client."""

    def __init__(
        self,
        cfg: ExperimentConfig,
        source: DataSource,
        partition: Partition,
        backbone_state: dict[str, torch.Tensor],
        threads: int,
        gpu_fraction: float,
        log_level: int = logging.INFO,
    ) -> None:
        logging.basicConfig(level=log_level, format=ACTOR_LOG_FORMAT)
        # Before anything touches CUDA: cuBLAS reads its workspace setting once per process.
        configure_runtime(cfg.runtime.precision, cfg.runtime.deterministic)
        torch.set_num_threads(threads)
        self.cfg, self.gpu_fraction = cfg, gpu_fraction
        if gpu_fraction > 0 and torch.cuda.is_available():
            # Ray's num_gpus is bookkeeping only: cap this process's share of the card to match it,
            # less what the CUDA context takes outside the allocator.
            total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
            torch.cuda.set_per_process_memory_fraction(
                max(0.0, min(1.0, gpu_fraction) - CUDA_CONTEXT_RESERVE_BYTES / total)
            )
        elif gpu_fraction > 0 and cfg.runtime.device == "auto":
            log.warning(
                "Ray assigned GPU %s to this actor but torch sees no CUDA device: training on the CPU "
                "(logical GPUs, or a driver/toolkit mismatch on this node)",
                ray.get_gpu_ids(),
            )
        self.worker = ClientWorker(cfg, source, partition, backbone_state)
        self._decoded: tuple[Optional[str], dict[str, torch.Tensor]] = (None, {})

    def _adapter(self, payload: bytes) -> dict[str, torch.Tensor]:
        """Decode each broadcast once per actor, however many virtual clients use it."""
        key = payload_key(payload)
        if self._decoded[0] != key:
            self._decoded = (key, decode_state(payload))
        return self._decoded[1]

    @contextlib.contextmanager
    def _guard(self, client_id: int, job: str) -> Iterator[None]:
        """CUDA out-of-memory becomes ``GPUMemoryError``: the driver stops the run instead of retrying."""
        try:
            yield
        except torch.OutOfMemoryError as exc:
            raise GPUMemoryError(gpu_memory_message(self.cfg, client_id, job, self.gpu_fraction, str(exc))) from None
        except RuntimeError as exc:
            if not any(text in str(exc) for text in CUDA_OOM_TEXTS):
                raise
            raise GPUMemoryError(gpu_memory_message(self.cfg, client_id, job, self.gpu_fraction, str(exc))) from None

    def info(self, num_clients: int) -> WorkerInfo:
        return worker_info(self.worker, num_clients)

    def ping(self) -> int:
        return os.getpid()

    def train(self, job: Job, global_payload: bytes, round_index: int, fault: Optional[str] = None) -> Outcome:
        if fault == "raise":
            raise InjectedFault(f"injected fault in client {job.client_id}, round {round_index + 1}")
        on_gpu = self.worker.device.type == "cuda"
        if on_gpu:
            torch.cuda.reset_peak_memory_stats()
        with self._guard(job.client_id, "train"):
            if fault == "oom":
                raise torch.OutOfMemoryError(
                    "CUDA out of memory. Tried to allocate 2.00 GiB (injected by a fault drill)"
                )
            outcome = run_train_job(self.worker, job, self._adapter(global_payload), round_index)
        outcome.metrics["actor_rss_mb"] = psutil.Process().memory_info().rss / BYTES_PER_MB
        outcome.metrics["actor_pid"] = os.getpid()
        outcome.metrics["actor_node"] = ray.get_runtime_context().get_node_id()
        if on_gpu:
            outcome.metrics["gpu_peak_mb"] = torch.cuda.max_memory_allocated() / BYTES_PER_MB
        return outcome

    def evaluate(self, job: Job, adapter_payload: bytes) -> Outcome:
        with self._guard(job.client_id, "evaluation"):
            return run_eval_job(self.worker, job, self._adapter(adapter_payload))

    def coalition(self, job: Job, adapter_payload: bytes) -> Outcome:
        with self._guard(job.client_id, "Phase 2 coalition"):
            adapter = self._adapter(adapter_payload)
            outcome = run_coalition_job(self.worker, job, adapter, self._decoded[0] or "")
        outcome.metrics["actor_pid"] = os.getpid()  # read by the driver for the value only; never in a result file
        return outcome

    def tailor(self, job: Job, adapter_payload: bytes) -> Outcome:
        # Its metrics become the client's final row in summary.json: nothing machine-dependent here.
        with self._guard(job.client_id, "Phase 2 tailoring"):
            adapter = self._adapter(adapter_payload)
            return run_tailor_job(self.worker, job, adapter, self._decoded[0] or "")


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


class RayExecutor:
    """Runs jobs on a pool of client actors; retries failed clients, drops them after that.

    An actor that dies is restarted by Ray (``runtime.max_actor_restarts``); one that is not back
    within ``runtime.actor_restart_timeout_s`` (its node is gone and nothing else has room) leaves
    the pool, and its clients move to the remaining actors. CUDA out-of-memory is not retried.
    """

    def __init__(
        self,
        cfg: ExperimentConfig,
        plan: PoolPlan,
        source_ref: ray.ObjectRef,
        partition: Partition,
        backbone_ref: ray.ObjectRef,
        faults: Optional[FaultPlan] = None,
        placement_group: Any = None,
        log_level: int = logging.INFO,
    ) -> None:
        self.cfg = cfg
        self.faults = faults or FaultPlan()
        # Held for the executor's lifetime: a restarted actor re-reads its constructor arguments
        # from the object store, so they must not go out of scope.
        self._pinned = (source_ref, backbone_ref)
        threads = threads_for(cfg.runtime.client_resources, cfg.runtime.torch_threads)
        options = dict(plan.actor_options, max_restarts=cfg.runtime.max_actor_restarts, max_task_retries=0)
        self.actors = [
            ClientActor.options(**options, **_bundle(placement_group, 1 + i)).remote(
                cfg, source_ref, partition, backbone_ref, threads, plan.gpu_fraction, log_level
            )
            for i in range(plan.size)
        ]
        self.retired: set[int] = set()
        log.info(
            "started %d client actors (%s each, %d torch threads) for %d clients",
            plan.size,
            plan.actor_options,
            threads,
            cfg.data.num_clients,
        )

    @property
    def live(self) -> list[int]:
        return [i for i in range(len(self.actors)) if i not in self.retired]

    def info(self) -> WorkerInfo:
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

        return self._run(jobs, submit, self.cfg.federation.round_timeout_s)

    def evaluate(self, jobs: Sequence[Job], adapter_payload: bytes) -> list[Outcome]:
        payload_ref = ray.put(adapter_payload)
        return self._run(jobs, lambda actor, job: actor.evaluate.remote(job, payload_ref), None)

    def coalitions(self, jobs: Sequence[Job], adapter_payload: bytes) -> list[Outcome]:
        """Phase 2 coalition evaluations of every client at once; a client's jobs go to one actor
        (its game and fused model are built there once), another only if that actor is gone."""
        payload_ref = ray.put(adapter_payload)
        return self._run(jobs, lambda actor, job: actor.coalition.remote(job, payload_ref), None, affinity=True)

    def tailor(self, jobs: Sequence[Job], adapter_payload: bytes) -> list[Outcome]:
        payload_ref = ray.put(adapter_payload)
        return self._run(jobs, lambda actor, job: actor.tailor.remote(job, payload_ref), None, affinity=True)

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
    ) -> list[Outcome]:
        """One job per idle actor; collect with ``ray.wait``; retry a failure, then drop the job."""
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
                    outcomes[job_index] = outcome
                    idle.append(actor_index)
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
        return [outcomes[i] for i in range(len(jobs))]

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
    """Owns the federation: client actors, the round loop, the run directory.

    The data and the pre-trained backbone arrive as object references (read once where the run
    started), the partition and the pool plan as values: the driver reads no data folder itself.
    """

    def __init__(
        self,
        cfg: ExperimentConfig,
        run_dir: str,
        resume: bool,
        inputs: dict[str, ray.ObjectRef],
        partition: Partition,
        plan: PoolPlan,
        placement_group: Any = None,
        log_level: int = logging.INFO,
    ) -> None:
        """``inputs``: ``{"source": ref, "backbone": ref}`` (a dict, so Ray hands the references on
        instead of resolving them here); ``placement_group``: a Tune trial's reservation, each
        client actor then goes into its own bundle; ``log_level``: the main process's, so
        ``--log-level`` reaches every actor."""
        logging.basicConfig(level=log_level, format=ACTOR_LOG_FORMAT)
        self.faults = FaultPlan()
        self.plan = plan
        executor = RayExecutor(
            cfg, plan, inputs["source"], partition, inputs["backbone"], self.faults, placement_group, log_level
        )
        self.federation = Federation(cfg, Path(run_dir), executor, resume=resume)

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
