"""The simulated clock: what each round would cost on the clients' devices and links, and who straggles.

Nothing here reads a wall clock, so the clock is the same on any machine and with any number of
actors. Per client and round:

    compute  = steps x FLOPs per step / (peak FLOP/s x efficiency)        (FLOPs: ``method.cost``)
    download = bytes_down x 8 / (downlink_mbps x 1e6) + latency_s
    upload   = bytes_up   x 8 / (uplink_mbps   x 1e6) + latency_s
    total    = download + compute + upload

A synchronous round lasts as long as its slowest participant. With ``federation.deadline_s`` a
client whose total would exceed it is a *straggler*: the server closes the round at the deadline
and does not aggregate it; the client's work is cut off, so the simulation does not train it and
its personal state stays as it was. With ``system.availability`` each sampled client is online
with its device class's probability, drawn from ``(run seed, round, client)``. Both are decided
before the round from the configuration, the partition and the FLOP count alone, so they do not
depend on which actor runs what.

Bytes are the exact serialized bytes the engine counts; the straggler decision uses the upload's
size before training, which is the received payload's (an upload has the same tensors as the
broadcast), and the recorded upload time uses the bytes actually sent.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

import numpy as np
import pandas as pd

from sylva_ray.base.config import ExperimentConfig, SystemConfig
from sylva_ray.base.plots import pyplot, save_figure
from sylva_ray.base.seeding import numpy_rng
from sylva_ray.engine.rundir import plot_accuracy
from sylva_ray.method.cost import batch_sequence
from sylva_ray.method.devices import Profile, device_classes, network_classes, resolve_profile

log = logging.getLogger(__name__)

BITS_PER_BYTE = 8
BITS_PER_MEGABIT = 1e6
SECONDS_PER_HOUR = 3600.0
#: Shares of the run's final robust accuracy whose simulated time-to-reach the summary reports.
TIME_TO_SHARES = (0.9, 0.95)
DEVICES_FILE = "devices.csv"


def transfer_seconds(num_bytes: int, mbps: float, latency_s: float) -> float:
    """Seconds to move ``num_bytes`` over a ``mbps`` link, plus one round-trip latency (nothing to
    send costs nothing: the ``local`` scope shares no tensor)."""
    if num_bytes <= 0:
        return 0.0
    return num_bytes * BITS_PER_BYTE / (mbps * BITS_PER_MEGABIT) + latency_s


def client_times(profile: Profile, flops: float, bytes_down: int, bytes_up: int) -> dict[str, float]:
    """The clock's four columns for one client and round."""
    compute = flops / profile.sustained_flops_per_s
    download = transfer_seconds(bytes_down, profile.downlink_mbps, profile.latency_s)
    upload = transfer_seconds(bytes_up, profile.uplink_mbps, profile.latency_s)
    return {
        "sim_compute_s": compute,
        "sim_download_s": download,
        "sim_upload_s": upload,
        "sim_total_s": download + compute + upload,
    }


def assign_profiles(system: SystemConfig, num_clients: int, seed: int) -> list[str]:
    """One profile name per client: the explicit list, or the mix's proportions (largest remainder)
    over a seeded permutation of the clients."""
    if isinstance(system.devices, list):
        return list(system.devices)
    names = list(system.devices)
    weights = np.array([system.devices[n] for n in names], dtype=float)
    exact = weights / weights.sum() * num_clients
    counts = np.floor(exact).astype(int)
    for index in np.argsort(-(exact - counts), kind="stable")[: num_clients - counts.sum()]:
        counts[index] += 1
    order = numpy_rng(seed, "devices").permutation(num_clients)
    assigned = [""] * num_clients
    position = 0
    for name, count in zip(names, counts):
        for client in order[position : position + count]:
            assigned[int(client)] = name
        position += count
    return assigned


@dataclass
class RoundPlan:
    """Who of the sampled clients trains this round, decided before it starts."""

    online: list[int]
    offline: list[int]
    stragglers: list[int]
    takers: list[int]
    times: dict[int, dict[str, float]]  # predicted clock columns of every online client


