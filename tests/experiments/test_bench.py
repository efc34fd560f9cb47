"""The benchmarks run (no timing thresholds: only that they measure what they say)."""

import numpy as np
import pandas as pd
import pytest

from sylva_ray.engine.resolve import load_config
from sylva_ray.engine.rundir import read_json
from sylva_ray.experiments.bench import run_bench
from sylva_ray.experiments.bench.phase2 import PHASE2_VARIANTS


def test_comm_bench_counts_real_bytes(tmp_path):
    frame = run_bench("comm", load_config("smoke"), tmp_path)
    assert list(frame["model"]) == ["vit_pico_patch4_16", "vit_base_patch16_224"]
    vit_b = frame.iloc[1]
    assert vit_b["lora_params"] == 12 * 8 * (768 + 2304)  # 12 blocks x r8 x (in + out) of attn.qkv
    assert vit_b["adapter_bytes"] >= 4 * vit_b["lora_params"]
    assert vit_b["full_over_adapter"] > 200
    assert (tmp_path / "bench_comm.csv").is_file()


@pytest.mark.slow
def test_engine_bench_runs_three_variants_side_by_side(ray_cluster, tmp_path):
    frame = run_bench("engine", load_config("smoke", overrides=["federation.rounds=1"]), tmp_path)
    assert list(frame["variant"]) == ["plain in-process loop", "ray engine, 1 actor", "ray engine, 2 actors"]
    assert (frame["rounds_s"] > 0).all() and frame["vs_plain"].iloc[0] == 1.0
    assert pd.read_csv(tmp_path / "bench_engine.csv").shape[0] == 3


def test_clock_bench_costs_sylva_and_fat_on_every_mix(tmp_path):
    from sylva_ray.experiments.bench.clock import MIXES

    frame = run_bench("clock", load_config("smoke"), tmp_path)
    assert set(frame["algorithm"]) == {"sylva", "fat"} and set(frame["mix"]) == set(MIXES)
    sylva, fat = (frame[frame["algorithm"] == a] for a in ("sylva", "fat"))
    assert (sylva["round_vs_sylva"] == 1.0).all()
    assert (fat["bytes_each_way"] > 10 * sylva["bytes_each_way"].max()).all()  # the full model vs the adapter
    for _, group in frame.groupby(["algorithm", "mix"]):
        assert group["round_s"].iloc[0] >= group["total_s"].max()  # the slowest client is at least its profile's mean
        assert np.allclose(group["total_s"], group["compute_s"] + group["download_s"] + group["upload_s"])
    deadline = pd.read_csv(tmp_path / "bench_clock_deadline.csv")
    assert (deadline["straggler"] == (deadline["sim_total_s"] > deadline["deadline_s"])).all()
    assert deadline.groupby("deadline_quantile")["straggler"].sum().is_monotonic_decreasing


def test_phase2_bench_sets_every_variant_beside_phase1(tmp_path):
    """Seven Phase-2 variants on one Phase-1 run; "phase 1 only" is the fused model untouched, so its
    figures are Phase 1's own (the merged model scores as the adapter-carrying one did)."""
    cfg = load_config(
        "smoke",
        overrides=[
            "runtime.engine=inprocess",
            "federation.rounds=1",
            "layer_selection.coalition_steps=1",
            "layer_selection.finetune_steps=2",
            "evaluation.autoattack=false",
            "evaluation.sanity_checks=false",
        ],
    )
    frame = run_bench("phase2", cfg, tmp_path)
    assert list(frame["variant"]) == [label for label, _ in PHASE2_VARIANTS]
    phase1 = read_json(tmp_path / "phase1" / "summary.json")["phase1"]
    reference = frame.set_index("variant").loc["phase 1 only"]
    assert reference["clean_acc"] == pytest.approx(phase1["clean_acc"], abs=1e-4)
    assert reference["robust_acc"] == pytest.approx(phase1["robust_acc"], abs=1e-4)
    assert reference["v_minus_phase1"] == 0 and reference["evaluations"] == 0
    games = frame[frame["variant"].str.startswith("shapley")]
    assert (games["evaluations"] == 4 * 16).all() and (games["game_seconds"] > 0).all()
    clients = pd.read_csv(tmp_path / "bench_phase2_clients.csv")
    assert len(clients) == 4 * len(PHASE2_VARIANTS)


