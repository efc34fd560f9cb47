"""Phase 2 across all clients, Ray-free: the layer games, tailoring, the final protocol, the report.

Three stages, each with a progress bar and a log line with its seconds:

1. the layer games (``engine.layer_games``): coalition evaluations done / planned, across clients;
2. tailoring: the chosen layers + head, on the client's home actor;
3. the final-model protocol (PGD, AutoAttack, sanity attacks, transfer attacks) on whichever actor
   is free, the most expected attack work first (clean-correct plus robust images in Phase 1).

Then the report (``engine.phase2_report``): ``shapley.csv``, ``shapley_games.csv``, the plots,
each client's tailored model and the client means.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from sylva_ray.base.config import ExperimentConfig
from sylva_ray.engine.client import ClientState
from sylva_ray.engine.jobs import Job, Outcome
from sylva_ray.engine.layer_games import LayerChoice, choose_layers
from sylva_ray.engine.phase2_report import client_rows, report_phase2
from sylva_ray.engine.progress import ProgressFactory, SilentBar
from sylva_ray.engine.transfer import encode_models, needs_models, plan_sources
from sylva_ray.engine.transfer_report import write_transfer_outputs
from sylva_ray.method.evaluation import protocol_stages
from sylva_ray.method.wire import encode_state

log = logging.getLogger(__name__)


def run_phase2(
    cfg: ExperimentConfig,
    executor: Any,
    players: list[str],
    global_adapter: Mapping[str, torch.Tensor],
    states: Mapping[int, ClientState],
    phase1_eval: list[dict[str, Any]],
    out_dir: Path,
    progress: ProgressFactory = tqdm,
) -> dict[str, Any]:
    """Phase 2 for every client: the layer games, tailoring, the final protocol, the report.

    Returns ``means`` (client means after Phase 2), ``selected``, ``per_client`` and
    ``seconds_by_stage`` (``phase2_game``, ``tailoring``, ``protocol``)."""
    started = time.perf_counter()
    phase1 = {row["client"]: row for row in phase1_eval}
    clients = sorted(c for c in states if c in phase1)  # a client without a Phase-1 score is not tailored
    if len(clients) < len(states):
        log.warning(
            "phase 2: clients %s have no Phase-1 evaluation and are skipped", sorted(set(states) - set(clients))
        )
    payload = encode_state(global_adapter)
    seconds_by_stage: dict[str, float] = {}

    stage_started = time.perf_counter()
    choice = choose_layers(cfg, executor, len(players), clients, states, payload, progress)
    seconds_by_stage["phase2_game"] = time.perf_counter() - stage_started
    _log_stage("phase 2 layer games", seconds_by_stage["phase2_game"], f"{choice.evaluations} coalition evaluations")

    stage_started = time.perf_counter()
    tailored = tailor_clients(cfg, executor, choice, states, payload, progress)
    seconds_by_stage["tailoring"] = time.perf_counter() - stage_started
    _log_stage("phase 2 tailoring", seconds_by_stage["tailoring"], f"{len(tailored)} clients")

    stage_started = time.perf_counter()
    scored, transfer = score_tailored(
        cfg, executor, choice, tailored, states, phase1, payload, bool(global_adapter), progress
    )
    if cfg.evaluation.transfer:
        write_transfer_outputs(out_dir, transfer)
    seconds_by_stage["protocol"] = time.perf_counter() - stage_started
    attacks = ", ".join(protocol_stages(cfg.attack, cfg.evaluation))
    _log_stage("final protocol", seconds_by_stage["protocol"], f"{len(scored)} clients: {attacks}")

    per_client, shapley = client_rows(players, clients, phase1, choice, tailored, scored, out_dir)
    return report_phase2(cfg, out_dir, players, choice, per_client, shapley, transfer, seconds_by_stage, started)


def tailor_clients(
    cfg: ExperimentConfig,
    executor: Any,
    choice: LayerChoice,
    states: Mapping[int, ClientState],
    payload: bytes,
    progress: ProgressFactory = tqdm,
) -> dict[int, Outcome]:
    """Stage 2: fine-tune each client's chosen layers and head (on its home actor)."""
    no_tuning = cfg.layer_selection.selection == "none"
    jobs = [Job(c, states[c], players=choice.selected[c], no_tuning=no_tuning) for c in sorted(choice.results)]
    return _with_bar(progress, "phase 2 tailoring", jobs, lambda on_done: executor.tailor(jobs, payload, on_done))


def score_tailored(
    cfg: ExperimentConfig,
    executor: Any,
    choice: LayerChoice,
    tailored: Mapping[int, Outcome],
    states: Mapping[int, ClientState],
    phase1: Mapping[int, dict[str, Any]],
    payload: bytes,
    has_global: bool,
    progress: ProgressFactory = tqdm,
) -> tuple[dict[int, Outcome], list[dict[str, Any]]]:
    """Stage 3: the final-model protocol on every tailored model; returns the outcomes by client
    and the transfer rows (``transfer.csv``)."""
    # Costliest first (the last job decides the wall time): AutoAttack attacks the images a model
    # gets right, and its later attacks (FAB, Square: most of its time) only those still robust.
    ready = sorted((c for c, o in tailored.items() if o.ok), key=lambda c: -protocol_cost(phase1[c]))
    show = progress is not SilentBar  # the per-client bars (attack in progress) follow the stage bars
    attacks = ", ".join(protocol_stages(cfg.attack, cfg.evaluation))
    kinds = cfg.evaluation.transfer
    jobs = [
        Job(
            c,
            states[c],
            players=choice.selected[c],
            tuned=tailored[c].tuned,
            show_progress=show,
            transfer=plan_sources(kinds, c, ready, has_global),
        )
        for c in ready
    ]
    # Every tailored model, broadcast once: the transfer sources (the peers among them).
    models = (
        encode_models({c: states[c].personal for c in ready}, {c: tailored[c].tuned for c in ready})
        if needs_models(kinds)
        else None
    )
    scored = _with_bar(
        progress,
        f"final protocol ({attacks})",
        jobs,
        lambda on_done: (
            executor.protocol(jobs, payload, on_done, models_payload=models)
            if models is not None
            else executor.protocol(jobs, payload, on_done)
        ),
    )
    return scored, [row for o in scored.values() if o.ok for row in o.transfer]


def protocol_cost(phase1_row: Mapping[str, Any]) -> float:
    """A client's protocol cost, in images attacked, from its Phase-1 figures: the clean-correct
    ones (AutoAttack's first stages) plus the robust ones (its later stages)."""
    clean = float(phase1_row.get("clean_acc", 0.0)) * float(phase1_row.get("num_clean", 0))
    robust = float(phase1_row.get("robust_acc", 0.0)) * float(phase1_row.get("num_robust", 0))
    return clean + robust


def _with_bar(
    progress: ProgressFactory, desc: str, jobs: Sequence[Job], call: Callable[[Callable[[Any], None]], list[Outcome]]
) -> dict[int, Outcome]:
    """Run one stage's jobs (``call(on_done)``) under a bar counting finished jobs; outcomes by client."""
    bar = progress(total=len(jobs), desc=desc)
    try:
        return {o.client_id: o for o in call(lambda _: bar.update(1))}
    finally:
        bar.close()


def _log_stage(name: str, seconds: float, detail: str = "") -> None:
    log.info("%s done in %.1fs%s", name, seconds, f" ({detail})" if detail else "")
