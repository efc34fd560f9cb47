"""The Ray engine's executor: the client actors' work fanned out from the driver actor.

Following Ray's own patterns:
  * the global adapter is ``ray.put`` once per round, not re-pickled per client;
  * results are collected with ``ray.wait`` as they finish, then ordered by client id;
  * a client's personal state travels with its job and comes back with the result, so a restarted
    actor (which re-runs ``__init__``) or a re-assigned client loses nothing.
It runs in the driver actor's process, which holds torch and the engine; the launching process
never imports it.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Any, Callable, Optional, Sequence

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayError

from sylva_ray.base.config import ExperimentConfig
from sylva_ray.base.errors import named_user_error
from sylva_ray.distributed.actor_common import GPU_PEAK_METRIC
from sylva_ray.distributed.placement import ActorStartError, GPUMemoryError, PlacementError
from sylva_ray.engine.jobs import Job, OnDone, Outcome, WorkerInfo

log = logging.getLogger(__name__)

#: While waiting for a restarted actor: each ping waits at most this long, with this pause between.
RESTART_PING_TIMEOUT_S, RESTART_PING_PAUSE_S = 5.0, 0.5


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


class RayExecutor:
    """Runs jobs on a pool of client actors; retries failed clients, drops them after that.

    An actor that dies is restarted by Ray (``runtime.max_actor_restarts``); one that is not back
    within ``runtime.actor_restart_timeout_s`` (its node is gone and nothing else has room) leaves
    the pool, and its clients move to the remaining actors. CUDA out-of-memory is not retried.
    """

    def __init__(self, cfg: ExperimentConfig, actors: Sequence[Any]) -> None:
        """``actors``: client-actor handles (``start_client_actors``), started by whoever had the
        inputs first, so that they build their models while the driver starts."""
        self.cfg = cfg
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
            return actor.train.remote(job, payload_ref, round_index)

        return self._run(jobs, submit, self.cfg.federation.round_timeout_s, stage="train")

    def evaluate(
        self, jobs: Sequence[Job], adapter_payload: bytes, models_payload: Optional[bytes] = None
    ) -> list[Outcome]:
        """``models_payload``: every participant's final model (the transfer sources), one copy in
        the object store for every job, like the adapter."""
        payload_ref = ray.put(adapter_payload)
        models_ref = ray.put(models_payload)
        submit = lambda actor, job: actor.evaluate.remote(job, payload_ref, models_ref)  # noqa: E731
        return self._run(jobs, submit, None, stage="evaluation")

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

    def protocol(
        self,
        jobs: Sequence[Job],
        adapter_payload: bytes,
        on_done: OnDone = None,
        models_payload: Optional[bytes] = None,
    ) -> list[Outcome]:
        """The final-model protocol of every tailored model on whichever actor is free (no affinity):
        its attacks are most of Phase 2's time, and the caller orders the jobs largest first."""
        payload_ref = ray.put(adapter_payload)
        models_ref = ray.put(models_payload)
        submit = lambda actor, job: actor.protocol.remote(job, payload_ref, models_ref)  # noqa: E731
        return self._run(jobs, submit, None, on_done=on_done, stage="protocol")

    def home_actor(self, client_id: int) -> int:
        """The actor a client's Phase 2 jobs go to: a fixed spread of clients over the pool."""
        return client_id % len(self.actors)

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
