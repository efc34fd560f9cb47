"""Phase 1's round loop, Ray-free: sample -> broadcast -> train -> aggregate -> evaluate -> record.

``Federation`` owns the federation's state (global adapter, every client's personal state, the
metrics so far) and runs one round at a time. *Where* client work runs is an executor's business:
``InProcessExecutor`` below calls one ``ClientWorker`` in turn; the Ray engine
(``sylva_ray.actors.RayExecutor``) fans jobs out to client actors and copes with failures. Updates
are ordered by client id before aggregation, so results never depend on completion order.

One round, as data:
    driver --(global adapter as safetensors bytes, one copy)--> clients
    clients --(their adapter bytes + metrics; head stays in ClientState)--> driver
    driver: aggregate in client-id order -> new global adapter -> evaluate -> checkpoint
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Protocol, Sequence

import numpy as np
import pandas as pd
import torch

from sylva_ray.aggregation import aggregate
from sylva_ray.algorithms import algorithm_for
from sylva_ray.client import GLOBAL_TEST_CLIENT, ClientState, ClientWorker
from sylva_ray.config import ConfigError, ExperimentConfig
from sylva_ray.data import DataSource, Partition
from sylva_ray.models import damaged_file_message, decode_state, encode_state
from sylva_ray.results import plot_accuracy, write_json, write_table
from sylva_ray.sanity import sanity_warnings
from sylva_ray.seeding import numpy_rng
from sylva_ray.storage import atomic_write_bytes, atomic_write_with

log = logging.getLogger(__name__)

State = dict[str, torch.Tensor]
CHECKPOINT_NAME = "checkpoint.pt"


def sample_participants(num_clients: int, fraction: float, seed: int, round_index: int) -> list[int]:
    """Seeded client sampling: ``max(1, round(fraction * K))`` distinct clients, sorted by id."""
    count = max(1, int(round(fraction * num_clients)))
    rng = numpy_rng(seed, "participants", round_index)
    return sorted(int(c) for c in rng.choice(num_clients, size=count, replace=False))


def is_eval_round(round_index: int, cfg: ExperimentConfig) -> bool:
    last = round_index == cfg.federation.rounds - 1
    return last or (round_index + 1) % cfg.federation.eval_every == 0


# --- what executors take and give back ------------------------------------------------------------
@dataclass
class Job:
    """One unit of client work: which client, with which personal state (and, in Phase 2, which
    coalition to score or which layers to tailor)."""

    client_id: int
    state: ClientState
    mask: Optional[int] = None
    players: Optional[list[int]] = None
    protocol: bool = False  # evaluation: the final-model protocol (AutoAttack + sanity attacks)


@dataclass
class Outcome:
    """A job's result. ``upload`` is the client's adapter exactly as serialised for the wire."""

    client_id: int
    attempts: int = 1
    upload: Optional[bytes] = None
    state: Optional[ClientState] = None
    num_samples: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    error: Optional[str] = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class WorkerInfo:
    """What the driver learns from a freshly built worker: the common starting point."""

    initial_adapter: State
    initial_head: State
    full_model_bytes: int
    majority_rates: dict[int, float]
    num_train: dict[int, int]
    players: list[str] = field(default_factory=list)
    backbone_digest: str = ""


class ClientExecutor(Protocol):
    def info(self) -> WorkerInfo: ...
    def train(self, jobs: Sequence[Job], global_payload: bytes, round_index: int) -> list[Outcome]: ...
    def evaluate(self, jobs: Sequence[Job], adapter_payload: bytes) -> list[Outcome]: ...
    def coalitions(self, jobs: Sequence[Job], adapter_payload: bytes) -> list[Outcome]: ...
    def tailor(self, jobs: Sequence[Job], adapter_payload: bytes) -> list[Outcome]: ...
    def shutdown(self) -> None: ...


def worker_info(worker: ClientWorker, num_clients: int) -> WorkerInfo:
    return WorkerInfo(
        initial_adapter=worker.initial_adapter,
        initial_head=worker.initial_head,
        full_model_bytes=worker.full_model_bytes,
        majority_rates={c: worker.data(c).majority_class_rate() for c in range(num_clients)},
        num_train={c: len(worker.data(c).train) for c in range(num_clients)},
        players=worker.player_names() if worker.cfg.layer_selection.enabled else [],
        backbone_digest=worker.backbone_digest,
    )


def run_train_job(worker: ClientWorker, job: Job, global_adapter: State, round_index: int) -> Outcome:
    """The body of a training job, wherever it runs (in-process or inside an actor)."""
    update = worker.train(job.client_id, job.state, global_adapter, round_index)
    upload = encode_state(update.adapter) if worker.algorithm.federated else None  # local training sends nothing
    return Outcome(
        client_id=job.client_id, upload=upload, state=update.state,
        num_samples=update.num_samples, metrics=update.metrics.as_dict("train_"),
    )


def run_eval_job(worker: ClientWorker, job: Job, adapter: State) -> Outcome:
    result = worker.evaluate(job.client_id, job.state, adapter, protocol=job.protocol)
    return Outcome(client_id=job.client_id, metrics=result.as_dict())


def payload_key(payload: bytes) -> str:
    """Identifies a broadcast, so workers decode it and build fused models once per payload."""
    return hashlib.sha1(payload).hexdigest()


def run_coalition_job(worker: ClientWorker, job: Job, adapter: State, adapter_key: str) -> Outcome:
    """Phase 2: v(S) of one coalition of one client's layer game."""
    scored = worker.game(job.client_id, job.state, adapter, adapter_key).value(int(job.mask or 0))
    return Outcome(client_id=job.client_id, metrics={"value": scored.value, "clean_acc": scored.clean_acc, "robust_acc": scored.robust_acc})


