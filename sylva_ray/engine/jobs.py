"""The job protocol between the driver and wherever client work runs.

The driver's round loop (``engine.federation``) and Phase 2 (``engine.phase2``) hand *jobs* to a
``ClientExecutor`` and get *outcomes* back; an executor runs each job with one of the ``run_*_job``
functions on a ``ClientWorker``. ``InProcessExecutor`` runs them one after another in this process;
the Ray executor (``distributed.actors``) runs the same functions inside client actors. Nothing
here knows about Ray.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol, Sequence

import torch
from tqdm.auto import tqdm

from sylva_ray.base.config import ExperimentConfig
from sylva_ray.base.seeding import derive_seed, torch_seeded
from sylva_ray.engine.client import ClientState, ClientWorker
from sylva_ray.engine.transfer import FinalModels, TransferSource, craft_for_victim, decode_models, transfer_rows
from sylva_ray.method.cost import algorithm_needs_benign, batch_sizes_of, estimate_actor_memory, step_flops_by_batch
from sylva_ray.method.data import DataSource, Partition
from sylva_ray.method.evaluation import TRANSFER_STAGE, attacked_subset_size, protocol_stages
from sylva_ray.method.wire import decode_state, encode_state

State = dict[str, torch.Tensor]


@dataclass
class Job:
    """One unit of client work: which client, with which personal state (and, in Phase 2, which
    coalition to score or which layers to tailor)."""

    client_id: int
    state: ClientState
    mask: Optional[int] = None
    players: Optional[list[int]] = None
    protocol: bool = False  # evaluation: the final-model protocol (AutoAttack + sanity attacks)
    malicious: bool = False  # training: the client attacks this round (adversary.behaviour)
    tuned: Optional[bytes] = None  # Phase 2's protocol: the tailored tensors (layers + head), serialised
    no_tuning: bool = False  # Phase 2's tailoring: leave the fused model as it is (selection ``none``)
    show_progress: bool = True  # Phase 2's protocol: a bar naming the attack in progress
    transfer: list[TransferSource] = field(default_factory=list)  # the final protocol: who crafts for this victim


@dataclass
class Outcome:
    """A job's result. ``upload``: Phase 1's upload, the client's adapter exactly as serialised for the
    wire; ``tuned``: Phase 2's tailored tensors (layers + head), serialised, which stay with the client."""

    client_id: int
    attempts: int = 1
    upload: Optional[bytes] = None
    tuned: Optional[bytes] = None
    state: Optional[ClientState] = None
    num_samples: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    error: Optional[str] = None
    transfer: list[dict[str, Any]] = field(default_factory=list)  # transfer.csv's rows of this victim

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class WorkerInfo:
    """What the driver learns from a freshly built worker: the common starting point."""

    initial_adapter: State
    initial_personal: State
    full_model_bytes: int
    majority_rates: dict[int, float]
    num_train: dict[int, int]
    players: list[str] = field(default_factory=list)
    backbone_digest: str = ""
    step_flops: dict[int, int] = field(default_factory=dict)  # batch size -> FLOPs of one local step (clock)
    train_memory_gb: Optional[float] = None  # one client's training peak, estimated (clock's memory check)


#: Called with each outcome as soon as its job is final (progress bars); results still come back in job order.
OnDone = Optional[Callable[[Outcome], None]]


class ClientExecutor(Protocol):
    #: Peak GPU memory (MiB) of any job of each stage (train, evaluation, phase2_game, tailoring,
    #: protocol) in this session; empty where nothing ran on a GPU.
    gpu_peak_mb: dict[str, float]

    def info(self) -> WorkerInfo: ...
    def train(self, jobs: Sequence[Job], global_payload: bytes, round_index: int) -> list[Outcome]: ...
    def evaluate(
        self, jobs: Sequence[Job], adapter_payload: bytes, models_payload: Optional[bytes] = None
    ) -> list[Outcome]: ...
    def coalitions(self, jobs: Sequence[Job], adapter_payload: bytes, on_done: OnDone = None) -> list[Outcome]: ...
    def tailor(self, jobs: Sequence[Job], adapter_payload: bytes, on_done: OnDone = None) -> list[Outcome]: ...
    def protocol(
        self,
        jobs: Sequence[Job],
        adapter_payload: bytes,
        on_done: OnDone = None,
        models_payload: Optional[bytes] = None,
    ) -> list[Outcome]: ...
    def shutdown(self) -> None: ...


