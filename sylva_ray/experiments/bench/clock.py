"""``sylva-ray bench clock``: simulated round time of Sylva vs FAT on device mixes, without training.

The simulated clock (``engine.clock``) needs only the FLOPs of one local step per batch shape
(counted on a ``meta``-device model: no weights), the exact serialized bytes of the broadcast and
of an upload (the configured model built without pre-trained weights and serialized as the engine
does), and the clients' sample counts (the run's own partitioner). So a ViT-B/16 round on phones
over 4G can be costed on a laptop in seconds, and the same numbers appear in a real run's
``metrics.csv``.

For a dataset whose files are not on this machine (CIFAR), the partition is made from a stand-in
with the dataset's label counts (CIFAR-10 and CIFAR-100: balanced, 50,000 training images, all
private as in the real source): the partitioners see only labels, so the client sizes are those
the real files would give (up to the order of the labels in the files).

Tables (under ``--out``): ``bench_clock.csv`` (algorithm x mix x profile: mean compute, download,
upload seconds per client-round, the round's length and FAT's round over Sylva's on the same mix),
``bench_clock_deadline.csv`` (on the first mix, at deadlines set to quantiles of Sylva's client
times: who takes part, by profile and client size).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sylva_ray.base.config import DEFAULT_DEVICE_MIX, ExperimentConfig
from sylva_ray.engine.clock import SimulatedClock
from sylva_ray.engine.resolve import build_config
from sylva_ray.engine.rundir import write_table
from sylva_ray.method.algorithms import algorithm_for
from sylva_ray.method.cost import batch_sizes_of, client_model, step_flops_by_batch
from sylva_ray.method.data import ArrayDataset, DataSource, known_inputs, load_source, make_partition
from sylva_ray.method.wire import encode_state

log = logging.getLogger(__name__)

ALGORITHMS = ("sylva", "fat")
#: Device mixes costed side by side (profile -> proportion of the clients).
MIXES: dict[str, dict[str, float]] = {
    "edge (default)": dict(DEFAULT_DEVICE_MIX),
    "jetson_agx_orin@wifi": {"jetson_agx_orin@wifi": 1.0},
    "jetson_orin_nano@wifi": {"jetson_orin_nano@wifi": 1.0},
    "phones@4g": {"phone_midrange@4g": 0.5, "phone_highend@4g": 0.5},
}
#: Deadlines for the participation table: these quantiles of Sylva's per-client round times.
DEADLINE_QUANTILES = (0.5, 0.75, 0.9)


def _source(cfg: ExperimentConfig) -> tuple[DataSource, tuple[int, ...]]:
    known = known_inputs(cfg.data.name)  # its files may be missing here (balanced classes)
    if known is not None:
        shape, classes, count = known.image_shape, known.num_classes, known.train_size
        labels = np.arange(count) % classes
        log.info("bench clock: %s client sizes from its label counts (%d images, balanced)", cfg.data.name, count)
        stand_in = ArrayDataset(np.zeros((count, 1, 1, 1), np.float32), labels, classes)
        return DataSource(name=cfg.data.name, private=stand_in), shape  # CIFAR has no public slice
    source = load_source(cfg.data)
    return source, source.image_shape


def wire_bytes(cfg: ExperimentConfig, num_classes: int) -> int:
    """Serialized bytes of the broadcast (= one upload) for ``cfg``'s algorithm, built without weights."""
    return len(encode_state(algorithm_for(cfg).scope.shared(client_model(cfg, num_classes))))


def _work(cfg: ExperimentConfig) -> tuple[dict[int, int], dict[int, int], int]:
    """Client sizes, FLOPs per step by batch and wire bytes: what the clock needs, whatever the mix."""
    source, shape = _source(cfg)
    partition = make_partition(source, cfg.data, cfg.runtime.seed)
    num_train = {c: len(t) for c, t in enumerate(partition.train)}
    flops = step_flops_by_batch(cfg, shape, source.num_classes, batch_sizes_of(num_train.values(), cfg.train))
    return num_train, flops, wire_bytes(cfg, source.num_classes)


def _with_mix(cfg: ExperimentConfig, mix: dict[str, float]) -> ExperimentConfig:
    raw = cfg.to_dict()
    raw["system"] = {**raw["system"], "devices": mix}
    return build_config(raw, check_paths=False)


def _algorithm_config(cfg: ExperimentConfig, algorithm: str) -> ExperimentConfig:
    raw = cfg.to_dict()
    raw["algorithm"] = {**raw["algorithm"], "name": algorithm, "ablations": []}
    return build_config(raw, check_paths=False)


def bench_clock(cfg: ExperimentConfig, out: Path) -> pd.DataFrame:
    """One round, every client, each algorithm on each mix: seconds by profile, compute vs network."""
    rows: list[dict[str, Any]] = []
    clocks: dict[tuple[str, str], tuple[SimulatedClock, int]] = {}
    for algorithm in ALGORITHMS:
        algorithm_cfg = _algorithm_config(cfg, algorithm)
        num_train, flops, payload = _work(algorithm_cfg)
        for mix_name, mix in MIXES.items():
            clock = SimulatedClock(_with_mix(algorithm_cfg, mix), num_train, flops)
            clocks[algorithm, mix_name] = clock, payload
            times = pd.DataFrame(
                [
                    {"client": c, "profile": clock.profiles[c].name, **clock.times(c, payload, payload)}
                    for c in clock.profiles
                ]
            )
            round_s = float(times["sim_total_s"].max())
            for profile, group in times.groupby("profile"):
                rows.append(
                    {
                        "model": cfg.model.name,
                        "algorithm": algorithm,
                        "mix": mix_name,
                        "profile": profile,
                        "clients": len(group),
                        "bytes_each_way": payload,
                        "compute_s": float(group["sim_compute_s"].mean()),
                        "download_s": float(group["sim_download_s"].mean()),
                        "upload_s": float(group["sim_upload_s"].mean()),
                        "total_s": float(group["sim_total_s"].mean()),
                        "network_share": float(
                            (group["sim_download_s"] + group["sim_upload_s"]).sum() / group["sim_total_s"].sum()
                        ),
                        "round_s": round_s,
                    }
                )
    frame = pd.DataFrame(rows)
    sylva_rounds = frame[frame["algorithm"] == "sylva"].groupby("mix")["round_s"].first()
    frame["round_vs_sylva"] = frame["round_s"] / frame["mix"].map(sylva_rounds)
    write_table(out / "bench_clock_deadline.csv", deadline_table(*clocks["sylva", next(iter(MIXES))]))
    return frame


def deadline_table(clock: SimulatedClock, payload: int) -> pd.DataFrame:
    """Who makes each deadline (quantiles of the clients' round times), with their size and profile."""
    totals = {c: clock.times(c, payload, payload)["sim_total_s"] for c in clock.profiles}
    rows = []
    for quantile in DEADLINE_QUANTILES:
        deadline = float(np.quantile(list(totals.values()), quantile))
        for c, total in sorted(totals.items()):
            rows.append(
                {
                    "deadline_quantile": quantile,
                    "deadline_s": deadline,
                    "client": c,
                    "profile": clock.profiles[c].name,
                    "num_train": clock.num_train[c],
                    "sim_total_s": total,
                    "straggler": total > deadline,
                }
            )
    return pd.DataFrame(rows)