def run_tailor_job(worker: ClientWorker, job: Job, adapter: State, adapter_key: str) -> Outcome:
    """Phase 2: fine-tune the selected layers + head; the tuned tensors come back as the upload."""
    game = worker.game(job.client_id, job.state, adapter, adapter_key)
    result, tuned = game.tailor(list(job.players or []), worker.data(job.client_id).test)
    return Outcome(client_id=job.client_id, upload=encode_state(tuned), metrics=result.as_dict())


class InProcessExecutor:
    """Every job on one ``ClientWorker`` in this process, one after another (debugging, baselines)."""

    def __init__(self, cfg: ExperimentConfig, source: DataSource, partition: Partition) -> None:
        self.worker = ClientWorker(cfg, source, partition)
        self.num_clients = cfg.data.num_clients

    def info(self) -> WorkerInfo:
        return worker_info(self.worker, self.num_clients)

    def train(self, jobs: Sequence[Job], global_payload: bytes, round_index: int) -> list[Outcome]:
        adapter = decode_state(global_payload)
        return [run_train_job(self.worker, job, adapter, round_index) for job in jobs]

    def evaluate(self, jobs: Sequence[Job], adapter_payload: bytes) -> list[Outcome]:
        adapter = decode_state(adapter_payload)
        return [run_eval_job(self.worker, job, adapter) for job in jobs]

    def coalitions(self, jobs: Sequence[Job], adapter_payload: bytes) -> list[Outcome]:
        adapter, key = decode_state(adapter_payload), payload_key(adapter_payload)
        return [run_coalition_job(self.worker, job, adapter, key) for job in jobs]

    def tailor(self, jobs: Sequence[Job], adapter_payload: bytes) -> list[Outcome]:
        adapter, key = decode_state(adapter_payload), payload_key(adapter_payload)
        return [run_tailor_job(self.worker, job, adapter, key) for job in jobs]

    def shutdown(self) -> None:
        pass