def test_estimator_bench_replays_exact_games(tmp_path, monkeypatch):
    """The estimator table's arithmetic on two known 8-player games (the real games' exhaustive
    evaluation is what ``exhaustive_games`` adds; it is the layer game tested elsewhere)."""
    from sylva_ray.experiments.bench import estimator as bench

    rng = np.random.default_rng(0)

    def figures(mask):
        bits = [(mask >> i) & 1 for i in range(8)]
        score = float(np.dot(bits, np.linspace(0.1, 0.8, 8)))
        return {
            "clean_acc": round(0.5 + score / 10, 1),  # an accuracy moves in steps: ties
            "robust_acc": 0.3,
            "clean_loss": 1.0 - score / 5 + rng.normal(scale=1e-3),
            "robust_loss": 2.0 - score / 5,
        }

    tables = {client: {mask: figures(mask) for mask in range(256)} for client in (0, 1)}
    monkeypatch.setattr(bench, "exhaustive_games", lambda cfg, clients: (8, tables))
    monkeypatch.setattr(bench, "ESTIMATOR_BUDGETS", (64,))
    monkeypatch.setattr(bench, "ESTIMATOR_SEEDS", 2)
    frame = run_bench("estimator", load_config("smoke"), tmp_path)
    ours = frame[(frame["value"] == "ce") & (frame["estimator"] == "antithetic")].iloc[0]
    assert ours["spearman"] > 0.9 and ours["within_2_stderr"] > 0
    assert set(frame["estimator"]) == {"antithetic", *bench.ESTIMATORS}
    games = pd.read_csv(tmp_path / "bench_estimator_games.csv").set_index(["client", "value"])
    assert games.loc[(0, "ce"), "zero_marginal_share"] == 0.0
    assert games.loc[(0, "linear"), "zero_marginal_share"] > 0.3  # the stepped accuracy game is flatter


def test_autoattack_bench_records_every_pass_without_changing_the_attack(tmp_path):
    """The recorder only watches: the reference AutoAttack it wraps gives the same accuracy as the
    protocol's own call on the same model, images and seed; every pass lands in one stage row, and
    the plain loop replays all of them."""
    import torch

    from sylva_ray.base.seeding import derive_seed
    from sylva_ray.engine.client import ClientWorker
    from sylva_ray.experiments.bench.autoattack import SUB_ATTACKS
    from sylva_ray.method.attacks import REFERENCE_TARGETS
    from sylva_ray.method.data import load_source, make_partition
    from sylva_ray.method.evaluation import reference_autoattack_hits
    from sylva_ray.method.layer_selection import fuse
    from sylva_ray.method.pretrained import torch_threads

    cfg = load_config("smoke")
    frame = run_bench("autoattack", cfg, tmp_path).set_index("stage")
    assert (tmp_path / "bench_autoattack.csv").is_file()
    whole = frame.loc["all of AutoAttack"]
    parts = frame.drop(index="all of AutoAttack")
    assert set(parts.index) <= {*SUB_ATTACKS.values(), "accuracy checks"} and "APGD-CE" in parts.index
    assert parts["passes"].sum() == whole["passes"] and parts["images_forward"].sum() == whole["images_forward"]
    assert (frame["images_gradient"] <= frame["images_forward"]).all()
    # Counts the hook must have seen, from the attacks' own loops: APGD takes an input gradient at
    # every one of its iterations, APGD-T once per iteration and target class.
    steps = cfg.attack.autoattack_steps
    assert parts.loc["APGD-CE", "images_gradient"] >= steps and parts.loc["APGD-CE", "passes"] > steps
    if "APGD-T" in parts.index:
        assert parts.loc["APGD-T", "images_gradient"] >= steps * REFERENCE_TARGETS  # digits: 10 classes, 9 targets
    assert (frame["plain_loop_seconds"] > 0).all() and (frame["gemm_gflop_per_s"] > 0).all()
    assert not bool(whole["reference_strength"])  # smoke's AutoAttack is the quick one, and the table says so

    source = load_source(cfg.data)
    worker = ClientWorker(cfg, source, make_partition(source, cfg.data, cfg.runtime.seed))
    client = int(whole["client"])
    test = worker.data(client).test
    n = int(whole["images"])
    assert n == min(cfg.evaluation.autoattack_max_samples, max(len(worker.data(c).test) for c in range(4)))
    model = fuse(worker.model, worker.initial_adapter, worker.initial_personal)
    with torch_threads(1):  # as the bench runs it
        hits = reference_autoattack_hits(
            model,
            cfg.attack,
            test.pixels(slice(0, n)),
            torch.from_numpy(test.labels[:n]),
            test.num_classes,
            derive_seed(derive_seed(cfg.runtime.seed, "eval", client), "autoattack"),
            cfg.train.eval_batch_size,
        )
    assert whole["autoattack_acc"] == pytest.approx(float(hits.float().mean()), abs=1e-4)


def test_bench_data_loads_a_folder_three_ways_and_checks_the_pixels_agree(tmp_path):
    from sylva_ray.experiments.bench import run_bench
    from tests.method.test_data import _write_folder

    _write_folder(tmp_path / "images")
    cfg = load_config(
        "smoke",
        overrides=[
            "data.name=imagefolder",
            f"data.root={tmp_path / 'images'}",
            "data.image_size=12",
            "model.pretrained=none",
        ],
    )
    frame = run_bench("data", cfg, tmp_path / "out")
    assert frame["variant"].tolist()[0].startswith("float32") and len(frame) == 4
    assert frame["same_pixels_as_first"].all() and (frame["images"] == 9).all()
    assert frame.loc[frame["dtype"] == "uint8", "pool_vs_first"].eq(0.25).all()  # a quarter of float32's bytes
    assert (tmp_path / "out" / "bench_data.csv").is_file()
