"""Phase 2's first stage, Ray-free: every client's layer game, played in lockstep, and its choice.

Each client's Shapley estimator (``sylva_ray.method.shapley``) asks for the coalitions it needs next;
the requests of *all* clients are handed to the executor as one batch (in parallel across every
worker), the answers are fed back, until every estimator is done. A coalition evaluation that
fails twice takes its client out of Phase 2 (it keeps its Phase-1 model, and the row says so).
The rules that play no game (``BASELINE_SELECTIONS``) choose their layers here too.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

import numpy as np
from tqdm.auto import tqdm

from sylva_ray.base.config import ExperimentConfig
from sylva_ray.base.seeding import derive_seed
from sylva_ray.engine.client import ClientState
from sylva_ray.engine.jobs import Job
from sylva_ray.engine.progress import ProgressFactory
from sylva_ray.method.shapley import ShapleyResult, make_estimator, select_players

log = logging.getLogger(__name__)


def planned_evaluations(cfg: ExperimentConfig, num_players: int) -> int:
    """Coalitions one client's game evaluates at most: 2^L exactly, else the approximation budget."""
    sel = cfg.layer_selection
    return 2**num_players if num_players <= sel.exact_max_players else sel.max_evaluations


@dataclass
class GameRecord:
    """What the driver keeps of one client's game besides its Shapley values."""

    validation_samples: int = 0


def play_games(
    cfg: ExperimentConfig,
    executor: Any,
    num_players: int,
    clients: Sequence[int],
    states: Mapping[int, ClientState],
    payload: bytes,
    progress: ProgressFactory = tqdm,
) -> tuple[dict[int, ShapleyResult], dict[int, str], dict[int, GameRecord]]:
    """Run every client's estimator to the end; returns results, the clients that failed, game records."""
    sel = cfg.layer_selection
    estimators = {
        c: make_estimator(
            num_players,
            sel.exact_max_players,
            sel.estimator,
            sel.max_evaluations,
            sel.stderr_tolerance,
            derive_seed(cfg.runtime.seed, "shapley", c),
            replicates=sel.replicates,
            truncation_tolerance=sel.truncation_tolerance,
            permutations_per_batch=sel.permutations_per_batch,
        )
        for c in clients
    }
    records = {c: GameRecord() for c in clients}
    results: dict[int, ShapleyResult] = {}
    failed: dict[int, str] = {}
    estimator_errors: list[Exception] = []

    def advance(client: int, answers: Optional[dict[int, float]]) -> Optional[list[int]]:
        """The client's next request, or None once its game is over (a result, or its estimator failed:
        one client's estimator failing ends its own game, not everyone's)."""
        try:
            return next(estimators[client]) if answers is None else estimators[client].send(answers)
        except StopIteration as stop:
            results[client] = stop.value
        except Exception as exc:
            failed[client] = f"layer game estimator failed: {type(exc).__name__}: {exc}"
            log.error("phase 2: client %d leaves the game: %s", client, failed[client], exc_info=True)
            estimator_errors.append(exc)
        return None

    requests = {c: r for c in clients if (r := advance(c, None)) is not None}
    bar = progress(total=len(clients) * planned_evaluations(cfg, num_players), desc="phase 2 layer games")
    try:
        while requests:
            jobs = [Job(c, states[c], mask=m) for c, masks in requests.items() for m in masks]
            outcomes = executor.coalitions(jobs, payload, on_done=lambda _: bar.update(1))
            answers: dict[int, dict[int, float]] = {c: {} for c in requests}
            for job, outcome in zip(jobs, outcomes):
                if outcome.ok:
                    answers[job.client_id][int(job.mask or 0)] = outcome.metrics["value"]
                    records[job.client_id].validation_samples = int(outcome.metrics.get("validation_samples", 0))
                else:
                    failed[job.client_id] = outcome.error or "coalition evaluation failed"
            for client in answers:
                if client in failed:
                    log.error("phase 2: client %d leaves the game: %s", client, failed[client])
                    estimators[client].close()
            requests = {
                c: r for c, values in answers.items() if c not in failed and (r := advance(c, values)) is not None
            }
    finally:
        bar.close()
    if clients and len(estimator_errors) == len(clients):  # not one client's trouble: a bug to see, not to hide
        raise RuntimeError("every client's layer-game estimator failed; the first error is attached") from (
            estimator_errors[0]
        )
    return results, failed, records


#: Selections that need no game: the alternatives the Shapley choice must beat, and the references.
BASELINE_SELECTIONS = ("random", "all", "last", "head", "none")


def _no_game(num_players: int) -> ShapleyResult:
    return ShapleyResult(np.full(num_players, np.nan), np.full(num_players, np.nan), evaluations=0, method="none")


def baseline_selection(rule: str, num_players: int, top_k: int, seed: int) -> list[int]:
    """``random``: ``top_k`` layers drawn at random (seeded per client); ``last``: the last ``top_k``;
    ``all``: every layer; ``head`` and ``none``: no layer (``none`` does not tune the head either)."""
    k = min(top_k, num_players)
    if rule == "all":
        return list(range(num_players))
    if rule == "last":
        return list(range(num_players - k, num_players))
    if rule in ("head", "none"):
        return []
    return sorted(int(i) for i in np.random.default_rng(seed).choice(num_players, size=k, replace=False))


@dataclass
class LayerChoice:
    """The layer games' outcome: each client's Shapley values (``method == "none"`` under a rule that
    plays no game), the layers chosen, and the clients whose game failed."""

    results: dict[int, ShapleyResult]
    selected: dict[int, list[int]]
    failed: dict[int, str] = field(default_factory=dict)
    records: dict[int, GameRecord] = field(default_factory=dict)

    @property
    def evaluations(self) -> int:
        return int(sum(r.evaluations for r in self.results.values()))


def choose_layers(
    cfg: ExperimentConfig,
    executor: Any,
    num_players: int,
    clients: Sequence[int],
    states: Mapping[int, ClientState],
    payload: bytes,
    progress: ProgressFactory = tqdm,
) -> LayerChoice:
    """Stage 1: every client's layer game (or the rule that needs none), then its selection."""
    sel = cfg.layer_selection
    if sel.selection in BASELINE_SELECTIONS:
        return LayerChoice(
            results={c: _no_game(num_players) for c in clients},
            selected={
                c: baseline_selection(
                    sel.selection, num_players, sel.top_k, derive_seed(cfg.runtime.seed, "random-layers", c)
                )
                for c in clients
            },
        )
    results, failed, records = play_games(cfg, executor, num_players, clients, states, payload, progress)
    selected = {c: select_players(results[c].values, sel.selection, sel.top_k, sel.threshold) for c in results}
    return LayerChoice(results=results, selected=selected, failed=failed, records=records)
