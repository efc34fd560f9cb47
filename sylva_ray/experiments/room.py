"""``sylva-ray room``: does a data setting leave collaboration room to help? A check about the data.

Before a benchmark is used to judge a federated method, it should be shown that clients *can*
gain from each other, without looking at any federated method's numbers. Two references, same
backbone, same LoRA + head, same PGD-AT loss (``local_at``'s), same passes over each sample:

- **local**: each client alone, ``federation.rounds x train.local_epochs`` epochs on its own train split;
- **pooled**: one model on every client's train split at once (their shifted images, as each client
  sees them), the same number of epochs (a ``train.local_steps`` cap times the clients); the
  centralised upper reference of federated learning.

Both are scored on every client's own test split (clean and the evaluation PGD). With ``--lrs``
each arm runs at every learning rate given and is judged at its own best (client-mean robust
accuracy on the test splits: the same mild optimism for both arms): one rate that suits a client's
few steps can make the pooled model's many steps collapse to a constant, which would say something
about the rate, not the data. The setting has room to help when the pooled model beats local
training by at least ``--threshold`` robust points (client mean, paired by client), and its clients
differ measurably from an IID split of the same data: label distances (Hellinger) or
class-conditional image distances (``feature_distance``) at least ``DISTANCE_MARGIN`` times those
of an IID split with the same clients and seed.

Writes ``room.csv`` (client by client, seed and learning rate), ``room.json`` (the verdict, the
distances, each arm's figures at every learning rate).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from sylva_ray.base.config import ConfigError, ExperimentConfig
from sylva_ray.base.storage import atomic_write_text
from sylva_ray.engine.client import ClientWorker
from sylva_ray.engine.resolve import build_config
from sylva_ray.engine.rundir import new_unique_dir, resolve_result_path, utc_stamp, write_table
from sylva_ray.method.data import ClientData, DataSource, Partition, concatenate, load_source, make_partition
from sylva_ray.method.heterogeneity import feature_distances

log = logging.getLogger(__name__)

#: Robust points (client mean) by which pooled training must beat local training: "clearly".
DEFAULT_THRESHOLD_POINTS = 5.0
#: A setting's clients "differ measurably" when a mean distance is this many times an IID split's.
DISTANCE_MARGIN = 1.5
#: The reference both arms train as: LoRA + personal head, plain PGD-AT loss, nothing shared.
REFERENCE_ALGORITHM = "local_at"


@dataclasses.dataclass(frozen=True)
class Gain:
    """Pooled minus local accuracy in points: the client mean of per-client differences and its
    standard error (over clients within one seed; over seed means when there are several)."""

    pooled: float
    local: float
    gain: float
    se: float
    clients: int
    seeds: int


def paired_gain(pooled: Sequence[float], local: Sequence[float], seeds: Sequence[int]) -> Gain:
    """Client-mean gain of pooled over local accuracy (fractions in, points out), paired by client.

    With one seed the standard error is the spread of the per-client differences over sqrt(clients);
    with several, the spread of the per-seed client means over sqrt(seeds) (seeds are the
    independent replicates; clients of one seed share one partition)."""
    pooled_arr, local_arr, seed_arr = (np.asarray(x, dtype=float) for x in (pooled, local, seeds))
    if not (len(pooled_arr) == len(local_arr) == len(seed_arr)) or len(pooled_arr) == 0:
        raise ValueError("pooled, local and seeds must be equally long and not empty")
    differences = (pooled_arr - local_arr) * 100
    unique = np.unique(seed_arr)
    if len(unique) == 1:
        se = float(np.std(differences, ddof=1) / math.sqrt(len(differences))) if len(differences) > 1 else math.nan
    else:
        per_seed = np.array([differences[seed_arr == s].mean() for s in unique])
        se = float(np.std(per_seed, ddof=1) / math.sqrt(len(unique)))
    per_seed_mean = lambda values: float(np.mean([values[seed_arr == s].mean() for s in unique]))  # noqa: E731
    return Gain(
        pooled=per_seed_mean(pooled_arr) * 100,
        local=per_seed_mean(local_arr) * 100,
        gain=per_seed_mean(differences),
        se=se,
        clients=int(len(differences) / len(unique)),
        seeds=int(len(unique)),
    )


def differs_measurably(distance: float, iid_distance: float, margin: float = DISTANCE_MARGIN) -> bool:
    """A setting's mean distance against an IID split's (its sampling noise): at least ``margin`` times."""
    return distance >= margin * iid_distance


def verdict(gain: Gain, distances: dict[str, float], threshold: float) -> dict[str, Any]:
    """The check's decision and its reasons, from the measured gain and the distances."""
    label = differs_measurably(distances["mean_hellinger"], distances["iid_mean_hellinger"])
    feature = differs_measurably(distances["mean_feature_distance"], distances["iid_mean_feature_distance"])
    room = gain.gain >= threshold
    return {
        "room_to_help": room,
        "clients_differ": label or feature,
        "labels_differ": label,
        "features_differ": feature,
        "passes": room and (label or feature),
        "threshold_points": threshold,
        "distance_margin": DISTANCE_MARGIN,
    }


