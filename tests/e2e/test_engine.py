"""The Ray engine on a real local cluster: end to end, determinism, resume, faults, API."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

import sylva_ray
from sylva_ray.distributed.launcher import resume, run
from sylva_ray.engine.resolve import load_config
from tests.helpers.event_files import scalars, texts

#: Columns that measure the machine, not the experiment.
TIMING = ["train_seconds", "actor_rss_mb", "actor_pid", "actor_node", "seconds"]


def _cfg(*overrides):
    return load_config("smoke", overrides=["federation.rounds=3", *overrides])


def _metrics(run_dir):
    frame = pd.read_csv(run_dir / "metrics.csv")
    return frame.drop(columns=[c for c in TIMING if c in frame]).sort_values(["round", "client"]).reset_index(drop=True)


@pytest.fixture(scope="module")
def two_actor_run(ray_cluster, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("engine") / "two"
    run_dir.mkdir()
    summary = run(_cfg("runtime.num_actors=2"), run_dir)
    return run_dir, summary


def test_end_to_end_run_directory(two_actor_run):
    run_dir, summary = two_actor_run
    for name in (
        "config.yaml",
        "partition.json",
        "metrics.csv",
        "rounds.csv",
        "summary.json",
        "checkpoints/checkpoint.pt",
    ):
        assert (run_dir / name).is_file(), name
    on_disk = json.loads((run_dir / "summary.json").read_text())
    assert on_disk["final"] == summary["final"]
    for block in ("final", "phase1"):
        assert {"clean_acc", "robust_acc"} <= set(on_disk[block])
    assert {"bytes_up", "bytes_down", "full_model_bytes"} <= set(on_disk["communication"])
    assert len(on_disk["per_client"]) == 4
    metrics = pd.read_csv(run_dir / "metrics.csv")
    assert set(metrics["actor_pid"].dropna().astype(int)) and (metrics["bytes_up"] > 0).all()
    assert summary["final"]["clean_acc"] > summary["sanity"]["majority_rate"]  # it learned something
    assert 0 <= on_disk["initial"]["robust_acc"] <= on_disk["initial"]["clean_acc"] <= 1  # the pre-trained reference

    # live figures: the event files hold what rounds.csv and metrics.csv hold, one step per round
    read = scalars(run_dir / "tb")
    rounds = pd.read_csv(run_dir / "rounds.csv")
    assert read["round/bytes_up"] == [(r + 1, pytest.approx(b)) for r, b in zip(rounds["round"], rounds["bytes_up"])]
    evaluated = rounds.dropna(subset=["clean_acc"])
    assert read["round/clean_acc"] == [
        (r + 1, pytest.approx(a, rel=1e-6)) for r, a in zip(evaluated["round"], evaluated["clean_acc"])
    ]
    client0 = metrics[(metrics["client"] == 0) & metrics["robust_acc"].notna()]
    assert read["client/robust_acc/000"] == [
        (r + 1, pytest.approx(a, rel=1e-6)) for r, a in zip(client0["round"], client0["robust_acc"])
    ]
    assert scalars(run_dir / "tb" / "hparams")["final/clean_acc"][0][1] == pytest.approx(summary["final"]["clean_acc"])
    # what it ran on, the split at a glance, the field's claim format
    environment = json.loads((run_dir / on_disk["environment"]).read_text())
    assert environment["device"] == "cpu" and environment["torch"]["version"] == torch.__version__
    assert environment["cluster"]["nodes"] and environment["packages"]["peft"]
    assert (run_dir / "partition.png").stat().st_size > 0
    assert len(on_disk["partition"]["clients"]) == 4 and 0 < on_disk["partition"]["mean_hellinger"] < 1
    claims = json.loads((run_dir / "robustbench.json").read_text())
    assert claims["comparable_to_robustbench"] is False and claims["not_comparable_because"]
    assert claims["client_mean"]["clean_acc"] == f"{100 * summary['final']['clean_acc']:.2f}"


def test_same_seed_same_results_with_one_actor(two_actor_run, tmp_path):
    run_dir, _ = two_actor_run
    one = tmp_path / "one"
    one.mkdir()
    run(_cfg("runtime.num_actors=1"), one)
    pd.testing.assert_frame_equal(_metrics(run_dir), _metrics(one))
    assert len(set(pd.read_csv(one / "metrics.csv")["actor_pid"].dropna())) == 1
    for cid in range(4):
        a = load_file(str(run_dir / "models" / f"client_{cid:04d}.safetensors"))
        b = load_file(str(one / "models" / f"client_{cid:04d}.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_equals_uninterrupted(two_actor_run, tmp_path):
    run_dir, summary = two_actor_run
    cut = tmp_path / "cut"
    cut.mkdir()
    assert run(_cfg("runtime.num_actors=2"), cut, stop_after=1) is None
    assert len(pd.read_csv(cut / "rounds.csv")) == 1 and not (cut / "summary.json").exists()
    resumed = resume(cut)
    pd.testing.assert_frame_equal(_metrics(run_dir), _metrics(cut))
    # the resumed session continues the same curves, no step twice
    assert scalars(cut / "tb")["round/bytes_up"] == scalars(run_dir / "tb")["round/bytes_up"]
    assert len(json.loads((cut / "environment.json").read_text())["resumed"]) == 1
    assert resumed["final"] == summary["final"]
    assert resume(cut)["final"] == summary["final"]  # a finished run just reports


@pytest.mark.slow
def test_killed_actor_is_restarted_and_client_retried_then_dropped(ray_cluster, tmp_path):
    # round 1: client 0's actor is killed once (retry succeeds); round 2: killed twice (dropped);
    # round 3: client 1's job raises twice (dropped, error recorded)
    from tests.helpers.faults import drill

    faults = drill(kills={(0, 0): 1, (1, 0): 2}, raises={(2, 1): 2})
    summary = run(_cfg("runtime.num_actors=2"), tmp_path, actor_classes=faults)
    metrics = pd.read_csv(tmp_path / "metrics.csv")

    def row(r, c):
        return metrics[(metrics["round"] == r) & (metrics["client"] == c)].iloc[0]

    assert row(0, 0)["attempts"] == 2 and not row(0, 0)["dropped"]
    assert row(1, 0)["attempts"] == 2 and row(1, 0)["dropped"] and "Actor" in row(1, 0)["error"]
    assert row(2, 1)["dropped"] and "InjectedFault" in row(2, 1)["error"]
    assert row(1, 1)["dropped"] == False  # noqa: E712  (the others finished the round)
    assert summary["dropped_client_rounds"] == 2
    assert len(pd.read_csv(tmp_path / "rounds.csv")) == 3


@pytest.mark.slow
def test_round_deadline_drops_stragglers(ray_cluster, tmp_path):
    summary = run(_cfg("federation.rounds=1", "federation.round_timeout_s=0.001", "runtime.num_actors=2"), tmp_path)
    metrics = pd.read_csv(tmp_path / "metrics.csv")
    assert metrics["dropped"].all() and metrics["error"].str.contains("deadline").all()
    assert summary["communication"]["bytes_up"] == 0
    assert 0 <= summary["final"]["clean_acc"] <= 1  # evaluation still ran after the restarts
    assert len(summary["per_client"]) == 4


def test_analysis_api_reproduces_the_summary(two_actor_run):
    run_dir, summary = two_actor_run
    for row in summary["per_client"][:2]:
        model = sylva_ray.load_client_model(run_dir, row["client"])
        test = sylva_ray.load_client_split(run_dir, row["client"], "test")
        with torch.no_grad():
            accuracy = float(np.mean(model(test.pixels()).argmax(1).numpy() == test.labels))
        assert accuracy == pytest.approx(row["clean_acc"], abs=1e-9)
        assert not model.training
    train = sylva_ray.load_client_split(run_dir, 0, "train")
    assert len(train) == summary["per_client"][0]["num_train"]
    with pytest.raises(ValueError, match="split"):
        sylva_ray.load_client_split(run_dir, 0, "validation")
    with pytest.raises(IndexError):
        sylva_ray.load_client_model(run_dir, 99)


def test_phase2_outputs_and_run_phase2_command(two_actor_run):
    from sylva_ray.distributed.launcher import run_phase2

    run_dir, summary = two_actor_run
    assert {"phase1", "phase2", "selected_layers"} <= set(summary)
    assert summary["final"] == summary["phase2"]
    shapley = pd.read_csv(run_dir / "shapley.csv")
    assert len(shapley) == 4 * 4 and set(shapley["method"]) == {"exact"}
    assert (shapley.groupby("client")["selected"].sum() == 2).all()  # top_k = 2
    for name in ("shapley_heatmap.png", "phase2_before_after.png"):
        assert (run_dir / name).is_file()
    assert len(list((run_dir / "models").glob("phase2_client_*.safetensors"))) == 4
    games = pd.read_csv(run_dir / "shapley_games.csv")  # how flat each client's game was
    assert sorted(games["client"]) == [0, 1, 2, 3] and set(games["value"]) == {"ce"}
    assert games["zero_marginal_share"].between(0, 1).all() and (games["validation_samples"] > 0).all()
    assert (games["one_image_points"] == 100 / games["validation_samples"]).all()
    stages = json.loads((run_dir / "summary.json").read_text())["seconds_by_stage"]
    assert set(stages) == {"pretraining", "phase1", "phase2_game", "tailoring", "protocol", "tracking"}
    assert all(stages[k] > 0 for k in ("phase1", "phase2_game", "tailoring", "protocol")) and stages["pretraining"] >= 0

    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}
    out, again = run_phase2(run_dir, ["layer_selection.top_k=1"])
    assert out.parent == run_dir and out.name.startswith("phase2-")
    assert {p: p.stat().st_mtime_ns for p in before} == before  # nothing of the old result rewritten
    added = {p for p in run_dir.rglob("*") if p.is_file() and out not in p.parents} - set(before)
    assert not added, added  # nor anything added to it (its event files included)
    assert (pd.read_csv(out / "shapley.csv").groupby("client")["selected"].sum() == 1).all()
    assert "phase2/shapley" in texts(out / "tb") and (out / "environment.json").is_file()
    assert json.loads((out / "robustbench.json").read_text())["client_mean"]["clean_acc"]
    assert again["phase1"] == summary["phase1"]
    assert again["seconds_by_stage"]["protocol"] > 0
    row = again["per_client"][0]
    model = sylva_ray.load_client_model(out, row["client"])
    test = sylva_ray.load_client_split(out, row["client"], "test")
    with torch.no_grad():
        accuracy = float(np.mean(model(test.pixels()).argmax(1).numpy() == test.labels))
    assert accuracy == pytest.approx(row["clean_acc"], abs=1e-9)
