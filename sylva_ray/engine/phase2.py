"""Phase 2 across all clients, Ray-free: play every client's layer game in lockstep, tailor, report.

Each client's Shapley estimator (``sylva_ray.method.shapley``) asks for the coalitions it needs next;
the requests of *all* clients are handed to the executor as one batch (in parallel across every
worker), the answers are fed back, until every estimator is done. A coalition evaluation that
fails twice takes its client out of Phase 2 (it keeps its Phase-1 model, and the row says so).

Three stages, each with a progress bar and a log line with its seconds: the layer games (coalition
evaluations done / planned, across clients), tailoring (the chosen layers + head, on the client's
home actor), and the final-model protocol (PGD, AutoAttack, sanity attacks) on whichever actor is
free, the most expected attack work first (clean-correct plus robust images in Phase 1).

Writes into ``out_dir``: ``shapley.csv`` (client, layer, value, stderr, evaluations, selected),
``shapley_games.csv`` (per client: how flat its game was, what one validation image resolves, ties
at the selection cut), ``shapley_heatmap.png`` (clients x layers), ``phase2_before_after.png`` and, per client,
``models/phase2_client_NNNN.safetensors`` (its tuned layers + head, on top of the global adapter).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from sylva_ray.base.config import ExperimentConfig
from sylva_ray.base.plots import pyplot, save_figure
from sylva_ray.base.seeding import derive_seed
from sylva_ray.base.storage import atomic_write_bytes
from sylva_ray.engine.client import ClientState
from sylva_ray.engine.jobs import Job, Outcome
from sylva_ray.engine.rundir import write_table
from sylva_ray.engine.summaries import client_means, split_by_malicious
from sylva_ray.engine.transfer import encode_models, needs_models, plan_sources
from sylva_ray.engine.transfer_report import victim_figures, write_transfer_outputs
from sylva_ray.method.models import encode_state
from sylva_ray.method.sanity import sanity_warnings, transfer_warnings
from sylva_ray.method.shapley import ShapleyResult, flatness, make_estimator, select_players, ties_at_cut
from sylva_ray.method.training import is_protocol_figure, protocol_stages

log = logging.getLogger(__name__)


#: A progress bar: ``factory(total=..., desc=...)`` gives an object with ``update(n)`` and ``close()``
#: (tqdm's; the Ray driver actor passes Ray's ``tqdm_ray``, which draws in the main process).
ProgressFactory = Callable[..., Any]


class SilentBar:
    """The progress bar of a run asked to show none (``progress=False``: compare, sweeps, tests)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def update(self, n: int = 1) -> None:
        pass

    def set_description(self, desc: str) -> None:
        pass

    def close(self) -> None:
        pass


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