class SimulatedClock:
    """Profiles, per-client FLOPs per round and the round plan; built once per run."""

    def __init__(
        self,
        cfg: ExperimentConfig,
        num_train: Mapping[int, int],
        step_flops: Mapping[int, int],
        train_memory_gb: Optional[float] = None,
    ) -> None:
        self.cfg = cfg
        system = cfg.system
        devices, networks = device_classes(system.device_classes), network_classes(system.network_classes)
        names = assign_profiles(system, cfg.data.num_clients, cfg.runtime.seed)
        self.profiles = {
            c: resolve_profile(n, cfg.runtime.precision, devices, networks, system.efficiency)
            for c, n in enumerate(names)
        }
        train = cfg.train
        self.num_train = {c: int(n) for c, n in num_train.items()}
        self.batches = {
            c: batch_sequence(int(n), train.batch_size, train.local_epochs, train.local_steps)
            for c, n in num_train.items()
        }
        uncounted = sorted({b for seq in self.batches.values() for b in seq} - set(step_flops))
        if uncounted:
            raise ValueError(
                f"no FLOP count for batch sizes {uncounted}: the executor's WorkerInfo.step_flops must cover every "
                "client's batches (or set system.clock=false)"
            )
        self.flops = {c: int(sum(step_flops[b] for b in seq)) for c, seq in self.batches.items()}
        self.train_memory_gb = train_memory_gb
        self.short_of_memory = (
            sorted(c for c, p in self.profiles.items() if p.memory_gb < train_memory_gb)
            if train_memory_gb is not None
            else []
        )
        if self.short_of_memory:
            log.warning(
                "clients %s: their devices' memory is below the ~%.2f GB one client's training needs "
                "(devices.csv: fits_memory)",
                self.short_of_memory,
                train_memory_gb,
            )

    def devices_frame(self) -> pd.DataFrame:
        """``devices.csv``: one row per client, its profile's numbers and its work per round."""
        rows = []
        for c, p in sorted(self.profiles.items()):
            rows.append(
                {
                    "client": c,
                    "profile": p.name,
                    "device": p.device,
                    "network": p.network,
                    "flops_per_s": p.flops_per_s,
                    "efficiency": p.efficiency,
                    "downlink_mbps": p.downlink_mbps,
                    "uplink_mbps": p.uplink_mbps,
                    "latency_s": p.latency_s,
                    "memory_gb": p.memory_gb,
                    "availability": p.availability,
                    "num_train": self.num_train.get(c, 0),
                    "steps_per_round": len(self.batches.get(c, [])),
                    "flops_per_round": self.flops.get(c, 0),
                    "train_memory_gb": self.train_memory_gb,
                    "fits_memory": c not in self.short_of_memory,
                }
            )
        return pd.DataFrame(rows)

    def times(self, client: int, bytes_down: int, bytes_up: int) -> dict[str, float]:
        return client_times(self.profiles[client], self.flops[client], bytes_down, bytes_up)

    def plan(self, round_index: int, sampled: Iterable[int], bytes_down: int) -> RoundPlan:
        """Availability draws, then the deadline, for the sampled clients of one round."""
        online, offline = [], []
        for c in sampled:
            draw = numpy_rng(self.cfg.runtime.seed, "availability", round_index, c).random()
            (online if not self.cfg.system.availability or draw < self.profiles[c].availability else offline).append(c)
        times = {c: self.times(c, bytes_down, bytes_down) for c in online}
        deadline = self.cfg.federation.deadline_s
        stragglers = [c for c in online if deadline is not None and times[c]["sim_total_s"] > deadline]
        return RoundPlan(online, offline, stragglers, [c for c in online if c not in stragglers], times)

    def round_seconds(self, plan: RoundPlan, recorded: Mapping[int, float]) -> float:
        """The round's length: its slowest taker; with a deadline, the deadline when someone missed
        it or nobody came, and never more than the deadline."""
        deadline = self.cfg.federation.deadline_s
        slowest = float(max(recorded.values(), default=0.0))
        if deadline is None:
            return slowest
        return float(deadline) if plan.stragglers or not plan.takers else min(slowest, float(deadline))