def _clients(source: DataSource, partition: Partition) -> list[ClientData]:
    from sylva_ray.method.data import client_data

    return [client_data(source, partition, c) for c in range(partition.num_clients)]


def split_distances(cfg: ExperimentConfig, source: DataSource, partition: Partition) -> dict[str, float]:
    """Mean label and feature distances of the setting's split and of an IID split of the same data."""
    iid_cfg = dataclasses.replace(cfg.data, partition="iid", shift="none")
    iid_partition = make_partition(source, iid_cfg, cfg.runtime.seed)
    info, iid_info = partition.heterogeneity or {}, iid_partition.heterogeneity or {}
    classes = source.num_classes
    return {
        "mean_hellinger": float(info.get("mean_hellinger", math.nan)),
        "mean_jensen_shannon": float(info.get("mean_jensen_shannon", math.nan)),
        "mean_feature_distance": feature_distances(_clients(source, partition), classes)["mean_feature_distance"],
        "iid_mean_hellinger": float(iid_info.get("mean_hellinger", math.nan)),
        "iid_mean_feature_distance": feature_distances(_clients(source, iid_partition), classes)[
            "mean_feature_distance"
        ],
    }


def pooled_split(source: DataSource, clients: list[ClientData]) -> tuple[DataSource, Partition]:
    """A pool whose clients 0..K-1 hold the K clients' test splits and whose client K holds every
    client's train split (each as its client sees it): one model trained as client K, scored as
    each client under that client's own id, so its attacks draw the local arm's seeds. The public
    slice stays, so the pooled model starts from the same pre-trained weights."""
    tests = [c.test for c in clients]
    train = concatenate([c.train for c in clients])
    pool = concatenate([*tests, train])
    bounds = np.cumsum([0] + [len(t) for t in tests])
    empty = np.zeros(0, dtype=np.int64)
    partition = Partition(
        train=[empty] * len(tests) + [np.arange(bounds[-1], bounds[-1] + len(train))],
        test=[np.arange(bounds[k], bounds[k + 1]) for k in range(len(tests))] + [empty],
        fingerprint="pooled",
    )
    return DataSource(name="pooled", private=pool, public=source.public), partition


def pooled_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """The pooled arm's config: a cap on local steps (``train.local_steps``) grows with the clients
    it stands for, so the pooled model gets the optimiser steps of all clients together."""
    if cfg.train.local_steps is None:
        return cfg
    steps = cfg.train.local_steps * cfg.data.num_clients
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, local_steps=steps))


def _trained_state(worker: ClientWorker, client_id: int, rounds: int) -> Any:
    """``rounds`` calls of the engine's own local round (each ``train.local_epochs`` epochs), as a
    federation's client makes them, with nothing received."""
    state = worker.initial_state()
    for round_index in range(rounds):
        state = worker.train(client_id, state, {}, round_index=round_index).state
    return state


def measure_seed(cfg: ExperimentConfig, progress: bool = True) -> tuple[pd.DataFrame, dict[str, float]]:
    """Both arms on one seed at ``cfg.train.lr``: per-client clean and robust accuracy of the local
    and the pooled model."""
    source = load_source(cfg.data)
    partition = make_partition(source, cfg.data, cfg.runtime.seed)
    clients = _clients(source, partition)
    local_worker = ClientWorker(cfg, source, partition)
    rows = []
    bar = tqdm(
        total=2 * len(clients) + 1, desc=f"room seed {cfg.runtime.seed} lr {cfg.train.lr:g}", disable=not progress
    )
    local_results = []
    for client in range(len(clients)):
        state = _trained_state(local_worker, client, cfg.federation.rounds)
        local_results.append(local_worker.evaluate(client, state, {}))
        bar.update(1)
    pooled_source, pooled_partition = pooled_split(source, clients)
    pooled_worker = ClientWorker(pooled_config(cfg), pooled_source, pooled_partition)
    pooled_id = len(clients)
    pooled_state = _trained_state(pooled_worker, pooled_id, cfg.federation.rounds)
    bar.update(1)
    for client, local in enumerate(local_results):
        pooled = pooled_worker.evaluate(client, pooled_state, {})
        bar.update(1)
        rows.append(
            {
                "seed": cfg.runtime.seed,
                "lr": cfg.train.lr,
                "client": client,
                "train": len(clients[client].train),
                "test": local.num_clean,
                "local_clean": local.clean_acc,
                "local_robust": local.robust_acc,
                "pooled_clean": pooled.clean_acc,
                "pooled_robust": pooled.robust_acc,
            }
        )
    bar.close()
    return pd.DataFrame(rows), split_distances(cfg, source, partition)


