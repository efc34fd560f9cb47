"""The client actor: a Ray shell around ``distributed.client_host.ClientHost``.

The process that launches a Ray run names this class to start the actors and must not load torch
for it (~600 MiB and seconds of CPU, for the whole run); so this module imports no torch, and the
actor's own process imports the host -- torch, the model, the method -- in its constructor. Every
method hands its call to the host.

``ClientActor`` is the plain class (Ray names the actor after it); ``RemoteClientActor`` is it as a
Ray actor class, the one a run starts. A test subclasses ``ClientActor`` and wraps its subclass with
``ray.remote`` (its fault drills).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Optional, Sequence

import ray

from sylva_ray.base.config import ExperimentConfig
from sylva_ray.distributed.gpu_visibility import hide_unreserved_gpus

if TYPE_CHECKING:
    from sylva_ray.engine.jobs import Job, Outcome, WorkerInfo
    from sylva_ray.method.data import DataSource, Partition


class ClientActor:
    """Hosts one ``ClientWorker`` (model built once) and runs jobs for any client."""

    def __init__(
        self,
        cfg: ExperimentConfig,
        source: DataSource,
        partition: Partition,
        backbone: Sequence[Optional[ray.ObjectRef]],
        threads: int,
        gpu_fraction: float,
        log_level: int = logging.INFO,
    ) -> None:
        """``backbone``: ``[reference]`` to the staged pre-trained weights (``ClientHost``)."""
        hide_unreserved_gpus()  # first: CUDA reads the variable once, when it starts in this process
        from sylva_ray.distributed.client_host import ClientHost

        self.host = ClientHost(cfg, source, partition, backbone, threads, gpu_fraction, log_level)

    def runtime(self) -> dict[str, Any]:
        return self.host.runtime()

    def compute_record(self) -> dict[str, Any]:
        return self.host.compute_record()

    def info(self, num_clients: int) -> WorkerInfo:
        return self.host.info(num_clients)

    def ping(self) -> int:
        return self.host.ping()

    def train(self, job: Job, global_payload: bytes, round_index: int) -> Outcome:
        return self.host.train(job, global_payload, round_index)

    def evaluate(self, job: Job, adapter_payload: bytes, models_payload: Optional[bytes] = None) -> Outcome:
        return self.host.evaluate(job, adapter_payload, models_payload)

    def coalition(self, job: Job, adapter_payload: bytes) -> Outcome:
        return self.host.coalition(job, adapter_payload)

    def tailor(self, job: Job, adapter_payload: bytes) -> Outcome:
        return self.host.tailor(job, adapter_payload)

    def protocol(self, job: Job, adapter_payload: bytes, models_payload: Optional[bytes] = None) -> Outcome:
        return self.host.protocol(job, adapter_payload, models_payload)


#: The client actor as Ray starts it (``start_client_actors``).
RemoteClientActor = ray.remote(ClientActor)
