"""``sylva-ray bench engine``: the same Phase-1 training rounds (same model, data, clients, steps,
seeds; no evaluation) done three ways in one process session: a plain in-process Python loop over
one ``ClientWorker``, the Ray engine with 1 client actor, and with 2. Each uses one torch thread
per worker. Setup (model build, actor start) is timed apart from the rounds.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Optional

import pandas as pd
import torch

from sylva_ray.base.config import ExperimentConfig
from sylva_ray.distributed.launcher import remote_federation
from sylva_ray.engine.client import ClientState, ClientWorker
from sylva_ray.engine.federation import sample_participants
from sylva_ray.engine.resolve import build_config
from sylva_ray.engine.rundir import prepare_data
from sylva_ray.method.aggregation import aggregate
from sylva_ray.method.models import resolve_device

log = logging.getLogger(__name__)


def engine_leg_config(cfg: ExperimentConfig, actors: Optional[int], cuda: bool) -> ExperimentConfig:
    """The config of one leg of the engine bench: every leg computes on the same device.

    The plain loop runs in this process on ``runtime.device``; the Ray legs must do the same work
    there. With CUDA, each of the ``actors`` client actors holds ``1 / actors`` of the one GPU (a
    leg without a GPU share would be refused on a GPU host, rightly: its clients would use the
    CPU); without, the legs say ``runtime.device=cpu`` and ask for no GPU.
    """
    raw = cfg.to_dict()
    runtime = {**raw["runtime"], "torch_threads": 1, "device": "cuda" if cuda else "cpu"}
    resources = {k: v for k, v in runtime["client_resources"].items() if k != "num_gpus"}
    if actors is not None:
        runtime["num_actors"] = actors
        if cuda:
            resources["num_gpus"] = 1.0 / actors
    runtime["client_resources"] = resources
    return build_config({**raw, "runtime": runtime})


def bench_on_cuda(cfg: ExperimentConfig) -> bool:
    """Whether the benches' legs compute on a GPU: ``runtime.device``, with ``auto`` read here."""
    return resolve_device(cfg.runtime.device).type == "cuda"


def _plain_loop(cfg: ExperimentConfig) -> tuple[float, float]:
    """The reference: Phase-1 rounds as a plain loop in this process (setup s, rounds s)."""
    cfg = engine_leg_config(cfg, None, bench_on_cuda(cfg))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            source, partition = prepare_data(cfg, Path(tmp), resume=False)
        worker = ClientWorker(cfg, source, partition)
        heads = {c: ClientState(personal=dict(worker.initial_personal)) for c in range(cfg.data.num_clients)}
        adapter = worker.initial_adapter
        setup = time.perf_counter() - started
        started = time.perf_counter()
        for r in range(cfg.federation.rounds):
            participants = sample_participants(cfg.data.num_clients, cfg.federation.participation, cfg.runtime.seed, r)
            updates = [worker.train(c, heads[c], adapter, r) for c in participants]
            for update in updates:
                heads[update.client_id] = update.state
            adapter, _ = aggregate(
                cfg.federation.aggregation,
                [u.adapter for u in updates],
                [u.num_samples for u in updates],
                cfg.federation,
            )
        return setup, time.perf_counter() - started
    finally:
        torch.set_num_threads(threads)


def ray_rounds(cfg: ExperimentConfig, actors: int) -> tuple[float, float, list[dict]]:
    """The same rounds through the Ray engine with ``actors`` client actors (setup s, rounds s, per-round rows)."""
    cfg = engine_leg_config(cfg, actors, bench_on_cuda(cfg))
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        with remote_federation(cfg, Path(tmp)) as federation:
            actors = federation.status["actors"]  # blocks until the driver and its actors are built
            log.info("engine bench: %d client actors ready", actors)
            setup = time.perf_counter() - started
            started = time.perf_counter()
            rows = [federation.run_round(evaluate=False) for _ in range(cfg.federation.rounds)]
            return setup, time.perf_counter() - started, rows


def bench_engine(cfg: ExperimentConfig, out: Path) -> pd.DataFrame:
    plain_setup, plain = _plain_loop(cfg)
    one_setup, one, _ = ray_rounds(cfg, 1)
    two_setup, two, _ = ray_rounds(cfg, 2)
    rounds = cfg.federation.rounds
    return pd.DataFrame(
        [
            {
                "variant": "plain in-process loop",
                "setup_s": plain_setup,
                "rounds_s": plain,
                "s_per_round": plain / rounds,
                "vs_plain": 1.0,
            },
            {
                "variant": "ray engine, 1 actor",
                "setup_s": one_setup,
                "rounds_s": one,
                "s_per_round": one / rounds,
                "vs_plain": one / plain,
            },
            {
                "variant": "ray engine, 2 actors",
                "setup_s": two_setup,
                "rounds_s": two,
                "s_per_round": two / rounds,
                "vs_plain": two / plain,
                "speedup_vs_1_actor": one / two,
            },
        ]
    ).round(3)
