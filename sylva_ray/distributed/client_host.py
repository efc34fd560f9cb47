"""What a client actor hosts: one ``ClientWorker`` per process, running the engine's jobs for any client.

The actor class (``distributed.client_actor.ClientActor``) is a shell that imports this module in
its constructor: the process that launches a Ray run must name the class without loading torch,
and the actor's process loads torch and the method (timm, peft and torchattacks when its worker
builds the model) here, never the driver's pandas, tables and plots.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import numpy as np
import psutil
import ray
import torch
from ray.experimental import tqdm_ray

from sylva_ray.base.config import ExperimentConfig
from sylva_ray.base.precision import configure_runtime, runtime_flags
from sylva_ray.distributed.actor_common import ACTOR_LOG_FORMAT, BYTES_PER_MB, GPU_PEAK_METRIC
from sylva_ray.distributed.gpu_visibility import CUDA_VISIBLE_DEVICES
from sylva_ray.distributed.placement import GPUMemoryError, cuda_memory_fraction
from sylva_ray.engine.client import ClientWorker
from sylva_ray.engine.environment import compute_record
from sylva_ray.engine.jobs import (
    Job,
    Outcome,
    WorkerInfo,
    payload_key,
    run_coalition_job,
    run_eval_job,
    run_protocol_job,
    run_tailor_job,
    run_train_job,
    worker_info,
)
from sylva_ray.engine.transfer import FinalModels, decode_models
from sylva_ray.method.data import DataSource, Partition
from sylva_ray.method.wire import decode_state

log = logging.getLogger(__name__)

#: Texts of CUDA allocation failures that torch raises as a plain RuntimeError, not OutOfMemoryError.
CUDA_OOM_TEXTS = ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED")


def gpu_memory_message(
    cfg: ExperimentConfig, client_id: Optional[int], job: str, gpu_fraction: float, detail: str
) -> str:
    """What to change after a CUDA out-of-memory error: the share, the model and the batch sizes."""
    card = ""
    if torch.cuda.is_available():
        total_gb = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / 1024**3
        card = f" of a {total_gb:.1f} GB {torch.cuda.get_device_name()}"
    where = f"client {client_id}'s {job} job" if client_id is not None else job
    return (
        f"CUDA out of memory in {where}: this actor may use {gpu_fraction:g}{card} "
        f"(runtime.client_resources.num_gpus={gpu_fraction:g}) for model.name={cfg.model.name!r} at "
        f"train.batch_size={cfg.train.batch_size}, train.eval_batch_size={cfg.train.eval_batch_size}, "
        f"runtime.precision={cfg.runtime.precision!r}. Raise num_gpus (fewer actors per GPU), lower the batch sizes, "
        f"or train in bf16; docs 'GPUs and precision' has the arithmetic. The run stops here: its last checkpoint is "
        f"intact. ({detail.splitlines()[0] if detail else 'no detail'})"
    )


def as_gpu_memory_error(
    exc: BaseException, cfg: ExperimentConfig, client_id: Optional[int], job: str, gpu_fraction: float
) -> Optional[GPUMemoryError]:
    """The named error for a CUDA allocation failure (torch's ``OutOfMemoryError``, or a CUDA
    library's failed allocation raised as a plain ``RuntimeError``); None for anything else."""
    if isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and any(text in str(exc) for text in CUDA_OOM_TEXTS)
    ):
        return GPUMemoryError(gpu_memory_message(cfg, client_id, job, gpu_fraction, str(exc)))
    return None


