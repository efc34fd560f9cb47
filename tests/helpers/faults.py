"""Fault drills for the Ray engine, in test-only subclasses of the production actors and executor.

``drill(kills=..., raises=..., ooms=...)`` gives the ``ActorClasses`` a test hands to ``run``: each
maps (round, client) to how many times that client's training job in that round (a retry included)
has its actor killed under it (Ray restarts the actor), raises ``InjectedFault``, or runs out of
GPU memory (torch's own ``OutOfMemoryError``, raised inside the job's out-of-memory guard). The
driver actor's executor counts them down where it hands the jobs out, so a retry on another actor
sees the same budget.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import sys
from typing import Any, Mapping, Optional, Sequence

import ray
from ray import cloudpickle

from sylva_ray.distributed.actors import ActorClasses, DriverActor
from sylva_ray.distributed.client_actor import ClientActor
from sylva_ray.distributed.executor import RayExecutor
from sylva_ray.engine.jobs import Job, Outcome

# Ray pickles these classes by value: the actors' processes need not import the tests package.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

log = logging.getLogger(__name__)

Budget = dict[tuple[int, int], int]


class InjectedFault(RuntimeError):
    """Raised inside a client job on purpose."""


@dataclasses.dataclass
class FaultPlan:
    """(round, client) -> how many times to kill the actor under the job, make it raise, or run out of memory."""

    kills: Budget = dataclasses.field(default_factory=dict)
    raises: Budget = dataclasses.field(default_factory=dict)
    ooms: Budget = dataclasses.field(default_factory=dict)


def take(budget: Budget, round_index: int, client_id: int) -> bool:
    key = (round_index, client_id)
    if budget.get(key, 0) > 0:
        budget[key] -= 1
        return True
    return False


class DrillClientActor(ClientActor):
    """A client actor that can run a training job with a fault."""

    def train_with_fault(self, job: Job, global_payload: bytes, round_index: int, fault: str) -> Outcome:
        if fault == "raise":
            raise InjectedFault(f"injected fault in client {job.client_id}, round {round_index + 1}")
        import torch

        def out_of_memory() -> Outcome:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected by a fault drill)")

        return self.host._measured(job.client_id, "train", out_of_memory)


class DrillExecutor(RayExecutor):
    """``RayExecutor`` whose training jobs follow a ``FaultPlan``."""

    def __init__(self, cfg: Any, actors: Sequence[Any], faults: FaultPlan) -> None:
        super().__init__(cfg, actors)
        self.faults = faults

    def train(self, jobs: Sequence[Job], global_payload: bytes, round_index: int) -> list[Outcome]:
        payload_ref = ray.put(global_payload)

        def submit(actor: Any, job: Job) -> ray.ObjectRef:
            client = job.client_id
            fault = (
                "raise"
                if take(self.faults.raises, round_index, client)
                else "oom"
                if take(self.faults.ooms, round_index, client)
                else None
            )
            if fault is None:
                ref = actor.train.remote(job, payload_ref, round_index)
            else:
                ref = actor.train_with_fault.remote(job, payload_ref, round_index, fault)
            if take(self.faults.kills, round_index, client):
                log.warning("fault drill: killing the actor running client %d in round %d", client, round_index + 1)
                ray.kill(actor, no_restart=False)
            return ref

        return self._run(jobs, submit, self.cfg.federation.round_timeout_s, stage="train")


class DrillDriverActor(DriverActor):
    """A driver actor whose executor follows the class's ``faults``."""

    faults: FaultPlan = FaultPlan()

    def make_executor(self, actors: list[Any]) -> RayExecutor:
        return DrillExecutor(self.cfg, actors, copy.deepcopy(self.faults))


def drill(
    kills: Optional[Mapping[tuple[int, int], int]] = None,
    raises: Optional[Mapping[tuple[int, int], int]] = None,
    ooms: Optional[Mapping[tuple[int, int], int]] = None,
) -> ActorClasses:
    """The actor classes of a run with these faults (``run(cfg, run_dir, actor_classes=drill(...))``)."""
    plan = FaultPlan(dict(kills or {}), dict(raises or {}), dict(ooms or {}))
    driver = type("DrillDriverActor", (DrillDriverActor,), {"faults": plan})
    return ActorClasses(driver=ray.remote(num_cpus=0)(driver), client=ray.remote(DrillClientActor))
