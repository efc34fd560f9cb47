"""Phase 1's round loop, in-process: sample -> broadcast -> train -> aggregate -> evaluate -> record.

This is the same loop the Ray engine distributes; here one ``ClientWorker`` serves every client in
turn. The pieces that do not depend on where clients run (participant sampling, bookkeeping,
summaries) live here so that both engines share them.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from sylva_ray.aggregation import aggregate
from sylva_ray.client import ClientState, ClientWorker
from sylva_ray.config import ExperimentConfig
from sylva_ray.data import load_source, make_partition
from sylva_ray.models import decode_state, encode_state
from sylva_ray.results import plot_accuracy, write_config, write_json, write_table
from sylva_ray.seeding import numpy_rng
from sylva_ray.storage import atomic_write_bytes

log = logging.getLogger(__name__)


def sample_participants(num_clients: int, fraction: float, seed: int, round_index: int) -> list[int]:
    """Seeded client sampling: ``max(1, round(fraction * K))`` distinct clients, sorted by id."""
    count = max(1, int(round(fraction * num_clients)))
    rng = numpy_rng(seed, "participants", round_index)
    return sorted(int(c) for c in rng.choice(num_clients, size=count, replace=False))


def is_eval_round(round_index: int, cfg: ExperimentConfig) -> bool:
    last = round_index == cfg.federation.rounds - 1
    return last or (round_index + 1) % cfg.federation.eval_every == 0


@dataclass
class RunLog:
    """Rows of metrics.csv and the communication totals, accumulated over rounds."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    bytes_up: int = 0
    bytes_down: int = 0

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows)

    def round_means(self) -> pd.DataFrame:
        frame = self.frame()
        numeric = [c for c in frame.columns if c not in {"client", "participated"} and pd.api.types.is_numeric_dtype(frame[c])]
        return frame.groupby("round", as_index=False)[[c for c in numeric if c != "round"]].mean()


def client_means(evaluation: pd.DataFrame) -> dict[str, float]:
    """Unweighted client means (each client's model counts once) and test-sample-weighted means."""
    return {
        "clean_acc": float(evaluation["clean_acc"].mean()),
        "robust_acc": float(evaluation["robust_acc"].mean()),
        "clean_acc_weighted": float(np.average(evaluation["clean_acc"], weights=evaluation["num_clean"])),
        "robust_acc_weighted": float(np.average(evaluation["robust_acc"], weights=evaluation["num_robust"])),
    }


def summarise(final_eval: pd.DataFrame, run_log: RunLog, full_model_bytes: int, adapter_bytes: int, rounds: int, seconds: float) -> dict[str, Any]:
    """summary.json: client means of the final personalised models, communication, per-client rows."""
    means = client_means(final_eval)
    below = final_eval.loc[final_eval["clean_acc"] < final_eval["majority_rate"], "client"].astype(int).tolist()
    return {
        "final": means,
        "phase1": dict(means),
        "sanity": {
            "majority_rate": float(final_eval["majority_rate"].mean()),
            "clients_below_majority_rate": below,
        },
        "communication": {
            "bytes_up": run_log.bytes_up,
            "bytes_down": run_log.bytes_down,
            "adapter_bytes": adapter_bytes,
            "full_model_bytes": full_model_bytes,
            "full_over_adapter": full_model_bytes / adapter_bytes,
            "rounds": rounds,
        },
        "seconds": seconds,
        "per_client": final_eval.to_dict(orient="records"),
    }


def run_inprocess(cfg: ExperimentConfig, run_dir: Path) -> dict[str, Any]:
    """Run Phase 1 in this process and write the run directory; returns the summary."""
    started = time.perf_counter()
    write_config(run_dir, cfg)
    source = load_source(cfg.data)
    partition = make_partition(source, cfg.data, cfg.runtime.seed)
    partition.save(run_dir / "partition.json")
    worker = ClientWorker(cfg, source, partition)
    states: dict[int, ClientState] = {cid: worker.initial_state() for cid in range(cfg.data.num_clients)}
    global_adapter = worker.initial_adapter
    run_log = RunLog()
    last_eval: pd.DataFrame | None = None

    progress = tqdm(range(cfg.federation.rounds), desc="phase 1 rounds")
    for round_index in progress:
        participants = sample_participants(cfg.data.num_clients, cfg.federation.participation, cfg.runtime.seed, round_index)
        payload = encode_state(global_adapter)  # what the broadcast ships, byte for byte
        received = decode_state(payload)
        updates = [worker.train(cid, states[cid], received, round_index) for cid in participants]
        uploads = [encode_state(u.adapter) for u in updates]
        global_adapter, weights = aggregate(
            cfg.federation.aggregation, [u.adapter for u in updates], [u.num_samples for u in updates], cfg.federation
        )
        rows: dict[int, dict[str, Any]] = {}
        for update, upload, weight in zip(updates, uploads, weights):
            states[update.client_id] = update.state
            rows[update.client_id] = {
                "round": round_index, "client": update.client_id, "participated": True,
                "bytes_up": len(upload), "bytes_down": len(payload), "agg_weight": float(weight),
                **update.metrics.as_dict("train_"),
            }
            run_log.bytes_up += len(upload)
            run_log.bytes_down += len(payload)
        if is_eval_round(round_index, cfg):
            evaluation = []
            for cid in range(cfg.data.num_clients):
                result = worker.evaluate(cid, states[cid], global_adapter)
                row = rows.setdefault(cid, {"round": round_index, "client": cid, "participated": False})
                row.update(result.as_dict(), majority_rate=worker.data(cid).majority_class_rate())
                evaluation.append({"client": cid, "num_train": len(worker.data(cid).train), **row})
            last_eval = pd.DataFrame(evaluation)[["client", "num_train", "num_clean", "num_robust", "clean_acc", "robust_acc", "majority_rate"]]
        run_log.rows.extend(rows[c] for c in sorted(rows))
        means = run_log.round_means().iloc[-1]
        progress.set_postfix(clean=f"{means.get('clean_acc', float('nan')):.3f}", robust=f"{means.get('robust_acc', float('nan')):.3f}")
        log.info(
            "round %d/%d clients=%d loss=%.4f clean=%.4f robust=%.4f up=%dB",
            round_index + 1, cfg.federation.rounds, len(participants), float(means.get("train_loss", np.nan)),
            float(means.get("clean_acc", np.nan)), float(means.get("robust_acc", np.nan)), sum(len(u) for u in uploads),
        )

    assert last_eval is not None  # the last round always evaluates
    write_table(run_dir / "metrics.csv", run_log.frame())
    write_table(run_dir / "rounds.csv", run_log.round_means())
    plot_accuracy(run_dir, run_log.round_means())
    if cfg.output.save_models:
        for cid, state in states.items():
            atomic_write_bytes(run_dir / "models" / f"client_{cid:04d}.safetensors", encode_state({**global_adapter, **state.head}))
    summary = summarise(last_eval, run_log, worker.full_model_bytes, len(encode_state(global_adapter)), cfg.federation.rounds,
                        time.perf_counter() - started)
    if summary["sanity"]["clients_below_majority_rate"]:
        log.warning("clients %s end below their majority-class rate (a collapsed model)", summary["sanity"]["clients_below_majority_rate"])
    write_json(run_dir / "summary.json", summary)
    return summary