def tensors_of(state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The staged backbone (``staging.shareable_state``: read-only numpy views of the object store's
    copy) as tensors over the same memory; ``load_state_dict`` copies them into the model."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in state.items()}


class ClientHost:
    """One ``ClientWorker`` (model built once) running jobs for any client: the client actor's body."""

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
        """``backbone``: ``[reference]`` to the staged pre-trained weights, one level deep so that
        Ray starts this process before they exist: its imports (above) overlap their staging;
        ``[None]``: no pre-trained weights, the worker draws the run's seeded init itself. The actor
        shell (``client_actor.ClientActor``) has hidden unreserved GPUs before this module loaded."""
        logging.basicConfig(level=log_level, format=ACTOR_LOG_FORMAT)
        # Before anything touches CUDA: cuBLAS reads its workspace setting once per process.
        configure_runtime(cfg.runtime.precision, cfg.runtime.deterministic)
        torch.set_num_threads(threads)
        self.cfg, self.gpu_fraction = cfg, gpu_fraction
        self.memory_cap_bytes: Optional[int] = None
        if gpu_fraction > 0 and cfg.runtime.device != "cpu" and torch.cuda.is_available():
            # Ray's num_gpus is bookkeeping only: cap this process's share of the card to match it.
            card = torch.cuda.get_device_properties(torch.cuda.current_device())
            fraction = cuda_memory_fraction(gpu_fraction, card.total_memory, card.name)
            torch.cuda.set_per_process_memory_fraction(fraction)
            self.memory_cap_bytes = int(fraction * card.total_memory)
        elif gpu_fraction > 0 and cfg.runtime.device == "auto":
            log.warning(
                "Ray assigned GPU %s to this actor but torch sees no CUDA device: training on the CPU "
                "(logical GPUs, or a driver/toolkit mismatch on this node)",
                ray.get_gpu_ids(),
            )
        backbone_state = tensors_of(ray.get(backbone[0])) if backbone[0] is not None else None
        # A model that does not fit the share fails here, at start-up: the same one-line error as in a job.
        with self._guard(None, "start-up (building the model)"):
            self.worker = ClientWorker(cfg, source, partition, backbone_state)
        self._decoded: tuple[Optional[str], dict[str, torch.Tensor]] = (None, {})
        self._decoded_models: tuple[Optional[str], Optional[FinalModels]] = (None, None)

    def runtime(self) -> dict[str, Any]:
        """What this process computes on and with which flags: the device, the GPUs it sees, its
        memory cap and the precision switches, read back from torch (the gpu tests check them)."""
        return {
            "device": str(self.worker.device),
            "cuda_visible_devices": os.environ.get(CUDA_VISIBLE_DEVICES),
            "ray_gpu_ids": [str(i) for i in ray.get_gpu_ids()],
            "torch_threads": torch.get_num_threads(),
            **runtime_flags(),
            "precision": self.cfg.runtime.precision,
            "memory_cap_bytes": self.memory_cap_bytes,
        }

    def compute_record(self) -> dict[str, Any]:
        """torch's record and the GPUs this process sees (``environment.json``: the launching
        process holds no torch, so the clients' side is read here)."""
        return compute_record()

    def _adapter(self, payload: bytes) -> dict[str, torch.Tensor]:
        """Decode each broadcast once per actor, however many virtual clients use it."""
        key = payload_key(payload)
        if self._decoded[0] != key:
            self._decoded = (key, decode_state(payload))
        return self._decoded[1]

    def _models(self, payload: Optional[bytes]) -> Optional[FinalModels]:
        """Decode each broadcast of the final models (the transfer sources) once per actor."""
        if payload is None:
            return None
        key = payload_key(payload)
        if self._decoded_models[0] != key:
            self._decoded_models = (key, decode_models(payload))
        return self._decoded_models[1]

    @contextlib.contextmanager
    def _guard(self, client_id: Optional[int], job: str) -> Iterator[None]:
        """CUDA out-of-memory becomes ``GPUMemoryError``: the driver stops the run instead of retrying."""
        try:
            yield
        except RuntimeError as exc:
            named = as_gpu_memory_error(exc, self.cfg, client_id, job, self.gpu_fraction)
            if named is None:
                raise
            raise named from None

    def _measured(self, client_id: int, job: str, work: Callable[[], Outcome]) -> Outcome:
        """``work`` under the out-of-memory guard; on a GPU its peak memory joins the outcome's
        metrics for every kind of job (evaluation, AutoAttack and Phase 2 decide whether a share
        fits as much as training does)."""
        on_gpu = self.worker.device.type == "cuda"
        if on_gpu:
            torch.cuda.reset_peak_memory_stats()
        with self._guard(client_id, job):
            outcome = work()
        if on_gpu:
            outcome.metrics[GPU_PEAK_METRIC] = torch.cuda.max_memory_allocated() / BYTES_PER_MB
        return outcome

    def info(self, num_clients: int) -> WorkerInfo:
        return worker_info(self.worker, num_clients)

    def ping(self) -> int:
        return os.getpid()

    def train(self, job: Job, global_payload: bytes, round_index: int) -> Outcome:
        outcome = self._measured(
            job.client_id, "train", lambda: run_train_job(self.worker, job, self._adapter(global_payload), round_index)
        )
        outcome.metrics["actor_rss_mb"] = psutil.Process().memory_info().rss / BYTES_PER_MB
        outcome.metrics["actor_pid"] = os.getpid()
        outcome.metrics["actor_node"] = ray.get_runtime_context().get_node_id()
        return outcome

    def evaluate(self, job: Job, adapter_payload: bytes, models_payload: Optional[bytes] = None) -> Outcome:
        return self._measured(
            job.client_id,
            "evaluation",
            lambda: run_eval_job(
                self.worker,
                job,
                self._adapter(adapter_payload),
                self._decoded[0] or "",
                self._models(models_payload),
            ),
        )

    def coalition(self, job: Job, adapter_payload: bytes) -> Outcome:
        outcome = self._measured(
            job.client_id,
            "Phase 2 coalition",
            lambda: run_coalition_job(self.worker, job, self._adapter(adapter_payload), self._decoded[0] or ""),
        )
        outcome.metrics["actor_pid"] = os.getpid()  # read by the driver for the value only; never in a result file
        return outcome

    def tailor(self, job: Job, adapter_payload: bytes) -> Outcome:
        return self._measured(
            job.client_id,
            "Phase 2 tailoring",
            lambda: run_tailor_job(self.worker, job, self._adapter(adapter_payload), self._decoded[0] or ""),
        )

    def protocol(self, job: Job, adapter_payload: bytes, models_payload: Optional[bytes] = None) -> Outcome:
        """The final-model protocol; its metrics become the client's row in summary.json, so the
        executor takes the GPU peak out again (into ``gpu_peak_mb_by_stage``). One bar per job,
        drawn in the main process, names the attack this client is under."""
        return self._measured(
            job.client_id,
            "Phase 2 protocol",
            lambda: run_protocol_job(
                self.worker,
                job,
                self._adapter(adapter_payload),
                self._decoded[0] or "",
                progress=tqdm_ray.tqdm,
                models=self._models(models_payload),
            ),
        )
