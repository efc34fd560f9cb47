"""``sylva-ray bench``: figures measured side by side in one run, reported as ratios.

``comm``   serialised bytes of one LoRA upload vs one full-model upload, for the configured model and
           for ViT-B/16 (rank 8 on ``attn.qkv``; ~0.29M vs ~86M parameters).
``engine`` the same Phase-1 training rounds (same model, data, clients, steps, seeds; no evaluation)
           done three ways in one process session: a plain in-process Python loop over one
           ``ClientWorker``, the Ray engine with 1 client actor, and with 2. Each uses one torch
           thread per worker. Setup (model build, actor start) is timed apart from the rounds.
``scale``  1,000 virtual clients at 5% participation on the tiny model: seconds per round and the
           driver's / client actors' resident memory per round (flat = no growth with rounds).
``phase2`` on one Phase-1 run: Phase 2 with 1 and with 2 client actors (speed-up), the Shapley
           choice vs random layers of the same size vs all layers; and ``bench_estimator.csv``:
           Monte Carlo with truncation vs exact Shapley on real 8-player client games.
``memory`` estimated accelerator memory of one client actor (``sylva_ray.method.cost``): activation
           bytes measured on the CPU, scaled to the batch; the given config and the ``paper`` preset.
``clock``  simulated round time (``engine.clock``) of Sylva vs FAT on device mixes, split into compute
           and network, from counted FLOPs and exact bytes, without training
           (``sylva_ray.experiments.clock_bench``); and who makes a deadline.
``startup`` cold start and memory in fresh processes: the plain loop vs the Ray engine with 1 and 2
           client actors; its own module (``sylva_ray.experiments.startup``), which imports no torch.
Every table is also written as CSV under ``--out`` (default ``runs/bench-<which>-<timestamp>``).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from sylva_ray.base.config import ExperimentConfig, LoRAConfig, ModelConfig
from sylva_ray.distributed.launcher import phase2_only, remote_federation, run
from sylva_ray.engine.client import ClientState, ClientWorker
from sylva_ray.engine.federation import sample_participants
from sylva_ray.engine.resolve import build_config, load_config
from sylva_ray.engine.rundir import new_unique_dir, prepare_data, read_json, resolve_result_path, utc_stamp, write_table
from sylva_ray.experiments.clock_bench import bench_clock
from sylva_ray.method.aggregation import aggregate
from sylva_ray.method.cost import algorithm_needs_benign, estimate_actor_memory
from sylva_ray.method.data import load_source, make_partition
from sylva_ray.method.models import (
    _pixel_model,
    add_lora,
    count_parameters,
    create_backbone,
    encode_state,
    full_model_nbytes,
    shared_state,
)
from sylva_ray.method.shapley import (
    exact_shapley,
    permutation_shapley,
    solve,
    spearman,
)

log = logging.getLogger(__name__)

#: The paper-scale reference point: ViT-B/16, LoRA rank 8 on the fused qkv.
VIT_B16 = ("vit_base_patch16_224", LoRAConfig(rank=8, target_modules=["attn.qkv"]))
#: The scale benchmark's shape (issue 3): 1,000 virtual clients, 5% of them per round.
SCALE_CLIENTS, SCALE_PARTICIPATION = 1000, 0.05


def communication_row(model_cfg: ModelConfig, lora_cfg: LoRAConfig, num_classes: int) -> dict[str, object]:
    blank = dataclasses.replace(model_cfg, pretrained="none")
    base = _pixel_model(create_backbone(blank, num_classes), blank)
    full = full_model_nbytes(base)
    model = add_lora(base, lora_cfg)
    adapter = len(encode_state(shared_state(model)))
    params = count_parameters(model)
    return {
        "model": model_cfg.name,
        "lora": f"r{lora_cfg.rank} on {','.join(lora_cfg.target_modules)}",
        "lora_params": params["shared"],
        "head_params": params["personal"],
        "adapter_bytes": adapter,
        "full_model_bytes": full,
        "full_over_adapter": round(full / adapter, 1),
    }


def bench_comm(cfg: ExperimentConfig, out: Path) -> pd.DataFrame:
    name, lora = VIT_B16
    return pd.DataFrame(
        [
            communication_row(cfg.model, cfg.lora, 10),
            communication_row(ModelConfig(name=name, pretrained="none"), lora, 10),
        ]
    )


def _plain_loop(cfg: ExperimentConfig) -> tuple[float, float]:
    """The reference: Phase-1 rounds as a plain loop in this process (setup s, rounds s)."""
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


def _engine(cfg: ExperimentConfig, actors: int) -> tuple[float, float, list[dict]]:
    """The same rounds through the Ray engine with ``actors`` client actors (setup s, rounds s, per-round rows)."""
    cfg = build_config(
        {**cfg.to_dict(), "runtime": {**cfg.to_dict()["runtime"], "num_actors": actors, "torch_threads": 1}}
    )
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
    one_setup, one, _ = _engine(cfg, 1)
    two_setup, two, _ = _engine(cfg, 2)
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


def bench_scale(cfg: ExperimentConfig, out: Path) -> pd.DataFrame:
    """1,000 virtual clients, 5% per round, synthetic 8x8 data, the tiny ViT, 2 local steps."""
    base = cfg.to_dict()
    base["data"].update(
        name="synthetic",
        num_clients=SCALE_CLIENTS,
        partition="iid",
        synthetic_num_samples=20000,
        min_samples_per_client=10,
        max_samples=None,
    )
    base["model"].update(pretrain_epochs=5)
    base["federation"].update(participation=SCALE_PARTICIPATION)
    base["train"].update(local_steps=2)
    base["attack"].update(train_steps=2)
    scale_cfg = build_config(base)
    _, seconds, rows = _engine(scale_cfg, actors=scale_cfg.runtime.num_actors or 2)
    frame = pd.DataFrame(rows)[["round", "participants", "seconds", "driver_rss_mb", "actor_rss_mb_max"]]
    frame["round"] += 1
    log.info("scale: %d rounds in %.1fs", len(rows), seconds)
    return frame.round(2)


#: Estimator-quality study (issue 4): 8 players = LoRA on qkv and fc1 of the 4 blocks, modules granularity.
ESTIMATOR_TARGETS, ESTIMATOR_CLIENTS, ESTIMATOR_SEEDS = ["attn.qkv", "mlp.fc1"], (0, 1, 2), 5
#: Stopping tolerances on the standard error swept in the estimator study (cost vs quality).
ESTIMATOR_TOLERANCES = (0.01, 0.005, 0.0025)


def _with(cfg: ExperimentConfig, **sections: dict) -> ExperimentConfig:
    raw = cfg.to_dict()
    for section, values in sections.items():
        raw[section] = {**raw[section], **values}
    return build_config(raw)


def bench_estimator(cfg: ExperimentConfig) -> pd.DataFrame:
    """Monte Carlo (antithetic, truncated) vs exact Shapley on real 8-player client games.

    The exact game is evaluated once per client (all 256 coalitions); each Monte Carlo run then
    replays those values (they are deterministic: same fused start, seed and adversarial start), so
    its cost is the number of distinct coalitions it asked for.
    """
    game_cfg = _with(cfg, lora={"target_modules": ESTIMATOR_TARGETS}, layer_selection={"players": "modules"})
    source = load_source(game_cfg.data)
    worker = ClientWorker(game_cfg, source, make_partition(source, game_cfg.data, game_cfg.runtime.seed))
    sel = game_cfg.layer_selection
    rows = []
    for client in ESTIMATOR_CLIENTS:
        game = worker.game(client, worker.initial_state(), worker.initial_adapter, "initial")
        started = time.perf_counter()
        exact = solve(exact_shapley(len(game.players)), lambda mask, game=game: game.value(mask).value)
        exact_s = time.perf_counter() - started
        table = exact.coalition_values
        for tolerance, seed in itertools.product(ESTIMATOR_TOLERANCES, range(ESTIMATOR_SEEDS)):
            mc = solve(
                permutation_shapley(
                    len(game.players),
                    np.random.default_rng(seed),
                    sel.max_evaluations,
                    tolerance,
                    sel.truncation_tolerance,
                    sel.permutations_per_batch,
                ),
                table.__getitem__,
            )
            rows.append(
                {
                    "client": client,
                    "players": len(game.players),
                    "stderr_tolerance": tolerance,
                    "mc_seed": seed,
                    "exact_evaluations": exact.evaluations,
                    "mc_evaluations": mc.evaluations,
                    "share_of_exact": mc.evaluations / exact.evaluations,
                    "spearman": spearman(mc.values, exact.values),
                    "max_abs_error": float(np.max(np.abs(mc.values - exact.values))),
                    "mean_stderr": float(np.mean(mc.stderr)),
                    "exact_seconds": exact_s,
                }
            )
    return pd.DataFrame(rows).round(4)


def bench_phase2(cfg: ExperimentConfig, out: Path) -> pd.DataFrame:
    """Phase 2 figures on one Phase-1 run of ``cfg``: speed-up with 2 workers vs 1, and the Shapley
    selection vs random layers of the same size vs all layers (same Phase-1 model, seeds, attack).
    Also writes ``bench_estimator.csv`` (Monte Carlo vs exact on 8-player games)."""
    phase1_dir = out / "phase1"
    phase1_dir.mkdir(parents=True, exist_ok=True)
    # Timing Phase 2 itself: the final-model protocol (AutoAttack, sanity attacks) is left out here.
    run(
        _with(cfg, layer_selection={"enabled": False}, evaluation={"autoattack": False, "sanity_checks": False}),
        phase1_dir,
    )
    rows = []
    for label, overrides in [
        ("shapley top-k, 1 actor", ["runtime.num_actors=1"]),
        ("shapley top-k, 2 actors", ["runtime.num_actors=2"]),
        ("random layers, same k", ["runtime.num_actors=2", "layer_selection.selection=random"]),
        ("all layers", ["runtime.num_actors=2", "layer_selection.selection=all"]),
    ]:
        result_dir, summary = phase2_only(phase1_dir, overrides)
        rows.append(
            {
                "variant": label,
                "clean_acc": summary["phase2"]["clean_acc"],
                "robust_acc": summary["phase2"]["robust_acc"],
                "evaluations": summary["evaluations"],
                "seconds": summary["seconds"],
                "result": result_dir.name,
            }
        )
    phase1 = read_json(phase1_dir / "summary.json")["phase1"]
    rows.insert(0, {"variant": "after Phase 1", "clean_acc": phase1["clean_acc"], "robust_acc": phase1["robust_acc"]})
    frame = pd.DataFrame(rows)
    frame["speedup_2_vs_1"] = np.nan
    frame.loc[frame["variant"] == "shapley top-k, 2 actors", "speedup_2_vs_1"] = float(
        frame.loc[frame["variant"] == "shapley top-k, 1 actor", "seconds"].iloc[0]
        / frame.loc[frame["variant"] == "shapley top-k, 2 actors", "seconds"].iloc[0]
    )
    write_table(out / "bench_estimator.csv", bench_estimator(cfg))
    return frame.round(4)


#: Image shape and classes of the datasets whose files may not be on this machine (``bench memory``).
KNOWN_INPUTS = {"cifar10": ((3, 32, 32), 10), "cifar100": ((3, 32, 32), 100)}
#: The ``paper`` preset's alternatives the memory table sets side by side: (train batch, eval batch, precision).
PAPER_MEMORY_VARIANTS = [(64, 256, "fp32"), (64, 128, "fp32"), (32, 64, "fp32"), (32, 64, "bf16")]


def bench_memory(cfg: ExperimentConfig, out: Path) -> pd.DataFrame:
    """Estimated accelerator memory per client actor (``sylva_ray.method.cost``): the configuration
    given, then the ``paper`` preset and the batch/precision alternatives around it."""

    def inputs(c: ExperimentConfig) -> tuple[tuple[int, int, int], int]:
        if c.data.name in KNOWN_INPUTS:
            return KNOWN_INPUTS[c.data.name]
        source = load_source(c.data)
        return source.image_shape, source.num_classes

    needs_benign = algorithm_needs_benign(cfg)
    rows = [{"config": "given", **estimate_actor_memory(cfg, *inputs(cfg), needs_benign=needs_benign)}]
    for train_batch, eval_batch, precision in PAPER_MEMORY_VARIANTS:
        paper = load_config(
            "paper",
            overrides=[
                f"train.batch_size={train_batch}",
                f"train.eval_batch_size={eval_batch}",
                f"runtime.precision={precision}",
            ],
            check_paths=False,
        )
        rows.append({"config": "paper", **estimate_actor_memory(paper, *inputs(paper), needs_benign=True)})
    return pd.DataFrame(rows)


BENCHES = {
    "comm": bench_comm,
    "engine": bench_engine,
    "scale": bench_scale,
    "phase2": bench_phase2,
    "memory": bench_memory,
    "clock": bench_clock,
}


def run_bench(which: str, cfg: ExperimentConfig, out: Path | None = None) -> pd.DataFrame:
    if out is None:
        out = new_unique_dir(resolve_result_path(cfg.output.root), f"bench-{which}-{utc_stamp()}")
    else:
        out = resolve_result_path(out)
        out.mkdir(parents=True, exist_ok=True)
    frame = BENCHES[which](cfg, out)
    write_table(out / f"bench_{which}.csv", frame)
    log.info("bench %s written to %s", which, out / f"bench_{which}.csv")
    return frame