def worker_info(worker: ClientWorker, num_clients: int) -> WorkerInfo:
    """The common starting point; with the simulated clock on, also its one FLOP count per batch shape
    and the memory estimate (done here, in a client process, where timm and peft are loaded anyway)."""
    cfg = worker.cfg
    num_train = {c: len(worker.partition.train[c]) for c in range(num_clients)}
    step_flops: dict[int, int] = {}
    train_memory_gb = None
    if cfg.system.clock:
        shape, classes = worker.source.image_shape, worker.source.num_classes
        # The models built to cost the step draw from torch's global generator: a seeded block keeps
        # those draws from moving anyone else's (and holds the process's RNG lock while it draws).
        with torch_seeded(derive_seed(cfg.runtime.seed, "cost-models")):
            step_flops = step_flops_by_batch(cfg, shape, classes, batch_sizes_of(num_train.values(), cfg.train))
            memory = estimate_actor_memory(cfg, shape, classes, needs_benign=algorithm_needs_benign(cfg))
        train_memory_gb = float(memory["train_peak_gb"])
    return WorkerInfo(
        initial_adapter=worker.initial_adapter,
        initial_personal=worker.initial_personal,
        full_model_bytes=worker.full_model_bytes,
        majority_rates={c: worker.majority_rate(c) for c in range(num_clients)},
        num_train=num_train,
        players=worker.player_names() if cfg.layer_selection.enabled else [],
        backbone_digest=worker.backbone_digest,
        step_flops=step_flops,
        train_memory_gb=train_memory_gb,
    )


def run_train_job(worker: ClientWorker, job: Job, global_adapter: State, round_index: int) -> Outcome:
    """The body of a training job, wherever it runs (in-process or inside an actor)."""
    update = worker.train(job.client_id, job.state, global_adapter, round_index, malicious=job.malicious)
    return Outcome(
        client_id=job.client_id,
        upload=encode_state(update.adapter),
        state=update.state,
        num_samples=update.num_samples,
        metrics=update.metrics.as_dict("train_"),
    )


def run_eval_job(
    worker: ClientWorker, job: Job, adapter: State, adapter_key: str = "", models: Optional[FinalModels] = None
) -> Outcome:
    """An evaluation; with ``job.transfer`` (Phase 1's final protocol) the transfer attacks are
    crafted first, on the participants' final models in ``models``, then scored with the rest."""
    crafted, details = _craft(worker, job, adapter, adapter_key, models, tailored=False)
    result = worker.evaluate(job.client_id, job.state, adapter, protocol=job.protocol, transfer=crafted)
    return Outcome(
        client_id=job.client_id,
        metrics=result.as_dict(),
        transfer=transfer_rows(job.client_id, job.transfer, result, details),
    )