# --- the federation -------------------------------------------------------------------------------
@dataclass
class FederationState:
    """Everything needed to continue a run: what a checkpoint holds."""

    next_round: int
    global_adapter: State
    client_states: dict[int, ClientState]
    rows: list[dict[str, Any]] = field(default_factory=list)
    round_rows: list[dict[str, Any]] = field(default_factory=list)
    bytes_up: int = 0
    bytes_down: int = 0
    last_eval: list[dict[str, Any]] = field(default_factory=list)
    initial: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    global_eval: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    fingerprint: dict[str, Any] = field(default_factory=dict)  # the experiment this state belongs to

    def save(self, path: Path) -> None:
        """One file, written atomically; loadable with ``torch.load(weights_only=True)``."""
        payload = {
            "next_round": self.next_round,
            "global_adapter": self.global_adapter,
            "heads": {str(c): s.head for c, s in self.client_states.items()},
            "rounds_trained": {str(c): s.rounds_trained for c, s in self.client_states.items()},
            "adapters": {str(c): s.adapter for c, s in self.client_states.items()},
            "tables": json.dumps({"rows": self.rows, "round_rows": self.round_rows, "last_eval": self.last_eval,
                                  "initial": self.initial, "global_eval": self.global_eval, "warnings": self.warnings}),
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "seconds": self.seconds,
            "fingerprint": json.dumps(self.fingerprint, sort_keys=True),
        }
        atomic_write_with(path, lambda tmp: torch.save(payload, tmp))

    @classmethod
    def load(cls, path: Path) -> "FederationState":
        """Read a checkpoint (``weights_only``: never arbitrary pickles); a damaged one is a
        ``ConfigError`` naming the file."""
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
            tables = json.loads(payload["tables"])
            return cls._from_payload(payload, tables)
        except Exception as exc:  # zip, pickle, torch, JSON and key errors all mean the same here
            raise ConfigError(damaged_file_message(f"checkpoint {path}", exc) + "; resume cannot continue from it") from None

    @classmethod
    def _from_payload(cls, payload: dict[str, Any], tables: dict[str, Any]) -> "FederationState":
        return cls(
            next_round=int(payload["next_round"]),
            global_adapter=payload["global_adapter"],
            client_states={int(c): ClientState(head=h, rounds_trained=int(payload["rounds_trained"][c]),
                                               adapter=payload.get("adapters", {}).get(c, {})) for c, h in payload["heads"].items()},
            rows=tables["rows"], round_rows=tables["round_rows"], last_eval=tables["last_eval"], initial=tables["initial"],
            global_eval=tables.get("global_eval", {}), warnings=tables.get("warnings", []),
            bytes_up=int(payload["bytes_up"]), bytes_down=int(payload["bytes_down"]), seconds=float(payload["seconds"]),
            fingerprint=json.loads(payload.get("fingerprint", "{}")),
        )


#: Fields a resume may change (``sylva-ray resume --address``); every other resolved field in
#: config.yaml must be what the checkpoint was made with.
RESUMABLE_FIELDS = frozenset({"runtime.address"})
#: Dict-valued fields compared whole, as values.
_OPAQUE = frozenset({"kwargs", "client_resources"})


def config_fingerprint(cfg: ExperimentConfig) -> dict[str, Any]:
    """The resolved configuration as ``{dotted field: value}`` (JSON values), less RESUMABLE_FIELDS."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and prefix.rsplit(".", 1)[-1] not in _OPAQUE:
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else key, item)
        else:
            flat[prefix] = value

    walk("", cfg.to_dict())
    return {k: v for k, v in json.loads(json.dumps(flat, default=str)).items() if k not in RESUMABLE_FIELDS}


INPUTS_PREFIX = "inputs."


def inputs_fingerprint(run_dir: Path, info: WorkerInfo) -> dict[str, str]:
    """The run's inputs beyond its config: the partition file and the pre-trained weights."""
    partition = Path(run_dir) / "partition.json"
    return {f"{INPUTS_PREFIX}partition_sha256": hashlib.sha256(partition.read_bytes()).hexdigest() if partition.is_file() else "",
            f"{INPUTS_PREFIX}weights_sha256": info.backbone_digest}


