"""Phase 1's round loop, Ray-free: sample -> broadcast -> train -> aggregate -> evaluate -> record.

``Federation`` owns the federation's state (global adapter, every client's personal state, the
metrics so far) and runs one round at a time. *Where* client work runs is an executor's business
(``engine.jobs``): ``InProcessExecutor`` calls one ``ClientWorker`` in turn; the Ray engine
(``distributed.actors.RayExecutor``) fans jobs out to client actors and copes with failures. Updates
are ordered by client id before aggregation, so results never depend on completion order.
Phase 2 runs on the federation once its last round is done (``Federation.run_phase2``, called by
the runner, ``engine.runner``).

One round, as data:
    driver --(global adapter as safetensors bytes, one copy)--> clients
    clients --(their adapter bytes + metrics; personal tensors stay in ClientState)--> driver
    driver: aggregate in client-id order -> new global adapter -> evaluate -> checkpoint
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from sylva_ray.base.config import ExperimentConfig
from sylva_ray.base.plugins import load_plugins
from sylva_ray.base.seeding import derive_seed, numpy_rng
from sylva_ray.base.storage import atomic_write_bytes
from sylva_ray.engine.checkpoint import FederationState, check_inputs, checkpoint_path, run_fingerprint
from sylva_ray.engine.client import GLOBAL_TEST_CLIENT, ClientState
from sylva_ray.engine.clock import DEVICES_FILE, RoundPlan, SimulatedClock, clock_summary, plot_clock
from sylva_ray.engine.environment import ENVIRONMENT_FILE
from sylva_ray.engine.jobs import ClientExecutor, Job, Outcome
from sylva_ray.engine.phase2 import run_phase2
from sylva_ray.engine.robustbench import ROBUSTBENCH_FILE, robustbench_record
from sylva_ray.engine.round_records import absent_rows, outcome_row, record_weights, round_summary
from sylva_ray.engine.rundir import partition_summary, plot_accuracy, write_bookkeeping, write_json, write_table
from sylva_ray.engine.summaries import client_means, split_by_malicious
from sylva_ray.engine.tracking import RunTracker
from sylva_ray.engine.transfer import encode_models, needs_models, plan_sources
from sylva_ray.engine.transfer_report import victim_figures, write_transfer_outputs
from sylva_ray.method.aggregation import aggregate, is_selecting
from sylva_ray.method.algorithms import algorithm_for
from sylva_ray.method.byzantine import (
    BEHAVIOURS,
    COLLUDING,
    active,
    attack_context,
    craft_colluding_upload,
    malicious_clients,
    tolerated_f,
)
from sylva_ray.method.robust_aggregation import aggregation_problem
from sylva_ray.method.sanity import sanity_warnings, transfer_warnings
from sylva_ray.method.update_space import RoundContext
from sylva_ray.method.wire import decode_state, encode_state

log = logging.getLogger(__name__)

State = dict[str, torch.Tensor]
ADVERSARY_FILE = "adversary.json"


def sample_participants(num_clients: int, fraction: float, seed: int, round_index: int) -> list[int]:
    """Seeded client sampling: ``max(1, round(fraction * K))`` distinct clients, sorted by id."""
    count = max(1, int(round(fraction * num_clients)))
    rng = numpy_rng(seed, "participants", round_index)
    return sorted(int(c) for c in rng.choice(num_clients, size=count, replace=False))


def largest_first(clients: Sequence[int], sizes: Mapping[int, int]) -> list[int]:
    """Clients in decreasing size (ties by id): the order jobs are handed out in.

    Under Dirichlet skew clients differ in size by an order of magnitude; an executor that gives
    the next job to whichever actor is free first then runs the LPT rule (longest job first to the
    least-loaded actor), so a round is not held up by one big client started last. The order is
    deterministic; which actor runs a client never changes its result (equal threads everywhere),
    and outcomes are put back in client-id order.
    """
    return sorted(clients, key=lambda c: (-sizes.get(c, 0), c))


def is_eval_round(round_index: int, cfg: ExperimentConfig) -> bool:
    last = round_index == cfg.federation.rounds - 1
    return last or (round_index + 1) % cfg.federation.eval_every == 0


# --- the federation -------------------------------------------------------------------------------
class Federation:
    """Phase 1 on any executor: one call per round, a checkpoint after each."""

    def __init__(
        self,
        cfg: ExperimentConfig,
        run_dir: Path,
        executor: ClientExecutor,
        state: Optional[FederationState] = None,
        track: bool = True,
    ) -> None:
        """``state``: the checkpoint a resume continues from (``engine.checkpoint.check_resumable``
        read it); None starts the run. ``track``: write the run's live figures (``engine.tracking``)
        into ``run_dir``; off when the federation only serves a Phase 2 re-run, whose figures go to
        its own folder."""
        load_plugins(cfg.runtime.plugins)  # the driver actor's process looks up your names too
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.executor = executor
        self.info = executor.info()
        self.algorithm = algorithm_for(cfg)
        self.adapter_bytes = len(encode_state(self.info.initial_adapter))
        # The malicious set is a function of the seed and the fraction: fixed for the whole run, the
        # same across aggregation rules and algorithms, and recorded where a reader looks for it.
        self.malicious = frozenset(malicious_clients(cfg.data.num_clients, cfg.adversary.fraction, cfg.runtime.seed))
        self.transfer_rows: list[dict[str, Any]] = []  # the final protocol's transfer.csv (Phase 1's models)
        self.byzantine_f = tolerated_f(cfg)
        #: Set by whoever resolved the pre-trained weights (the launcher, or the in-process worker).
        self.pretraining_seconds = 0.0
        #: Phase 2's progress bars (``engine.progress.ProgressFactory``); the Ray driver actor sets Ray's.
        self.progress_bar: Any = tqdm
        # Simulated seconds on the clients' devices (engine.clock): decided from the config, the
        # partition and one FLOP count, never from this machine's wall clock.
        self.clock = (
            SimulatedClock(cfg, self.info.num_train, self.info.step_flops, self.info.train_memory_gb)
            if cfg.system.clock
            else None
        )
        identity = run_fingerprint(cfg, self.run_dir, self.info.backbone_digest)
        if state is not None:
            check_inputs(state, identity, self.run_dir)
            log.info("resuming %s at round %d", self.run_dir, state.next_round + 1)
            self.state = state
        else:
            self.state = FederationState(
                next_round=0,
                global_adapter=self.info.initial_adapter,
                client_states={
                    c: ClientState(personal={k: v.clone() for k, v in self.info.initial_personal.items()})
                    for c in range(cfg.data.num_clients)
                },
                fingerprint=identity,
            )
            write_json(self.run_dir / ADVERSARY_FILE, self.adversary_record())
        self.tracker = RunTracker(cfg, self.run_dir, first_round=self.state.next_round) if track else None
        if self.clock is not None and not (self.run_dir / DEVICES_FILE).is_file():  # once: results are not rewritten
            write_table(self.run_dir / DEVICES_FILE, self.clock.devices_frame())
        if self.malicious:
            log.info(
                "adversary: clients %s are malicious (%s from round %d)",
                sorted(self.malicious),
                cfg.adversary.behaviour,
                cfg.adversary.start_round,
            )

    def adversary_record(self) -> dict[str, Any]:
        """The threat of this run: who is malicious, doing what, against which rule."""
        adversary = self.cfg.adversary
        return {
            "clients": sorted(self.malicious),
            "count": len(self.malicious),
            "honest": self.cfg.data.num_clients - len(self.malicious),
            "fraction": adversary.fraction,
            "behaviour": adversary.behaviour if self.malicious else None,
            "kind": BEHAVIOURS.get(adversary.behaviour).kind if self.malicious else None,
            "start_round": adversary.start_round,
            "aggregation": self.cfg.federation.aggregation,
            "pre_aggregation": list(self.cfg.federation.pre_aggregation),
            "byzantine_f": self.byzantine_f,
        }

    @property
    def done(self) -> bool:
        return self.state.next_round >= self.cfg.federation.rounds

    def run_round(self, evaluate: Optional[bool] = None) -> dict[str, Any]:
        """The next communication round; returns its client means (the progress line).

        ``evaluate``: force the evaluation on (True) or off (False); None evaluates every
        ``federation.eval_every`` rounds and after the last one."""
        r, st, started = self.state.next_round, self.state, time.perf_counter()
        if r == 0 and not st.initial and (evaluate is None or evaluate):
            # The reference a run must beat: the pre-trained model (LoRA B = 0) with its pre-trained head.
            st.initial = client_means(split_by_malicious(pd.DataFrame(self._evaluate_all({}, r)))[0])
        cfg = self.cfg
        participants = sample_participants(cfg.data.num_clients, cfg.federation.participation, cfg.runtime.seed, r)
        # One copy per round, whatever the number of clients (a scope that shares nothing sends b"").
        payload = encode_state(st.global_adapter)
        # Offline clients and stragglers (known before the round) do no work in the simulation.
        plan = self.clock.plan(r, participants, len(payload)) if self.clock is not None else None
        outcomes = self._train(plan.takers if plan is not None else participants, payload, r)
        done = [o for o in outcomes if o.ok]
        weights = self._aggregate(done, r)
        rows = self._record_outcomes(outcomes, len(payload), plan, r)
        record_weights(rows, done, weights, selecting=is_selecting(cfg.federation.aggregation))
        if evaluate if evaluate is not None else is_eval_round(r, cfg):
            self._evaluate_round(rows, r)
        return self._close_round(r, rows, plan, len(participants), started)

    def _attacking(self, r: int) -> frozenset[int]:
        """The malicious clients that attack in round ``r`` (none before ``adversary.start_round``)."""
        return self.malicious if active(self.cfg.adversary, r) else frozenset()

    def _train(self, clients: Sequence[int], payload: bytes, r: int) -> list[Outcome]:
        """Local training of ``clients`` from the broadcast; outcomes in client-id order, so nothing
        downstream depends on which job finished first."""
        attacking = self._attacking(r)
        jobs = [
            Job(c, self.state.client_states[c], malicious=c in attacking)
            for c in largest_first(clients, self.info.num_train)
        ]
        return sorted(self.executor.train(jobs, payload, r), key=lambda o: o.client_id)

    def _aggregate(self, done: list[Outcome], r: int) -> np.ndarray:
        """The new global adapter from the uploads of the clients that finished (in client-id
        order); returns each one's aggregation weight (empty when nothing was aggregated)."""
        cfg, st = self.cfg, self.state
        uploads = [decode_state(o.upload or b"") for o in done]
        attacking = self._attacking(r)
        if attacking and BEHAVIOURS.get(cfg.adversary.behaviour).kind == COLLUDING:
            self._collude(done, uploads, attacking, r)
        too_few = aggregation_problem(cfg.federation.aggregation, cfg.federation, self.byzantine_f, len(done))
        if not done:
            log.warning("round %d: every participant dropped; the global adapter is unchanged", r + 1)
        elif any(uploads) and too_few:
            log.warning("round %d: %s; the global adapter is unchanged", r + 1, too_few)
        elif any(uploads):  # empty uploads (the local scope shares nothing) leave nothing to aggregate
            context = RoundContext(
                reference=st.global_adapter,
                byzantine_f=self.byzantine_f,
                seed=derive_seed(cfg.runtime.seed, "aggregation", r),
            )
            st.global_adapter, weights = aggregate(
                cfg.federation.aggregation, uploads, [o.num_samples for o in done], cfg.federation, context
            )
            return weights
        return np.zeros(0)

    def _record_outcomes(
        self, outcomes: list[Outcome], sent: int, plan: Optional[RoundPlan], r: int
    ) -> dict[int, dict[str, Any]]:
        """Each trained client's new state and row; the absent clients' rows; the traffic counted."""
        st, rows = self.state, {}
        for outcome in outcomes:
            row = outcome_row(outcome, r, sent)
            if outcome.ok:
                st.client_states[outcome.client_id] = outcome.state  # type: ignore[assignment]
            if self.clock is not None:
                row.update(online=True, straggler=False, **self.clock.times(outcome.client_id, sent, row["bytes_up"]))
            st.bytes_up += row["bytes_up"]
            st.bytes_down += sent
            rows[outcome.client_id] = row
        if plan is not None:
            rows.update(absent_rows(plan, r, sent))
            st.bytes_down += sent * len(plan.stragglers)  # stragglers received the broadcast
        return rows

    def _evaluate_round(self, rows: dict[int, dict[str, Any]], r: int) -> None:
        """Every client's model on its own test split, with the sanity checks; after the last round
        of a run without Phase 2, the full protocol (Phase 1's models are then the final ones)."""
        cfg, st = self.cfg, self.state
        protocol = r == cfg.federation.rounds - 1 and not cfg.layer_selection.enabled
        eval_started = time.perf_counter()
        st.last_eval = self._evaluate_all(rows, r, protocol=protocol)
        # robust <= clean is checked on every evaluation; the protocol adds the attack-based checks.
        st.warnings += sanity_warnings(st.last_eval, cfg.evaluation, f"round {r + 1}")
        if not protocol:
            return
        if cfg.evaluation.transfer:
            st.warnings += transfer_warnings(st.last_eval, self.transfer_rows, cfg.evaluation, "final (transfer)")
        if self.algorithm.scope.global_form and cfg.evaluation.global_test:
            st.global_eval = self._evaluate_global()
            st.warnings += sanity_warnings([st.global_eval], cfg.evaluation, "global test set")
        st.protocol_seconds = time.perf_counter() - eval_started
        log.info("final protocol done in %.1fs", st.protocol_seconds)

    def _close_round(
        self, r: int, rows: dict[int, dict[str, Any]], plan: Optional[RoundPlan], participants: int, started: float
    ) -> dict[str, Any]:
        """The round's rows and line on disk, the checkpoint written, the next round set."""
        cfg, st = self.cfg, self.state
        for client, row in rows.items():
            row["malicious"] = client in self.malicious
            if self.clock is not None:
                row["profile"] = self.clock.profiles[client].name
        st.rows.extend(rows[c] for c in sorted(rows))
        seconds = time.perf_counter() - started
        st.seconds += seconds
        summary = round_summary(r, rows, seconds, participants)
        if plan is not None and self.clock is not None:
            summary.update(self._simulated_round(plan, rows))
        st.round_rows.append(summary)
        st.next_round = r + 1
        if self.tracker is not None:  # before the checkpoint: a resume then purges, never misses, it
            self.tracker.log_round(summary, [rows[c] for c in sorted(rows)])
        self._persist()
        log.info(
            "round %d/%d clients=%d dropped=%d loss=%.4f clean=%.4f robust=%.4f up=%dB %.1fs",
            r + 1,
            cfg.federation.rounds,
            participants,
            summary["dropped"],
            summary.get("train_loss", float("nan")),
            summary.get("clean_acc", float("nan")),
            summary.get("robust_acc", float("nan")),
            summary["bytes_up"],
            seconds,
        )
        return summary

    def _simulated_round(self, plan: RoundPlan, rows: dict[int, dict[str, Any]]) -> dict[str, Any]:
        """The round on the simulated clock: its length, the clock after it, who was late or away."""
        assert self.clock is not None
        took = {c: rows[c]["sim_total_s"] for c in plan.takers}
        round_s = self.clock.round_seconds(plan, took)
        before = self.state.round_rows[-1].get("sim_clock_s", 0.0) if self.state.round_rows else 0.0
        return {
            "sim_round_s": round_s,
            "sim_clock_s": before + round_s,
            "stragglers": len(plan.stragglers),
            "offline": len(plan.offline),
        }

    def _collude(self, done: list[Outcome], uploads: list[State], attacking: frozenset[int], r: int) -> None:
        """Colluding, omniscient attackers: every colluder's upload becomes the vector crafted from
        the round's honest uploads (their own honest training is what they would have sent)."""
        honest = [u for o, u in zip(done, uploads) if o.client_id not in attacking]
        colluders = [i for i, o in enumerate(done) if o.client_id in attacking]
        if not colluders:
            return
        if not honest or not any(honest):
            log.warning("round %d: no honest update to collude against; the colluders send their own", r + 1)
            return
        context = attack_context(self.cfg, r, participants=len(done), colluders=len(colluders))
        crafted = craft_colluding_upload(honest, self.state.global_adapter, self.cfg.adversary, context)
        wire = encode_state(crafted)
        for index in colluders:
            uploads[index] = crafted
            done[index].upload = wire  # what is counted as uploaded is what the attack sends

    def _evaluate_global(self) -> dict[str, Any]:
        """The global model on the global test set (models with a global form only)."""
        job = Job(GLOBAL_TEST_CLIENT, ClientState(personal={}), protocol=True)
        outcome = self.executor.evaluate([job], encode_state(self.state.global_adapter))[0]
        if not outcome.ok:
            log.warning("global-test evaluation failed: %s", outcome.error)
            return {}
        return dict(outcome.metrics)

    def _evaluate_all(self, rows: dict[int, dict[str, Any]], r: int, protocol: bool = False) -> list[dict[str, Any]]:
        """Each client's personalised model (global adapter + its personal tensors) on its own test split."""
        st = self.state
        clients = largest_first(range(self.cfg.data.num_clients), self.info.num_train)
        kinds = self.cfg.evaluation.transfer if protocol else []
        has_global = bool(st.global_adapter)
        jobs = [
            Job(c, st.client_states[c], protocol=protocol, transfer=plan_sources(kinds, c, clients, has_global))
            for c in clients
        ]
        payload = encode_state(st.global_adapter)
        if needs_models(kinds):  # every participant's final model, broadcast once: the transfer sources
            models = encode_models({c: state.personal for c, state in st.client_states.items()})
            outcomes = self.executor.evaluate(jobs, payload, models_payload=models)
        else:
            outcomes = self.executor.evaluate(jobs, payload)
        results = sorted(outcomes, key=lambda o: o.client_id)
        if kinds:
            self.transfer_rows = [row for o in results if o.ok for row in o.transfer]
            write_transfer_outputs(self.run_dir, self.transfer_rows)
        evaluation = []
        for outcome in results:
            if not outcome.ok:
                log.warning("evaluation of client %d failed: %s", outcome.client_id, outcome.error)
                continue
            row = rows.setdefault(outcome.client_id, {"round": r, "client": outcome.client_id, "participated": False})
            majority = self.info.majority_rates[outcome.client_id]
            transfer = victim_figures(outcome.transfer)
            row.update(outcome.metrics, **transfer, majority_rate=majority, eval_attempts=outcome.attempts)
            evaluation.append(
                {
                    "client": outcome.client_id,
                    "num_train": self.info.num_train[outcome.client_id],
                    **outcome.metrics,
                    **transfer,
                    "majority_rate": majority,
                    "malicious": outcome.client_id in self.malicious,
                }
            )
        return evaluation

    def _persist(self) -> None:
        """Checkpoint and tables after every round: an interruption loses at most one round."""
        self.state.save(checkpoint_path(self.run_dir))
        write_table(self.run_dir / "metrics.csv", pd.DataFrame(self.state.rows))
        write_table(self.run_dir / "rounds.csv", pd.DataFrame(self.state.round_rows))

    def run_phase2(self, out_dir: Path) -> dict[str, Any]:
        """Phase 2 on the final global adapter and client states, results into ``out_dir``."""
        st = self.state
        if not st.last_eval:
            raise RuntimeError("Phase 2 needs a finished Phase 1 (no evaluation recorded yet)")
        return run_phase2(
            self.cfg,
            self.executor,
            self.info.players,
            st.global_adapter,
            st.client_states,
            st.last_eval,
            out_dir,
            progress=self.progress_bar,
        )

    def seconds_by_stage(self, phase2: Mapping[str, Any]) -> dict[str, float]:
        """Wall seconds of each stage of the main job (this session's pre-training; Phase 1 over all
        its sessions, without the final protocol; Phase 2's stages; the protocol wherever it ran)."""
        st = self.state
        stages = dict(phase2.get("seconds_by_stage", {}))
        return {
            "pretraining": float(self.pretraining_seconds),
            "phase1": float(st.seconds - st.protocol_seconds),
            "phase2_game": float(stages.get("phase2_game", 0.0)),
            "tailoring": float(stages.get("tailoring", 0.0)),
            "protocol": float(stages.get("protocol", st.protocol_seconds)),
        }

    def finish(self, phase2: Optional[dict[str, Any]] = None) -> dict[str, Any]:
        """Final models, plot and summary.json (client means of the final personalised models).

        ``phase2``: what ``engine.phase2.run_phase2`` returned, when Phase 2 ran after the last
        round; its models are then the final ones.
        """
        st, cfg = self.state, self.cfg
        phase2 = phase2 or {}
        if not st.last_eval:
            raise RuntimeError("no evaluation was recorded; the last round always evaluates")
        final_eval = pd.DataFrame(st.last_eval)
        plot_accuracy(self.run_dir, pd.DataFrame(st.round_rows))
        simulated = None
        if self.clock is not None:
            rows_frame, rounds_frame = pd.DataFrame(st.rows), pd.DataFrame(st.round_rows)
            simulated = clock_summary(self.clock, rows_frame, rounds_frame)
            plot_clock(self.run_dir, rows_frame, rounds_frame)
        if cfg.output.save_models:
            for cid, client in st.client_states.items():
                atomic_write_bytes(
                    self.run_dir / "models" / f"client_{cid:04d}.safetensors",
                    encode_state({**st.global_adapter, **client.personal}),
                )
        honest_eval, malicious_eval = split_by_malicious(final_eval)
        means = client_means(honest_eval)
        below = honest_eval.loc[honest_eval["clean_acc"] < honest_eval["majority_rate"], "client"].astype(int).tolist()
        warnings = list(st.warnings) + list(phase2.get("sanity_warnings", []))
        summary = {
            "algorithm": {
                "name": cfg.algorithm.name,
                "ablations": list(cfg.algorithm.ablations),
                "scope": self.algorithm.scope_name,
                "federated": self.algorithm.scope.name != "local",
            },
            "final": phase2["means"] if phase2 else means,
            "phase1": dict(means),
            **({"phase2": phase2["means"], "selected_layers": phase2["selected"]} if phase2 else {}),
            "initial": st.initial,
            "global": st.global_eval or None,
            "adversary": self.adversary_record(),
            # The malicious clients' own final models, apart from every figure above (phase 1's here;
            # after Phase 2 its own table holds theirs too).
            "malicious_clients": (phase2.get("malicious_means") if phase2 else None)
            or (client_means(malicious_eval) if len(malicious_eval) else None),
            "sanity": {
                "majority_rate": float(honest_eval["majority_rate"].mean()),
                "majority_rate_weighted": float(
                    np.average(honest_eval["majority_rate"], weights=honest_eval["num_clean"])
                ),
                "clients_below_majority_rate": below,
                "warnings": warnings,
            },
            "communication": {
                "bytes_up": st.bytes_up,
                "bytes_down": st.bytes_down,
                "adapter_bytes": self.adapter_bytes,
                "full_model_bytes": self.info.full_model_bytes,
                "full_over_adapter": self.info.full_model_bytes / self.adapter_bytes if self.adapter_bytes else None,
                "rounds": cfg.federation.rounds,
                "upload_bytes_per_round": st.bytes_up / max(1, len(st.round_rows)),
            },
            "dropped_client_rounds": int(sum(bool(r.get("dropped")) for r in st.rows)),
            "simulated": simulated,
            "seconds": st.seconds,
            "wall_seconds": st.seconds + float(phase2.get("seconds", 0.0)),
            "seconds_by_stage": self.seconds_by_stage(phase2),
            # torch.cuda.max_memory_allocated of the largest job of each stage, this session (GPU runs only)
            "gpu_peak_mb_by_stage": dict(self.executor.gpu_peak_mb) or None,
            "per_client": phase2["per_client"] if phase2 else st.last_eval,
            # What this run ran on (written by the launcher): whether its figures repeat elsewhere.
            "partition": partition_summary(self.run_dir),
            "environment": ENVIRONMENT_FILE if (self.run_dir / ENVIRONMENT_FILE).is_file() else None,
        }
        if below:
            log.warning("clients %s end below their majority-class rate (a collapsed model)", below)
        if self.tracker is not None:
            if phase2:
                self.tracker.log_phase2(phase2, self.run_dir)
            self.tracker.finish(summary)
            summary["seconds_by_stage"]["tracking"] = self.tracker.seconds
        write_bookkeeping(self.run_dir / ROBUSTBENCH_FILE, lambda: robustbench_record(cfg, summary))
        write_json(self.run_dir / "summary.json", summary)
        if self.tracker is not None:
            self.tracker.publish()  # the run's files, summary.json among them, to MLflow
        return summary

    def close(self) -> None:
        """Flush and close the trackers (a session that stops before ``finish``)."""
        if self.tracker is not None:
            self.tracker.close()