def time_to_share(rounds: pd.DataFrame, column: str = "robust_acc") -> dict[str, Optional[float]]:
    """Simulated seconds until an evaluated round first reached 90% / 95% of the last one's ``column``."""
    evaluated = rounds.dropna(subset=[column]) if column in rounds else rounds.iloc[0:0]
    result: dict[str, Optional[float]] = {}
    for share in TIME_TO_SHARES:
        key = f"time_to_{round(share * 100)}pct_{column}_s"
        if evaluated.empty or "sim_clock_s" not in evaluated:
            result[key] = None
            continue
        target = share * float(evaluated[column].iloc[-1])
        reached = evaluated.loc[evaluated[column] >= target, "sim_clock_s"]
        result[key] = float(reached.iloc[0]) if len(reached) else None
    return result


def clock_summary(clock: SimulatedClock, rows: pd.DataFrame, rounds: pd.DataFrame) -> dict[str, Any]:
    """``summary.json``'s ``simulated`` section."""
    total = float(rounds["sim_round_s"].sum()) if "sim_round_s" in rounds else 0.0
    trained = work_done(rows)
    by_device = breakdown(trained) if len(trained) else []
    return {
        "seconds": total,
        "hours": total / SECONDS_PER_HOUR,
        "mean_round_s": float(rounds["sim_round_s"].mean()) if "sim_round_s" in rounds else None,
        **time_to_share(rounds),
        "straggler_client_rounds": int(rows["straggler"].fillna(False).astype(bool).sum()),
        "offline_client_rounds": int((~rows["online"].fillna(True).astype(bool)).sum()),
        "deadline_s": clock.cfg.federation.deadline_s,
        "devices": pd.Series([p.name for p in clock.profiles.values()]).value_counts().sort_index().to_dict(),
        "clients_short_of_memory": clock.short_of_memory,
        "train_memory_gb": clock.train_memory_gb,
        "by_device": by_device,
    }


def work_done(rows: pd.DataFrame) -> pd.DataFrame:
    """Client-rounds that trained and uploaded (not stragglers' predicted times, not offline clients)."""
    if "sim_total_s" not in rows or "participated" not in rows:
        return rows.iloc[0:0]
    took_part = rows["participated"].fillna(False).astype(bool)
    if "straggler" in rows:
        took_part &= ~rows["straggler"].fillna(False).astype(bool)
    return rows[took_part & rows["sim_total_s"].notna()]


def breakdown(rows: pd.DataFrame) -> list[dict[str, Any]]:
    """Mean simulated seconds per client-round by profile, split into compute and network, with the
    number of client-rounds each mean is over."""
    frame = rows.assign(sim_network_s=rows["sim_download_s"] + rows["sim_upload_s"])
    columns = ["sim_compute_s", "sim_download_s", "sim_upload_s", "sim_network_s", "sim_total_s"]
    grouped = frame.groupby("profile")
    sizes = grouped.size()
    return [
        {"profile": name, "client_rounds": int(sizes[name]), **{k: float(v) for k, v in means.items()}}
        for name, means in grouped[columns].mean().iterrows()
    ]


def plot_clock(run_dir: Path, rows: pd.DataFrame, rounds: pd.DataFrame) -> list[Path]:
    """``accuracy_vs_sim_time.png`` and ``sim_time_by_device.png`` (compute vs network per profile)."""
    hours = rounds.assign(sim_hours=rounds["sim_clock_s"] / SECONDS_PER_HOUR) if "sim_clock_s" in rounds else rounds
    curve = plot_accuracy(run_dir, hours, "sim_hours", "simulated time (hours)", "accuracy_vs_sim_time.png")
    written = [curve] if curve is not None else []
    plt = pyplot()
    trained = work_done(rows)
    if len(trained):
        table = pd.DataFrame(breakdown(trained)).set_index("profile")
        fig, ax = plt.subplots(figsize=(6, 0.5 + 0.45 * len(table)))
        ax.barh(table.index, table["sim_compute_s"], label="compute")
        ax.barh(table.index, table["sim_network_s"], left=table["sim_compute_s"], label="download + upload")
        ax.set_xlabel("simulated seconds per client-round (mean)")
        ax.legend(loc="lower right")
        ax.grid(alpha=0.3, axis="x")
        fig.tight_layout()
        written.append(save_figure(fig, run_dir / "sim_time_by_device.png"))
    return written