def fingerprint_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``field: value at the checkpoint -> value now`` for every field that differs."""
    return [f"{key}: {saved.get(key)!r} when the checkpoint was made, {current.get(key)!r} now"
            for key in sorted(set(saved) | set(current)) if saved.get(key) != current.get(key)]


#: accuracy column -> the column holding how many samples it was measured on
ACCURACY_COUNTS = {"clean_acc": "num_clean", "robust_acc": "num_robust", "autoattack_acc": "num_autoattack"}


def client_means(evaluation: pd.DataFrame) -> dict[str, float]:
    """Per accuracy: the unweighted client mean (each client's model counts once), the
    test-sample-weighted mean (personalised-FL convention) and the weighted std over clients."""
    means: dict[str, float] = {}
    for column, count in ACCURACY_COUNTS.items():
        if column not in evaluation or evaluation[column].isna().all():
            continue
        frame = evaluation[[column, count]].dropna()
        weighted = float(np.average(frame[column], weights=frame[count]))
        means[column] = float(frame[column].mean())
        means[f"{column}_weighted"] = weighted
        means[f"{column}_client_std"] = float(np.sqrt(np.average((frame[column] - weighted) ** 2, weights=frame[count])))
    return means


class Federation:
    """Phase 1 on any executor: one call per round, a checkpoint after each."""

    def __init__(self, cfg: ExperimentConfig, run_dir: Path, executor: ClientExecutor, resume: bool = False) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.executor = executor
        self.info = executor.info()
        self.algorithm = algorithm_for(cfg)
        self.adapter_bytes = len(encode_state(self.info.initial_adapter))
        checkpoint = self.run_dir / "checkpoints" / CHECKPOINT_NAME
        identity = {**config_fingerprint(cfg), **inputs_fingerprint(self.run_dir, self.info)}
        if resume and checkpoint.is_file():
            self.state = FederationState.load(checkpoint)
            if self.state.fingerprint:  # checkpoints from before fingerprints cannot be checked
                # The config was checked where the run was resumed (Phase 2 alone may change its own
                # fields); here, what only a built worker knows: the weights, and the partition.
                saved = {k: v for k, v in self.state.fingerprint.items() if k.startswith(INPUTS_PREFIX)}
                differences = fingerprint_differences(saved, {k: v for k, v in identity.items() if k.startswith(INPUTS_PREFIX)})
                if differences:
                    raise ConfigError(f"{checkpoint} was made with other inputs than this resume has, so it would mix two "
                                      "experiments: " + "; ".join(differences))
            log.info("resuming %s at round %d", self.run_dir, self.state.next_round + 1)
        else:
            self.state = FederationState(
                next_round=0,
                global_adapter=self.info.initial_adapter,
                client_states={c: ClientState(head={k: v.clone() for k, v in self.info.initial_head.items()})
                               for c in range(cfg.data.num_clients)},
                fingerprint=identity,
            )

    @property
    def done(self) -> bool:
        return self.state.next_round >= self.cfg.federation.rounds

    def run_round(self, round_index: Optional[int] = None, evaluate: Optional[bool] = None) -> dict[str, Any]:
        """One communication round; returns its client means (the progress line)."""
        r = self.state.next_round if round_index is None else round_index
        if r != self.state.next_round:
            raise ValueError(f"round {r} requested but the federation is at round {self.state.next_round}")
        started = time.perf_counter()
        cfg, st = self.cfg, self.state
        if r == 0 and not st.initial and (evaluate is None or evaluate):
            # The reference a run must beat: the pre-trained model (LoRA B = 0) with its pre-trained head.
            st.initial = client_means(pd.DataFrame(self._evaluate_all({}, r)))
        participants = sample_participants(cfg.data.num_clients, cfg.federation.participation, cfg.runtime.seed, r)
        federated = self.algorithm.federated
        # One copy per round, whatever the number of clients; a client training alone receives nothing.
        payload = encode_state(st.global_adapter if federated else {})
        sent = len(payload) if federated else 0
        outcomes = sorted(self.executor.train([Job(c, st.client_states[c]) for c in participants], payload, r),
                          key=lambda o: o.client_id)
        done = [o for o in outcomes if o.ok]
        if done and not federated:
            weights = np.zeros(0)
        elif done:
            uploads = [decode_state(o.upload) for o in done]  # type: ignore[arg-type]
            st.global_adapter, weights = aggregate(cfg.federation.aggregation, uploads, [o.num_samples for o in done], cfg.federation)
        else:
            log.warning("round %d: every participant dropped; the global adapter is unchanged", r + 1)
            weights = np.zeros(0)
        rows: dict[int, dict[str, Any]] = {}
        for outcome in outcomes:
            row: dict[str, Any] = {"round": r, "client": outcome.client_id, "participated": True,
                                   "dropped": not outcome.ok, "attempts": outcome.attempts,
                                   "bytes_down": sent, "bytes_up": len(outcome.upload or b"")}
            if outcome.ok:
                st.client_states[outcome.client_id] = outcome.state  # type: ignore[assignment]
                row.update(outcome.metrics)
            else:
                row["error"] = (outcome.error or "").strip().splitlines()[-1][:200] if outcome.error else ""
            st.bytes_up += row["bytes_up"]
            st.bytes_down += sent
            rows[outcome.client_id] = row
        for outcome, weight in zip(done, weights):
            rows[outcome.client_id]["agg_weight"] = float(weight)

        final = r == cfg.federation.rounds - 1
        if evaluate if evaluate is not None else is_eval_round(r, cfg):
            # Phase 1's models are the final ones unless Phase 2 follows: they get the full protocol.
            protocol = final and not cfg.layer_selection.enabled
            st.last_eval = self._evaluate_all(rows, r, protocol=protocol)
            # robust <= clean is checked on every evaluation; the protocol adds the attack-based checks.
            st.warnings += sanity_warnings(st.last_eval, cfg.evaluation, f"round {r + 1}")
            if protocol and self.algorithm.has_global_form and cfg.evaluation.global_test:
                st.global_eval = self._evaluate_global()
                st.warnings += sanity_warnings([st.global_eval], cfg.evaluation, "global test set")
        st.rows.extend(rows[c] for c in sorted(rows))
        seconds = time.perf_counter() - started
        st.seconds += seconds
        summary = self._round_summary(r, rows, seconds, len(participants))
        st.round_rows.append(summary)
        st.next_round = r + 1
        self._persist()
        log.info("round %d/%d clients=%d dropped=%d loss=%.4f clean=%.4f robust=%.4f up=%dB %.1fs",
                 r + 1, cfg.federation.rounds, len(participants), summary["dropped"], summary.get("train_loss", float("nan")),
                 summary.get("clean_acc", float("nan")), summary.get("robust_acc", float("nan")), summary["bytes_up"], seconds)
        return summary

    def _evaluate_global(self) -> dict[str, Any]:
        """The global model on the global test set (models with a global form only)."""
        job = Job(GLOBAL_TEST_CLIENT, ClientState(head={}), protocol=True)
        outcome = self.executor.evaluate([job], encode_state(self.state.global_adapter))[0]
        if not outcome.ok:
            log.warning("global-test evaluation failed: %s", outcome.error)
            return {}
        return dict(outcome.metrics)

    def _evaluate_all(self, rows: dict[int, dict[str, Any]], r: int, protocol: bool = False) -> list[dict[str, Any]]:
        """Each client's personalised model (global adapter + own head) on its own test split."""
        st = self.state
        jobs = [Job(c, st.client_states[c], protocol=protocol) for c in range(self.cfg.data.num_clients)]
        results = sorted(self.executor.evaluate(jobs, encode_state(st.global_adapter)), key=lambda o: o.client_id)
        evaluation = []
        for outcome in results:
            if not outcome.ok:
                log.warning("evaluation of client %d failed: %s", outcome.client_id, outcome.error)
                continue
            row = rows.setdefault(outcome.client_id, {"round": r, "client": outcome.client_id, "participated": False})
            majority = self.info.majority_rates[outcome.client_id]
            row.update(outcome.metrics, majority_rate=majority, eval_attempts=outcome.attempts)
            evaluation.append({"client": outcome.client_id, "num_train": self.info.num_train[outcome.client_id],
                               **outcome.metrics, "majority_rate": majority})
        return evaluation

    def _round_summary(self, r: int, rows: dict[int, dict[str, Any]], seconds: float, participants: int) -> dict[str, Any]:
        frame = pd.DataFrame(list(rows.values()))
        summary: dict[str, Any] = {"round": r, "participants": participants, "dropped": int(frame.get("dropped", pd.Series(dtype=bool)).fillna(False).sum()),
                                   "bytes_up": int(frame["bytes_up"].fillna(0).sum()), "seconds": seconds}
        for column in ("train_loss", "train_adversarial", "train_benign", "train_similarity", "train_proximal",
                       "clean_acc", "robust_acc", "majority_rate"):
            if column in frame and frame[column].notna().any():
                summary[column] = float(frame[column].mean())
        for column in ("actor_rss_mb", "gpu_peak_mb"):  # gpu_peak_mb: torch.cuda.max_memory_allocated, GPU runs only
            if column in frame and frame[column].notna().any():
                summary[f"{column}_max"] = float(frame[column].max())
        return summary

    def _persist(self) -> None:
        """Checkpoint and tables after every round: an interruption loses at most one round."""
        self.state.save(self.run_dir / "checkpoints" / CHECKPOINT_NAME)
        write_table(self.run_dir / "metrics.csv", pd.DataFrame(self.state.rows))
        write_table(self.run_dir / "rounds.csv", pd.DataFrame(self.state.round_rows))

    def phase2(self, out_dir: Path) -> dict[str, Any]:
        """Phase 2 on the current (final) global adapter and heads, results written into ``out_dir``."""
        from sylva_ray.phase2 import run_phase2

        st = self.state
        if not st.last_eval:
            raise RuntimeError("Phase 2 needs a finished Phase 1 (no evaluation recorded yet)")
        return run_phase2(self.cfg, self.executor, self.info.players, st.global_adapter, st.client_states, st.last_eval, out_dir)

    def finish(self) -> dict[str, Any]:
        """Final models, plot and summary.json (client means of the final personalised models)."""
        st, cfg = self.state, self.cfg
        if not st.last_eval:
            raise RuntimeError("no evaluation was recorded; the last round always evaluates")
        final_eval = pd.DataFrame(st.last_eval)
        plot_accuracy(self.run_dir, pd.DataFrame(st.round_rows))
        if cfg.output.save_models:
            for cid, client in st.client_states.items():
                shared = client.adapter or st.global_adapter  # a client that trained alone has its own
                atomic_write_bytes(self.run_dir / "models" / f"client_{cid:04d}.safetensors", encode_state({**shared, **client.head}))
        means = client_means(final_eval)
        below = final_eval.loc[final_eval["clean_acc"] < final_eval["majority_rate"], "client"].astype(int).tolist()
        phase2 = self.phase2(self.run_dir) if cfg.layer_selection.enabled else {}
        warnings = list(st.warnings) + list(phase2.get("sanity_warnings", []))
        summary = {
            "algorithm": {"name": cfg.algorithm.name, "ablations": list(cfg.algorithm.ablations),
                          "scope": self.algorithm.scope_name, "federated": self.algorithm.federated},
            "final": phase2["means"] if phase2 else means,
            "phase1": dict(means),
            **({"phase2": phase2["means"], "selected_layers": phase2["selected"]} if phase2 else {}),
            "initial": st.initial,
            "global": st.global_eval or None,
            "sanity": {"majority_rate": float(final_eval["majority_rate"].mean()),
                       "majority_rate_weighted": float(np.average(final_eval["majority_rate"], weights=final_eval["num_clean"])),
                       "clients_below_majority_rate": below, "warnings": warnings},
            "communication": {
                "bytes_up": st.bytes_up, "bytes_down": st.bytes_down, "adapter_bytes": self.adapter_bytes,
                "full_model_bytes": self.info.full_model_bytes,
                "full_over_adapter": self.info.full_model_bytes / self.adapter_bytes, "rounds": cfg.federation.rounds,
                "upload_bytes_per_round": st.bytes_up / max(1, len(st.round_rows)),
            },
            "dropped_client_rounds": int(sum(bool(r.get("dropped")) for r in st.rows)),
            "seconds": st.seconds,
            "wall_seconds": st.seconds + float(phase2.get("seconds", 0.0)),
            "per_client": phase2["per_client"] if phase2 else st.last_eval,
        }
        if below:
            log.warning("clients %s end below their majority-class rate (a collapsed model)", below)
        write_json(self.run_dir / "summary.json", summary)
        return summary


def run_inprocess(cfg: ExperimentConfig, run_dir: Path, source: DataSource, partition: Partition) -> dict[str, Any]:
    """Phase 1 with every client in this process (no Ray): the reference the engine is checked against."""
    federation = Federation(cfg, run_dir, InProcessExecutor(cfg, source, partition))
    while not federation.done:
        federation.run_round()
    return federation.finish()