def game_rows(
    cfg: ExperimentConfig,
    results: Mapping[int, ShapleyResult],
    selected: Mapping[int, list[int]],
    records: Mapping[int, GameRecord],
    num_players: int,
) -> pd.DataFrame:
    """``shapley_games.csv``: per client, how flat its game was and whether the order broke a tie."""
    sel = cfg.layer_selection
    rows = []
    for client, res in sorted(results.items()):
        if res.method == "none":
            continue
        flat = flatness(res.coalition_values, num_players)
        n_val = records[client].validation_samples if client in records else 0
        ties = ties_at_cut(res.values, selected[client]) if sel.selection == "top_k" else 0
        rows.append(
            {
                "client": client,
                "value": sel.value,
                "validation_samples": n_val,
                # What one validation image moves an accuracy by, in points: an accuracy-valued game
                # cannot resolve less. The ce value moves continuously.
                "one_image_points": 100.0 / n_val if n_val else float("nan"),
                "evaluations": res.evaluations,
                "method": res.method,
                "replicates": res.replicates,
                "marginals_seen": flat.marginals,
                "zero_marginal_share": flat.zero_share,
                "distinct_values": flat.distinct_values,
                "ties_at_cut": ties,
                "tie_break": "earlier layer first" if ties else "no tie",
            }
        )
    return pd.DataFrame(rows)


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
    """Phase 2 for every client; returns ``means`` (client means after Phase 2), ``selected``,
    ``per_client`` and ``seconds_by_stage`` (``phase2_game``, ``tailoring``, ``protocol``)."""
    started = time.perf_counter()
    sel = cfg.layer_selection
    before = {row["client"]: row for row in phase1_eval}
    clients = sorted(c for c in states if c in before)  # a client without a Phase-1 score is not tailored
    if len(clients) < len(states):
        log.warning(
            "phase 2: clients %s have no Phase-1 evaluation and are skipped", sorted(set(states) - set(clients))
        )
    payload = encode_state(global_adapter)
    stage_started = time.perf_counter()
    records: dict[int, GameRecord] = {}
    if sel.selection in BASELINE_SELECTIONS:
        results, failed = {c: _no_game(len(players)) for c in clients}, {}
        selected = {
            c: baseline_selection(
                sel.selection, len(players), sel.top_k, derive_seed(cfg.runtime.seed, "random-layers", c)
            )
            for c in clients
        }
    else:
        results, failed, records = play_games(cfg, executor, len(players), clients, states, payload, progress)
        selected = {c: select_players(results[c].values, sel.selection, sel.top_k, sel.threshold) for c in results}
    evaluations = int(sum(r.evaluations for r in results.values()))
    seconds_by_stage = {"phase2_game": time.perf_counter() - stage_started}
    _log_stage("phase 2 layer games", seconds_by_stage["phase2_game"], f"{evaluations} coalition evaluations")

    stage_started = time.perf_counter()
    tailor_jobs = [Job(c, states[c], players=selected[c], no_tuning=sel.selection == "none") for c in sorted(results)]
    tailored = _with_bar(
        progress, "phase 2 tailoring", tailor_jobs, lambda on_done: executor.tailor(tailor_jobs, payload, on_done)
    )
    seconds_by_stage["tailoring"] = time.perf_counter() - stage_started
    _log_stage("phase 2 tailoring", seconds_by_stage["tailoring"], f"{len(tailor_jobs)} clients")

    stage_started = time.perf_counter()
    # Costliest first (the last job decides the wall time): AutoAttack attacks the images a model
    # gets right, and its later attacks (FAB, Square: most of its time) only those still robust.
    ready = sorted((c for c, o in tailored.items() if o.ok), key=lambda c: -protocol_cost(before[c]))
    show = progress is not SilentBar  # the per-client bars (attack in progress) follow the stage bars
    attacks = ", ".join(protocol_stages(cfg.attack, cfg.evaluation))
    kinds, has_global = cfg.evaluation.transfer, bool(global_adapter)
    protocol_jobs = [
        Job(
            c,
            states[c],
            players=selected[c],
            tuned=tailored[c].upload,
            show_progress=show,
            transfer=plan_sources(kinds, c, ready, has_global),
        )
        for c in ready
    ]
    # Every tailored model, broadcast once: the transfer sources (the peers among them).
    models = (
        encode_models({c: states[c].personal for c in ready}, {c: tailored[c].upload for c in ready})
        if needs_models(kinds)
        else None
    )
    scored = _with_bar(
        progress,
        f"final protocol ({attacks})",
        protocol_jobs,
        lambda on_done: (
            executor.protocol(protocol_jobs, payload, on_done, models_payload=models)
            if models is not None
            else executor.protocol(protocol_jobs, payload, on_done)
        ),
    )
    transfer = [row for o in scored.values() if o.ok for row in o.transfer]
    if kinds:
        write_transfer_outputs(out_dir, transfer)
    seconds_by_stage["protocol"] = time.perf_counter() - stage_started
    _log_stage("final protocol", seconds_by_stage["protocol"], f"{len(protocol_jobs)} clients: {attacks}")

    per_client, shapley_rows = [], []
    for client in clients:
        # Phase 1's plain evaluation; the protocol's figures come from Phase 2's protocol only (a
        # Phase-1 run scored with the protocol must not lend its figures to a Phase 2 that skips them).
        row = {k: v for k, v in before[client].items() if not is_protocol_figure(k)}
        row.update(phase1_clean_acc=row["clean_acc"], phase1_robust_acc=row["robust_acc"])
        if client in results:
            outcome = scored.get(client) or tailored[client]
            if outcome.ok:
                row.update(outcome.metrics, **victim_figures(outcome.transfer))
                atomic_write_bytes(
                    out_dir / "models" / f"phase2_client_{client:04d}.safetensors",
                    tailored[client].upload,  # type: ignore[arg-type]
                )
            else:
                row["phase2_error"] = short_error(outcome.error or "tailoring failed")
            row["selected_layers"] = [players[p] for p in selected[client]]
            res = results[client]
            for index, name in enumerate(players):
                shapley_rows.append(
                    {
                        "client": client,
                        "layer": name,
                        "value": float(res.values[index]),
                        "stderr": float(res.stderr[index]),
                        "evaluations": res.evaluations,
                        "method": res.method,
                        "selected": index in selected[client],
                    }
                )
        else:
            row["phase2_error"] = short_error(failed.get(client, ""))
        per_client.append(row)

    frame = pd.DataFrame(shapley_rows)
    write_table(out_dir / "shapley.csv", frame)
    games = game_rows(cfg, results, selected, records, len(players))
    if not games.empty:
        write_table(out_dir / "shapley_games.csv", games)
        flat = games.loc[games["zero_marginal_share"] >= FLAT_WARNING_SHARE, "client"].tolist()
        if flat:
            log.warning(
                "phase 2: the layer games of clients %s are flat (>= %.0f%% zero marginal contributions; see "
                "shapley_games.csv): their Shapley values cannot tell layers apart%s",
                flat,
                100 * FLAT_WARNING_SHARE,
                "; layer_selection.value=ce moves continuously" if sel.value != "ce" else "",
            )
    plot_heatmap(out_dir, frame)
    per_client_frame = pd.DataFrame(per_client)
    plot_before_after(out_dir, per_client_frame)
    honest, malicious = split_by_malicious(per_client_frame)
    means = client_means(honest)
    scored_rows = [row for row in per_client if "phase2_error" not in row]
    warnings = sanity_warnings(scored_rows, cfg.evaluation, "phase 2 (final)")
    if kinds:
        warnings += transfer_warnings(scored_rows, transfer, cfg.evaluation, "phase 2 (final, transfer)")
    seconds = time.perf_counter() - started
    log.info(
        "phase 2: %d clients, %d layers, %d coalition evaluations, clean %.4f robust %.4f, %.1fs",
        len(results),
        len(players),
        evaluations,
        means["clean_acc"],
        means["robust_acc"],
        seconds,
    )
    return {
        "means": means,
        "malicious_means": client_means(malicious) if len(malicious) else None,
        "selected": {str(c): [players[p] for p in s] for c, s in selected.items()},
        "per_client": per_client,
        "failed": {str(c): e for c, e in failed.items()},
        "seconds": seconds,
        "seconds_by_stage": seconds_by_stage,
        "evaluations": evaluations,
        "sanity_warnings": warnings,
    }