def best_learning_rates(table: pd.DataFrame) -> dict[str, float]:
    """Each arm's learning rate with the highest client-mean robust accuracy over the seeds."""
    means = table.groupby("lr")[["local_robust", "pooled_robust"]].mean()
    return {arm: float(means[f"{arm}_robust"].idxmax()) for arm in ("local", "pooled")}


def paired_at(table: pd.DataFrame, rates: dict[str, float], figure: str) -> Gain:
    """The pooled arm at its learning rate against the local arm at its own, paired by (seed, client)."""
    pooled = table[table["lr"] == rates["pooled"]].set_index(["seed", "client"])
    local = table[table["lr"] == rates["local"]].set_index(["seed", "client"])
    keys = pooled.index.intersection(local.index)
    return paired_gain(
        pooled.loc[keys, f"pooled_{figure}"], local.loc[keys, f"local_{figure}"], keys.get_level_values("seed")
    )


def check_room(
    raw: dict[str, Any],
    seeds: int,
    out: Optional[Path] = None,
    threshold: float = DEFAULT_THRESHOLD_POINTS,
    learning_rates: Optional[Sequence[float]] = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run both arms on ``seeds`` seeds (``runtime.seed``, +1, ...) at each of ``learning_rates``
    (default: ``train.lr`` alone), each arm at its best one, and write the verdict."""
    if seeds < 1:
        raise ConfigError(f"--seeds {seeds}: give at least 1")
    base = build_config({**raw, "algorithm": {**raw.get("algorithm", {}), "name": REFERENCE_ALGORITHM}})
    rates = list(learning_rates) if learning_rates else [base.train.lr]
    bad = [lr for lr in rates if not (lr > 0 and math.isfinite(lr))]
    if bad or len(set(rates)) < len(rates):
        raise ConfigError(f"--lrs {rates}: give distinct positive learning rates, e.g. --lrs 0.05,0.01")
    folder = (
        new_unique_dir(resolve_result_path(base.output.root), f"room-{utc_stamp()}-{base.name}")
        if out is None
        else resolve_result_path(out)
    )
    if folder.exists() and any(folder.iterdir()):
        raise ConfigError(f"--out {str(folder)!r} exists and is not empty; choose a new folder")
    folder.mkdir(parents=True, exist_ok=True)
    frames, distances = [], []
    for k in range(seeds):
        for lr in rates:
            cfg = dataclasses.replace(
                base,
                runtime=dataclasses.replace(base.runtime, seed=base.runtime.seed + k),
                train=dataclasses.replace(base.train, lr=lr),
            )
            frame, seed_distances = measure_seed(cfg, progress)
            frames.append(frame)
        distances.append(seed_distances)
    table = pd.concat(frames, ignore_index=True)
    write_table(folder / "room.csv", table)
    mean_distances = {key: float(np.mean([d[key] for d in distances])) for key in distances[0]}
    chosen = best_learning_rates(table)
    robust = paired_at(table, chosen, "robust")
    clean = paired_at(table, chosen, "clean")
    by_rate = table.groupby("lr")[["local_clean", "local_robust", "pooled_clean", "pooled_robust"]].mean() * 100
    result = {
        "setting": {
            "data": dataclasses.asdict(base.data),
            "model": base.model.name,
            "epochs": base.federation.rounds * base.train.local_epochs,
            "eps": base.attack.eps,
        },
        "seeds": [base.runtime.seed + k for k in range(seeds)],
        "learning_rates": rates,
        "chosen_learning_rate": chosen,
        "by_learning_rate": {f"{lr:g}": row.round(2).to_dict() for lr, row in by_rate.iterrows()},
        "robust": dataclasses.asdict(robust),
        "clean": dataclasses.asdict(clean),
        "distances": mean_distances,
        **verdict(robust, mean_distances, threshold),
    }
    atomic_write_text(folder / "room.json", _dumps(result))
    log.info(
        "room to help: pooled %.1f (lr %g) vs local %.1f (lr %g) robust: gain %+.1f ± %.1f points, threshold %.1f; "
        "Hellinger %.3f (IID %.3f), feature distance %.3f (IID %.3f): %s",
        robust.pooled,
        chosen["pooled"],
        robust.local,
        chosen["local"],
        robust.gain,
        robust.se,
        threshold,
        mean_distances["mean_hellinger"],
        mean_distances["iid_mean_hellinger"],
        mean_distances["mean_feature_distance"],
        mean_distances["iid_mean_feature_distance"],
        "passes" if result["passes"] else "fails",
    )
    result["out"] = str(folder)
    return result


def _dumps(payload: dict[str, Any]) -> str:
    import json

    return json.dumps(payload, indent=2, default=str, allow_nan=True)