def _craft(
    worker: ClientWorker,
    job: Job,
    adapter: State,
    adapter_key: str,
    models: Optional[FinalModels],
    tailored: bool,
    on_stage: Callable[[str], None] = lambda _: None,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The job's transfer attacks, crafted on the victim's attacked subset (nothing without sources)."""
    if not job.transfer:
        return {}, {}
    if models is None and any(source.kind != "public" for source in job.transfer):
        raise ValueError(f"client {job.client_id}: transfer sources without the final models' payload")
    on_stage(TRANSFER_STAGE)
    test = worker.data(job.client_id).test  # kept here: building a source may load another client's data
    limit = attacked_subset_size(len(test), worker.cfg.attack)
    images, labels = test.pixels(slice(0, limit)), torch.from_numpy(test.labels[:limit])
    details: dict[str, str] = {}

    def source_model(source: TransferSource) -> torch.nn.Module:
        final = models or FinalModels({}, {})  # the public source needs no participant's model
        model, details[source.label] = worker.source_model(source, final, adapter, adapter_key, tailored)
        return model

    cfg, classes = worker.cfg, worker.source.num_classes
    crafted = craft_for_victim(cfg, classes, worker.device, job.client_id, job.transfer, source_model, images, labels)
    return crafted, details


def payload_key(payload: bytes) -> str:
    """Identifies a broadcast, so workers decode it and build fused models once per payload."""
    return hashlib.sha1(payload).hexdigest()


def run_coalition_job(worker: ClientWorker, job: Job, adapter: State, adapter_key: str) -> Outcome:
    """Phase 2: v(S) of one coalition of one client's layer game (and the figures it was computed from)."""
    game = worker.game(job.client_id, job.state, adapter, adapter_key)
    scored = game.value(int(job.mask or 0))
    return Outcome(client_id=job.client_id, metrics={**scored.as_dict(), "validation_samples": len(game.validation)})


def run_tailor_job(worker: ClientWorker, job: Job, adapter: State, adapter_key: str) -> Outcome:
    """Phase 2: fine-tune the selected layers + head; the tuned tensors come back, serialised."""
    game = worker.game(job.client_id, job.state, adapter, adapter_key)
    tuned = game.tailor(None if job.no_tuning else list(job.players or []))
    return Outcome(client_id=job.client_id, tuned=encode_state(tuned))


def run_protocol_job(
    worker: ClientWorker,
    job: Job,
    adapter: State,
    adapter_key: str,
    progress: Optional[Callable[..., Any]] = None,
    models: Optional[FinalModels] = None,
) -> Outcome:
    """Phase 2: the final-model protocol on the client's tailored model (any worker can run it: the
    fused model is rebuilt from the global adapter where this worker has not played the game).

    ``progress``: a bar factory (tqdm's signature); one bar per job shows the attack in progress."""
    game = worker.game(job.client_id, job.state, adapter, adapter_key)
    show = progress is not None and job.show_progress
    stages = len(protocol_stages(worker.cfg.attack, worker.cfg.evaluation))
    bar = progress(total=stages, desc=f"client {job.client_id}") if show else None
    started = [False]

    def on_stage(name: str) -> None:
        if bar is not None:
            if started[0]:
                bar.update(1)
            started[0] = True
            bar.set_description(f"client {job.client_id}: {name}")

    try:
        test = worker.data(job.client_id).test
        crafted, details = _craft(worker, job, adapter, adapter_key, models, tailored=True, on_stage=on_stage)
        result = game.evaluate_tailored(decode_state(job.tuned or b""), test, on_stage, transfer=crafted)
    finally:
        if bar is not None:
            bar.close()
    return Outcome(
        client_id=job.client_id,
        metrics=result.as_dict(),
        transfer=transfer_rows(job.client_id, job.transfer, result, details),
    )


def _each(jobs: Sequence[Job], run: Callable[[Job], Outcome], on_done: OnDone) -> list[Outcome]:
    outcomes = []
    for job in jobs:
        outcomes.append(run(job))
        if on_done is not None:
            on_done(outcomes[-1])
    return outcomes


class InProcessExecutor:
    """Every job on one ``ClientWorker`` in this process, one after another (debugging, baselines)."""

    def __init__(self, cfg: ExperimentConfig, source: DataSource, partition: Partition) -> None:
        if cfg.runtime.torch_threads is not None:  # this process is the worker: its thread count is ours to set
            torch.set_num_threads(cfg.runtime.torch_threads)
        self.worker = ClientWorker(cfg, source, partition)
        self.num_clients = cfg.data.num_clients
        self.gpu_peak_mb: dict[str, float] = {}  # measured by the Ray engine's actors only

    def info(self) -> WorkerInfo:
        return worker_info(self.worker, self.num_clients)

    def train(self, jobs: Sequence[Job], global_payload: bytes, round_index: int) -> list[Outcome]:
        adapter = decode_state(global_payload)
        return [run_train_job(self.worker, job, adapter, round_index) for job in jobs]

    def evaluate(
        self, jobs: Sequence[Job], adapter_payload: bytes, models_payload: Optional[bytes] = None
    ) -> list[Outcome]:
        adapter, key = decode_state(adapter_payload), payload_key(adapter_payload)
        models = decode_models(models_payload) if models_payload is not None else None
        return [run_eval_job(self.worker, job, adapter, key, models) for job in jobs]

    def coalitions(self, jobs: Sequence[Job], adapter_payload: bytes, on_done: OnDone = None) -> list[Outcome]:
        adapter, key = decode_state(adapter_payload), payload_key(adapter_payload)
        return _each(jobs, lambda job: run_coalition_job(self.worker, job, adapter, key), on_done)

    def tailor(self, jobs: Sequence[Job], adapter_payload: bytes, on_done: OnDone = None) -> list[Outcome]:
        adapter, key = decode_state(adapter_payload), payload_key(adapter_payload)
        return _each(jobs, lambda job: run_tailor_job(self.worker, job, adapter, key), on_done)

    def protocol(
        self,
        jobs: Sequence[Job],
        adapter_payload: bytes,
        on_done: OnDone = None,
        models_payload: Optional[bytes] = None,
    ) -> list[Outcome]:
        adapter, key = decode_state(adapter_payload), payload_key(adapter_payload)
        models = decode_models(models_payload) if models_payload is not None else None
        bar = functools.partial(tqdm, leave=False)  # the attack in progress, under the protocol's bar
        return _each(
            jobs, lambda job: run_protocol_job(self.worker, job, adapter, key, progress=bar, models=models), on_done
        )

    def shutdown(self) -> None:
        pass
