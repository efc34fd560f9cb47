"""``sylva-ray bench estimator``: shapiq's approximators vs exact Shapley values on real 8-player
client games at equal budgets (rank correlation, top-k agreement, error, standard-error coverage),
for the ce and the accuracy value function, and how flat each game is.
"""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from sylva_ray.base.config import ExperimentConfig
from sylva_ray.engine.client import ClientWorker
from sylva_ray.engine.rundir import write_table
from sylva_ray.experiments.bench.common import with_sections
from sylva_ray.method.data import load_source, make_partition
from sylva_ray.method.layer_selection import coalition_value
from sylva_ray.method.shapley import (
    ANTITHETIC,
    ESTIMATORS,
    exact_shapley,
    flatness,
    make_estimator,
    replay,
    select_players,
    spearman,
    ties_at_cut,
)

#: Estimator study: 8 players = LoRA on qkv and fc1 of the 4 blocks, modules granularity.
ESTIMATOR_TARGETS, ESTIMATOR_CLIENTS, ESTIMATOR_SEEDS = ["attn.qkv", "mlp.fc1"], (0, 1, 2, 3), 5
#: Budgets (distinct coalitions) at which every estimator is compared; the exact game has 256.
ESTIMATOR_BUDGETS = (32, 64, 128)
#: The value functions whose games are compared (same coalition evaluations, two readings).
GAME_VALUES = ("ce", "linear")
#: shapiq approximators run once (no stderr) and as replicates (stderr from their spread).
ESTIMATOR_REPLICATES = (1, 4)
#: Layers kept in the estimator study's top-k agreement (the default ``top_k``).
ESTIMATOR_TOP_K = 2


def exhaustive_games(cfg: ExperimentConfig, clients: Sequence[int]) -> tuple[int, dict[int, dict[int, dict]]]:
    """Every coalition of each client's 8-player game, evaluated once: (players, client -> mask -> figures).

    The figures (validation accuracies and cross-entropies) are what every value function reads, so
    one evaluation serves the ce and the accuracy game alike; the game is deterministic (same fused
    start, seed and adversarial start), so any estimator can replay it at no cost.
    """
    source = load_source(cfg.data)
    worker = ClientWorker(cfg, source, make_partition(source, cfg.data, cfg.runtime.seed))
    tables = {}
    players = 0
    for client in clients:
        game = worker.game(client, worker.initial_state(), worker.initial_adapter, "initial")
        players = len(game.players)
        tables[client] = {
            mask: game.value(mask).as_dict() for mask in tqdm(range(1 << players), desc=f"client {client} game")
        }
    return players, tables


def _top(values: np.ndarray, k: int) -> set[int]:
    return set(select_players(values, "top_k", k, 0.0))


def bench_estimator(cfg: ExperimentConfig, out: Path) -> pd.DataFrame:
    """shapiq's approximators vs the exact Shapley values of real 8-player client games, at equal
    budgets, with one run and with the replicates that give standard errors; writes
    ``bench_estimator_games.csv`` (how flat each value function's game is) beside it."""
    game_cfg = with_sections(cfg, lora={"target_modules": ESTIMATOR_TARGETS}, layer_selection={"players": "modules"})
    players, tables = exhaustive_games(game_cfg, ESTIMATOR_CLIENTS)
    rows, games = [], []
    for client, figures in tables.items():
        for value in GAME_VALUES:
            sel = dataclasses.replace(game_cfg.layer_selection, value=value)
            table = {mask: coalition_value(sel, f, float("nan")) for mask, f in figures.items()}
            exact = replay(exact_shapley(players), table)
            flat = flatness(table, players)
            games.append(
                {
                    "client": client,
                    "value": value,
                    "players": players,
                    "zero_marginal_share": flat.zero_share,
                    "distinct_values": flat.distinct_values,
                    "ties_at_cut": ties_at_cut(exact.values, sorted(_top(exact.values, ESTIMATOR_TOP_K))),
                }
            )
            estimators = [(ANTITHETIC, 1)] + [(name, r) for name in ESTIMATORS for r in ESTIMATOR_REPLICATES]
            for (name, replicates), budget, seed in itertools.product(
                estimators, ESTIMATOR_BUDGETS, range(ESTIMATOR_SEEDS)
            ):
                # A tolerance no estimate reaches: every run spends its whole budget (equal budgets).
                est = replay(
                    make_estimator(
                        players,
                        0,
                        name,
                        budget,
                        1e-12,
                        seed,
                        replicates=replicates,
                        truncation_tolerance=sel.truncation_tolerance,
                        permutations_per_batch=sel.permutations_per_batch,
                    ),
                    table,
                )
                error = np.abs(est.values - exact.values)
                rows.append(
                    {
                        "client": client,
                        "value": value,
                        "estimator": name,
                        "budget": budget,
                        "replicates": replicates,
                        "seed": seed,
                        "evaluations": est.evaluations,
                        "spearman": spearman(est.values, exact.values),
                        "top_k_agrees": _top(est.values, ESTIMATOR_TOP_K) == _top(exact.values, ESTIMATOR_TOP_K),
                        "max_abs_error": float(error.max()),
                        "relative_error": float(error.max() / max(np.abs(exact.values).max(), 1e-12)),
                        # With replicates: the share of layers whose exact value lies within 2 stderr.
                        "within_2_stderr": float(np.mean(error <= 2 * est.stderr))
                        if np.isfinite(est.stderr).all()
                        else np.nan,
                    }
                )
    write_table(out / "bench_estimator_games.csv", pd.DataFrame(games).round(4))
    frame = pd.DataFrame(rows)
    summary = (
        frame.groupby(["value", "estimator", "budget", "replicates"])
        .agg(
            spearman=("spearman", "mean"),
            top_k_agrees=("top_k_agrees", "mean"),
            relative_error=("relative_error", "mean"),
            within_2_stderr=("within_2_stderr", "mean"),
            evaluations=("evaluations", "mean"),
            runs=("seed", "size"),
        )
        .reset_index()
    )
    write_table(out / "bench_estimator_runs.csv", frame.round(4))
    return summary.round(3)