#: A game with at least this share of zero marginal contributions is reported as flat.
FLAT_WARNING_SHARE = 0.5


#: Characters of an error message kept in a summary row.
ERROR_CHARS = 200


def short_error(text: str) -> str:
    """An error's last line, cut short: a Ray traceback names hosts and PIDs, not the experiment."""
    lines = text.strip().splitlines()
    return lines[-1][:ERROR_CHARS] if lines else ""


def protocol_cost(phase1_row: Mapping[str, Any]) -> float:
    """A client's protocol cost, in images attacked, from its Phase-1 figures: the clean-correct
    ones (AutoAttack's first stages) plus the robust ones (its later stages)."""
    clean = float(phase1_row.get("clean_acc", 0.0)) * float(phase1_row.get("num_clean", 0))
    robust = float(phase1_row.get("robust_acc", 0.0)) * float(phase1_row.get("num_robust", 0))
    return clean + robust


def plot_heatmap(out_dir: Path, frame: pd.DataFrame) -> None:
    """Clients x layers, colour = Shapley value, selected layers marked."""
    if frame.empty or frame["value"].isna().all():  # no game was played (random / all)
        return
    plt = pyplot()
    grid = frame.pivot(index="client", columns="layer", values="value")
    chosen = frame.pivot(index="client", columns="layer", values="selected")
    order = list(dict.fromkeys(frame["layer"]))
    grid, chosen = grid[order], chosen[order]
    fig, ax = plt.subplots(figsize=(1.2 + 0.7 * len(order), 1.0 + 0.35 * len(grid)))
    limit = float(np.nanmax(np.abs(grid.to_numpy()))) or 1.0
    image = ax.imshow(grid.to_numpy(), cmap="RdBu", vmin=-limit, vmax=limit, aspect="auto")
    for (i, j), flag in np.ndenumerate(chosen.to_numpy()):
        if flag:
            ax.text(j, i, "*", ha="center", va="center", color="black")
    ax.set_xticks(
        range(len(order)), [name.rstrip(".").removeprefix("backbone.") for name in order], rotation=45, ha="right"
    )
    ax.set_yticks(range(len(grid)), [str(c) for c in grid.index])
    ax.set_xlabel("layer (* selected)")
    ax.set_ylabel("client")
    fig.colorbar(image, ax=ax, label="Shapley value")
    fig.tight_layout()
    save_figure(fig, out_dir / "shapley_heatmap.png")


def plot_before_after(out_dir: Path, frame: pd.DataFrame) -> None:
    """Per client: clean and robust accuracy after Phase 1 and after Phase 2."""
    plt = pyplot()
    x = np.arange(len(frame))
    fig, axes = plt.subplots(1, 2, figsize=(max(6, 0.6 * len(frame) + 2), 3.2), sharey=True)
    for ax, metric in zip(axes, ("clean_acc", "robust_acc")):
        ax.bar(x - 0.2, frame[f"phase1_{metric}"], width=0.4, label="after Phase 1")
        ax.bar(x + 0.2, frame[metric], width=0.4, label="after Phase 2")
        ax.set_title(metric.replace("_acc", " accuracy"))
        ax.set_xticks(x, [str(c) for c in frame["client"]])
        ax.set_xlabel("client")
        ax.set_ylim(0, 1)
    axes[0].legend(loc="lower left")
    fig.tight_layout()
    save_figure(fig, out_dir / "phase2_before_after.png")
