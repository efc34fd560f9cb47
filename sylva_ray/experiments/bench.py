"""``sylva-ray bench``: figures measured side by side in one run, reported as ratios.

``comm``   serialised bytes of one LoRA upload vs one full-model upload, for the configured model and
           for ViT-B/16 (rank 8 on ``attn.qkv``; ~0.29M vs ~86M parameters).
``engine`` the same Phase-1 training rounds (same model, data, clients, steps, seeds; no evaluation)
           done three ways in one process session: a plain in-process Python loop over one
           ``ClientWorker``, the Ray engine with 1 client actor, and with 2. Each uses one torch
           thread per worker. Setup (model build, actor start) is timed apart from the rounds.
``scale``  1,000 virtual clients at 5% participation on the tiny model: seconds per round and the
           driver's / client actors' resident memory per round (flat = no growth with rounds).
``phase2`` on one Phase-1 run: Phase 1 only, head only, Shapley top-k, random k, last k, all layers,
           each scored by the final protocol; v = clean + robust and the game's cost.
``estimator`` shapiq's approximators vs exact Shapley values on real 8-player client games at equal
           budgets (rank correlation, top-k agreement, error, standard-error coverage), for the
           ce and the accuracy value function, and how flat each game is.
``memory`` estimated accelerator memory of one client actor (``sylva_ray.method.cost``): activation
           bytes measured on the CPU, scaled to the batch; the given config and the ``paper`` preset.
``clock``  simulated round time (``engine.clock``) of Sylva vs FAT on device mixes, split into compute
           and network, from counted FLOPs and exact bytes, without training
           (``sylva_ray.experiments.clock_bench``); and who makes a deadline.
``autoattack`` the reference AutoAttack on the subset of the client with the most AutoAttack images, every
           model pass recorded, against a plain loop replaying the same passes and against this core's
           GEMM rate: how much of the final protocol's time is the model's own compute
           (``sylva_ray.experiments.autoattack_bench``).
``data``   an image source (ImageFolder, Hugging Face on disk) loaded three ways: torchvision's float32
           loader image by image (before), the uint8 parallel loader, and from its cache
           (``sylva_ray.experiments.data_bench``): seconds, pool bytes, peak traced memory.
``tracking`` the same run with TensorBoard tracking off and on, alternately: wall seconds, the tracker's own
           seconds and its event files' bytes (``sylva_ray.experiments.tracking_bench``).
``pretrain`` embedded pre-training of the default pico ViT and of its 8-block variant on the public slice,
           one after the other into a fresh cache: seconds, parameters, the ratio.
``transfer`` the final protocol on the same tailored models with the transfer attacks off and on,
           alternately: its seconds and the ratio (``sylva_ray.experiments.transfer_bench``).
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
from typing import Optional, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from sylva_ray.base.config import ExperimentConfig, LoRAConfig, ModelConfig
from sylva_ray.distributed.launcher import phase2_only, remote_federation, run
from sylva_ray.engine.client import ClientState, ClientWorker
from sylva_ray.engine.federation import sample_participants
from sylva_ray.engine.resolve import build_config, load_config
from sylva_ray.engine.rundir import new_unique_dir, prepare_data, resolve_result_path, utc_stamp, write_table
from sylva_ray.engine.tracking import log_table
from sylva_ray.experiments.autoattack_bench import bench_autoattack
from sylva_ray.experiments.clock_bench import bench_clock
from sylva_ray.experiments.data_bench import bench_data
from sylva_ray.experiments.tracking_bench import bench_tracking
from sylva_ray.experiments.transfer_bench import bench_transfer
from sylva_ray.method.aggregation import aggregate
from sylva_ray.method.cost import algorithm_needs_benign, estimate_actor_memory
from sylva_ray.method.data import load_source, make_partition
from sylva_ray.method.layer_selection import coalition_value
from sylva_ray.method.models import (
    _pixel_model,
    add_lora,
    count_parameters,
    create_backbone,
    embedded_weights,
    encode_state,
    full_model_nbytes,
    resolve_device,
    shared_state,
)
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


def _engine(cfg: ExperimentConfig, actors: int) -> tuple[float, float, list[dict]]:
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


def _with(cfg: ExperimentConfig, **sections: dict) -> ExperimentConfig:
    raw = cfg.to_dict()
    for section, values in sections.items():
        raw[section] = {**raw[section], **values}
    return build_config(raw)


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
    game_cfg = _with(cfg, lora={"target_modules": ESTIMATOR_TARGETS}, layer_selection={"players": "modules"})
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


#: ``bench phase2``'s variants: (label, overrides on the finished Phase-1 run). Phase 1 only is
#: the fused model untouched, scored by the same protocol as the others.
PHASE2_VARIANTS = [
    ("phase 1 only", ["layer_selection.selection=none"]),
    ("head only", ["layer_selection.selection=head"]),
    ("shapley top-k", ["layer_selection.selection=top_k"]),
    ("shapley top-k, accuracy value", ["layer_selection.selection=top_k", "layer_selection.value=linear"]),
    ("random k", ["layer_selection.selection=random"]),
    ("last k", ["layer_selection.selection=last"]),
    ("all layers", ["layer_selection.selection=all"]),
]
#: Per-client figures ``bench phase2`` reports (client means), when the protocol produced them.
PHASE2_FIGURES = ("clean_acc", "robust_acc", "autoattack_acc", "strongest_attack_acc")


def bench_phase2(cfg: ExperimentConfig, out: Path) -> pd.DataFrame:
    """Does the layer game pay? On one Phase-1 run of ``cfg``: Phase 1 only, head only, Shapley
    top-k, random k, last k and all layers, each tailored from the same fused model and scored by
    the same final protocol on each client's test split; v = clean + robust (PGD), the game's cost
    in seconds and coalition evaluations, and ``bench_phase2_clients.csv`` client by client."""
    phase1_dir = out / "phase1"
    phase1_dir.mkdir(parents=True, exist_ok=True)
    # Phase 1 without its own protocol: the "phase 1 only" variant scores the same model with it.
    run(
        _with(
            cfg,
            layer_selection={"enabled": False},
            evaluation={"autoattack": False, "sanity_checks": False, "transfer": []},
        ),
        phase1_dir,
    )
    protocol = [
        f"evaluation.autoattack={str(cfg.evaluation.autoattack).lower()}",
        f"evaluation.sanity_checks={str(cfg.evaluation.sanity_checks).lower()}",
        "evaluation.transfer=[" + ",".join(cfg.evaluation.transfer) + "]",
    ]
    rows, clients = [], []
    for label, overrides in PHASE2_VARIANTS:
        result_dir, summary = phase2_only(phase1_dir, overrides + protocol)
        stages = summary["seconds_by_stage"]
        means = summary["phase2"]
        rows.append(
            {
                "variant": label,
                **{k: means[k] for k in PHASE2_FIGURES if k in means},
                "v": means["clean_acc"] + means["robust_acc"],
                "evaluations": summary["evaluations"],
                "game_seconds": stages["phase2_game"],
                "tailoring_seconds": stages["tailoring"],
                "protocol_seconds": stages["protocol"],
                "result": result_dir.name,
            }
        )
        for row in summary["per_client"]:
            clients.append({"variant": label, "client": row["client"], **{k: row.get(k) for k in PHASE2_FIGURES}})
    frame = pd.DataFrame(rows)
    reference = float(frame.loc[frame["variant"] == "phase 1 only", "v"].iloc[0])
    frame["v_minus_phase1"] = frame["v"] - reference
    write_table(out / "bench_phase2_clients.csv", pd.DataFrame(clients))
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


#: ``bench pretrain``'s backbones: the embedded default and its deep variant (``method.timm_models``).
PRETRAIN_MODELS = ("vit_pico_patch4_16", "vit_pico_deep_patch4_16")


def bench_pretrain(cfg: ExperimentConfig, out: Path) -> pd.DataFrame:
    """Embedded pre-training of each pico ViT on the configuration's public slice, into a fresh
    cache (nothing reused), one after the other in this process: seconds, parameters, ratio to the
    first, and the pre-trained model's clean accuracy on the first client's test split."""
    source = load_source(cfg.data)
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        for name in PRETRAIN_MODELS:
            model_cfg = dataclasses.replace(cfg.model, name=name, cache_dir=cache, pretrained="embedded")
            started = time.perf_counter()
            state = embedded_weights(model_cfg, cfg.data, source, seed=0)
            seconds = time.perf_counter() - started
            trial = dataclasses.replace(cfg, model=model_cfg)
            worker = ClientWorker(trial, source, make_partition(source, cfg.data, cfg.runtime.seed), state)
            clean = worker.evaluate(0, worker.initial_state(), worker.initial_adapter).clean_acc
            rows.append(
                {
                    "model": name,
                    "blocks": len(worker.player_names()),
                    "parameters": int(sum(v.numel() for v in state.values())),
                    "public_samples": len(source.public) if source.public is not None else 0,
                    "epochs": model_cfg.pretrain_epochs,
                    "threads": torch.get_num_threads(),
                    "seconds": seconds,
                    "client0_clean_acc": clean,
                }
            )
    frame = pd.DataFrame(rows)
    frame["seconds_vs_first"] = frame["seconds"] / frame["seconds"].iloc[0]
    return frame


BENCHES = {
    "comm": bench_comm,
    "engine": bench_engine,
    "scale": bench_scale,
    "phase2": bench_phase2,
    "estimator": bench_estimator,
    "memory": bench_memory,
    "clock": bench_clock,
    "autoattack": bench_autoattack,
    "data": bench_data,
    "tracking": bench_tracking,
    "pretrain": bench_pretrain,
    "transfer": bench_transfer,
}


def run_bench(which: str, cfg: ExperimentConfig, out: Path | None = None, **options: object) -> pd.DataFrame:
    """Run one bench into ``out`` (a new folder by default); ``options`` go to the bench (``run_dir``
    for ``autoattack``)."""
    if out is None:
        out = new_unique_dir(resolve_result_path(cfg.output.root), f"bench-{which}-{utc_stamp()}")
    else:
        out = resolve_result_path(out)
        out.mkdir(parents=True, exist_ok=True)
    frame = BENCHES[which](cfg, out, **options)
    write_table(out / f"bench_{which}.csv", frame)
    log_table(out, f"bench_{which}", frame)
    log.info("bench %s written to %s", which, out / f"bench_{which}.csv")
    return frame
