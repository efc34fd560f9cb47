"""Phase 2 across all clients, Ray-free: play every client's layer game in lockstep, tailor, report.

Each client's Shapley estimator (``sylva_ray.method.shapley``) asks for the coalitions it needs next;
the requests of *all* clients are handed to the executor as one batch (in parallel across every
worker), the answers are fed back, until every estimator is done. A coalition evaluation that
fails twice takes its client out of Phase 2 (it keeps its Phase-1 model, and the row says so).

Writes into ``out_dir``: ``shapley.csv`` (client, layer, value, stderr, evaluations, selected),
``shapley_heatmap.png`` (clients x layers), ``phase2_before_after.png`` and, per client,
``models/phase2_client_NNNN.safetensors`` (its tuned layers + head, on top of the global adapter).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from sylva_ray.base.config import ExperimentConfig
from sylva_ray.base.plots import pyplot, save_figure
from sylva_ray.base.seeding import derive_seed
from sylva_ray.base.storage import atomic_write_bytes
from sylva_ray.engine.client import ClientState
from sylva_ray.engine.jobs import Job
from sylva_ray.engine.rundir import write_table
from sylva_ray.engine.summaries import client_means, split_by_malicious
from sylva_ray.method.models import encode_state
from sylva_ray.method.sanity import sanity_warnings
from sylva_ray.method.shapley import ShapleyResult, make_estimator, select_players

log = logging.getLogger(__name__)


def play_games(
    cfg: ExperimentConfig,
    executor: Any,
    num_players: int,
    clients: Sequence[int],
    states: Mapping[int, ClientState],
    payload: bytes,
) -> tuple[dict[int, ShapleyResult], dict[int, str]]:
    """Run every client's estimator to the end; returns results and the clients that failed."""
    sel = cfg.layer_selection
    estimators = {
        c: make_estimator(
            num_players,
            sel.exact_max_players,
            derive_seed(cfg.runtime.seed, "shapley", c),
            sel.max_evaluations,
            sel.stderr_tolerance,
            sel.truncation_tolerance,
            sel.permutations_per_batch,
        )
        for c in clients
    }
    requests = {c: next(est) for c, est in estimators.items()}
    results: dict[int, ShapleyResult] = {}
    failed: dict[int, str] = {}
    while requests:
        jobs = [Job(c, states[c], mask=m) for c, masks in requests.items() for m in masks]
        outcomes = executor.coalitions(jobs, payload)
        answers: dict[int, dict[int, float]] = {c: {} for c in requests}
        for job, outcome in zip(jobs, outcomes):
            if outcome.ok:
                answers[job.client_id][int(job.mask or 0)] = outcome.metrics["value"]
            else:
                failed[job.client_id] = outcome.error or "coalition evaluation failed"
        nxt = {}
        for client, values in answers.items():
            if client in failed:
                log.error("phase 2: client %d leaves the game: %s", client, failed[client])
                continue
            try:
                nxt[client] = estimators[client].send(values)
            except StopIteration as stop:
                results[client] = stop.value
        requests = nxt
    return results, failed


#: Selections that need no game: the two obvious alternatives the Shapley choice must beat.
BASELINE_SELECTIONS = ("random", "all")


def _no_game(num_players: int) -> ShapleyResult:
    return ShapleyResult(np.full(num_players, np.nan), np.full(num_players, np.nan), evaluations=0, method="none")


def baseline_selection(rule: str, num_players: int, top_k: int, seed: int) -> list[int]:
    """``random``: ``top_k`` layers drawn at random (seeded per client); ``all``: every layer."""
    if rule == "all":
        return list(range(num_players))
    return sorted(
        int(i) for i in np.random.default_rng(seed).choice(num_players, size=min(top_k, num_players), replace=False)
    )


def run_phase2(
    cfg: ExperimentConfig,
    executor: Any,
    players: list[str],
    global_adapter: Mapping[str, torch.Tensor],
    states: Mapping[int, ClientState],
    phase1_eval: list[dict[str, Any]],
    out_dir: Path,
) -> dict[str, Any]:
    """Phase 2 for every client; returns ``means`` (client means after Phase 2), ``selected``, ``per_client``."""
    started = time.perf_counter()
    sel = cfg.layer_selection
    before = {row["client"]: row for row in phase1_eval}
    clients = sorted(c for c in states if c in before)  # a client without a Phase-1 score is not tailored
    if len(clients) < len(states):
        log.warning(
            "phase 2: clients %s have no Phase-1 evaluation and are skipped", sorted(set(states) - set(clients))
        )
    payload = encode_state(global_adapter)
    if sel.selection in BASELINE_SELECTIONS:
        results, failed = {c: _no_game(len(players)) for c in clients}, {}
        selected = {
            c: baseline_selection(
                sel.selection, len(players), sel.top_k, derive_seed(cfg.runtime.seed, "random-layers", c)
            )
            for c in clients
        }
    else:
        results, failed = play_games(cfg, executor, len(players), clients, states, payload)
        selected = {c: select_players(results[c].values, sel.selection, sel.top_k, sel.threshold) for c in results}
    tailored = executor.tailor([Job(c, states[c], players=selected[c]) for c in results], payload)

    per_client, shapley_rows = [], []
    for client in clients:
        row = dict(before[client])
        row.update(phase1_clean_acc=row["clean_acc"], phase1_robust_acc=row["robust_acc"])
        if client in results:
            outcome = next(o for o in tailored if o.client_id == client)
            if outcome.ok:
                row.update(outcome.metrics)
                atomic_write_bytes(out_dir / "models" / f"phase2_client_{client:04d}.safetensors", outcome.upload)  # type: ignore[arg-type]
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
            row["phase2_error"] = failed.get(client, "")
        per_client.append(row)

    frame = pd.DataFrame(shapley_rows)
    write_table(out_dir / "shapley.csv", frame)
    plot_heatmap(out_dir, frame)
    per_client_frame = pd.DataFrame(per_client)
    plot_before_after(out_dir, per_client_frame)
    honest, malicious = split_by_malicious(per_client_frame)
    means = client_means(honest)
    warnings = sanity_warnings(
        [row for row in per_client if "phase2_error" not in row], cfg.evaluation, "phase 2 (final)"
    )
    seconds = time.perf_counter() - started
    log.info(
        "phase 2: %d clients, %d layers, %d coalition evaluations, clean %.4f robust %.4f, %.1fs",
        len(results),
        len(players),
        sum(r.evaluations for r in results.values()),
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
        "evaluations": int(sum(r.evaluations for r in results.values())),
        "sanity_warnings": warnings,
    }


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
