"""Live tracking, the environment record, the partition view and the RobustBench claims, unit by unit
(the runs that write them are checked in test_engine.py)."""

import importlib.util
import json
import logging
from fractions import Fraction

import numpy as np
import pandas as pd
import pytest

from sylva_ray.cli import main
from sylva_ray.engine.environment import (
    ENVIRONMENT_FILE,
    environment_record,
    read_environment,
    repeat_differences,
    write_environment,
)
from sylva_ray.engine.resolve import load_config
from sylva_ray.engine.robustbench import eps_fraction, not_comparable_reasons, robustbench_record
from sylva_ray.engine.tracking import TENSORBOARD_DIR, RunTracker, log_table
from sylva_ray.method.heterogeneity import heterogeneity
from tests.helpers.event_files import scalars, texts

HAS_MLFLOW = importlib.util.find_spec("mlflow") is not None


def _round(r, clean):
    summary = {"round": r, "participants": 2, "dropped": 0, "bytes_up": 100 + r, "seconds": 0.5, "clean_acc": clean}
    rows = [
        {"round": r, "client": c, "clean_acc": clean + c / 10, "agg_weight": 0.5, "bytes_up": 50, "dropped": False}
        for c in range(2)
    ]
    return summary, rows


def _one_round_session(cfg, run_dir, caplog):
    """A whole tracked session of one round, its warnings captured."""
    with caplog.at_level(logging.WARNING):
        tracker = RunTracker(cfg, run_dir)
        tracker.log_round(*_round(0, 0.5))
        tracker.finish({"final": {"clean_acc": 0.5}})
        tracker.publish()
    return tracker


def test_rounds_and_clients_read_back_and_a_resume_purges_the_round_it_repeats(tmp_path):
    cfg = load_config("smoke")
    tracker = RunTracker(cfg, tmp_path)
    # A round is logged, then checkpointed: this session logged round 3 and died before its checkpoint.
    for r, clean in enumerate((0.1, 0.2, 0.3)):
        tracker.log_round(*_round(r, clean))
    tracker.close()
    resumed = RunTracker(cfg, tmp_path, first_round=2)  # the checkpoint holds 2 rounds
    for r, clean in ((2, 0.35), (3, 0.4)):
        resumed.log_round(*_round(r, clean))
    resumed.close()
    read = scalars(tmp_path / TENSORBOARD_DIR)
    # TensorBoard keeps float32: the values as logged, to float32 precision; round 3 is the resumed one
    assert read["round/clean_acc"] == [(s, pytest.approx(v)) for s, v in ((1, 0.1), (2, 0.2), (3, 0.35), (4, 0.4))]
    assert [step for step, _ in read["round/bytes_up"]] == [1, 2, 3, 4]
    assert read["client/clean_acc/001"][-1] == (4, pytest.approx(0.5))
    assert {"client/agg_weight/000", "round/dropped", "round/seconds"} <= set(read)
    assert "round/round" not in read  # the step, not a figure
    assert tracker.seconds > 0


def test_finish_writes_plots_hparams_and_phase2_text(tmp_path):
    from matplotlib import pyplot

    cfg = load_config("smoke")
    fig, ax = pyplot.subplots()
    ax.plot([0, 1])
    fig.savefig(tmp_path / "accuracy.png")
    pd.DataFrame(
        [
            {"client": 0, "layer": "blocks.0", "value": 0.2, "stderr": 0.0, "selected": True},
            {"client": 0, "layer": "blocks.1", "value": -0.1, "stderr": 0.0, "selected": False},
        ]
    ).to_csv(tmp_path / "shapley.csv", index=False)
    tracker = RunTracker(cfg, tmp_path)
    tracker.log_phase2({"means": {"clean_acc": 0.9}, "selected": {"0": ["blocks.0"]}}, tmp_path)
    tracker.finish({"final": {"clean_acc": 0.9, "robust_acc": 0.5}})
    tracker.publish()
    after = cfg.federation.rounds + 1  # Phase 2 and the end come after the last round
    logdir = tmp_path / TENSORBOARD_DIR
    text = texts(logdir)
    assert "**0.2000 ± 0.0000**" in text["phase2/shapley"] and "blocks.1" in text["phase2/shapley"]
    assert "client 0: blocks.0" in text["phase2/selected_layers"]
    assert scalars(logdir)["phase2/clean_acc"] == [(after, pytest.approx(0.9))]
    from tests.helpers.event_files import load

    assert load(logdir).Tags()["images"] == ["plots/accuracy"]
    hparams = scalars(logdir / "hparams")
    assert hparams["final/robust_acc"] == [(after, pytest.approx(0.5))]


def test_tensorboard_off_writes_no_event_files(tmp_path):
    cfg = load_config("smoke", overrides=["tracking.tensorboard=false"])
    tracker = RunTracker(cfg, tmp_path)
    tracker.log_round(*_round(0, 0.5))
    tracker.finish({"final": {}})
    tracker.publish()
    assert not (tmp_path / TENSORBOARD_DIR).exists()


def test_a_failing_tensorboard_is_one_warning_and_the_run_goes_on(tmp_path, caplog):
    (tmp_path / TENSORBOARD_DIR).write_text("a file where the event folder should be")
    tracker = _one_round_session(load_config("smoke"), tmp_path, caplog)
    assert tracker.writer is None
    assert len([r for r in caplog.records if "TensorBoard tracking failed" in r.message]) == 1


def test_a_bench_table_becomes_figures_over_its_rows(tmp_path):
    log_table(tmp_path, "bench_x", pd.DataFrame({"variant": ["a", "b"], "seconds": [1.0, 3.0]}))
    assert scalars(tmp_path / TENSORBOARD_DIR)["bench_x/seconds"] == [(0, 1.0), (1, 3.0)]
    assert "variant" in texts(tmp_path / TENSORBOARD_DIR)["bench_x"]


@pytest.mark.skipif(HAS_MLFLOW, reason="checks the run without MLflow installed")
def test_mlflow_asked_for_but_not_installed_is_one_warning(tmp_path, caplog):
    cfg = load_config("smoke", overrides=[f"tracking.mlflow_uri=file://{tmp_path}/mlruns"])
    tracker = _one_round_session(cfg, tmp_path, caplog)
    assert [r.message for r in caplog.records if "MLflow" in r.message] and tracker.mlflow is None
    assert scalars(tmp_path / TENSORBOARD_DIR)["round/clean_acc"] == [(1, 0.5)]


@pytest.mark.skipif(not HAS_MLFLOW, reason="MLflow is an opt-in, not installed here")
def test_mlflow_gets_metrics_params_and_files_and_a_resume_continues_its_run(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the local file store behind this
    uri = f"file://{tmp_path}/mlruns"
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "rounds.csv").write_text("round\n0\n")
    cfg = load_config("smoke", overrides=[f"tracking.mlflow_uri={uri}", "tracking.mlflow_experiment=tests"])
    first = RunTracker(cfg, run_dir)
    first.log_round(*_round(0, 0.5))
    first.close()
    again = RunTracker(cfg, run_dir, first_round=1)
    again.log_round(*_round(1, 0.6))
    again.finish({"final": {"clean_acc": 0.6}})
    (run_dir / "summary.json").write_text("{}")  # written after finish, before publish, as a run does
    again.publish()
    client = MlflowClient(tracking_uri=uri)
    run_id = json.loads((run_dir / "tracking.json").read_text())["mlflow_run_id"]
    history = client.get_metric_history(run_id, "round/clean_acc")
    assert [(m.step, m.value) for m in history] == [(1, 0.5), (2, 0.6)]
    run = client.get_run(run_id)
    assert run.data.params["federation.rounds"] == str(cfg.federation.rounds)
    assert {"rounds.csv", "summary.json"} <= {a.path for a in client.list_artifacts(run_id)}
    assert run.info.status == "FINISHED"
    # resumed against another MLflow than it began with: a new run there, not the old id
    elsewhere = f"file://{tmp_path}/elsewhere"
    moved = load_config("smoke", overrides=[f"tracking.mlflow_uri={elsewhere}"])
    RunTracker(moved, run_dir, first_round=2).log_round(*_round(2, 0.7))
    new_id = json.loads((run_dir / "tracking.json").read_text())["mlflow_run_id"]
    assert new_id != run_id and MlflowClient(tracking_uri=elsewhere).get_run(new_id).info.run_id == new_id


@pytest.mark.skipif(not HAS_MLFLOW, reason="MLflow is an opt-in, not installed here")
def test_an_unreachable_mlflow_is_one_warning_and_the_files_go_on(tmp_path, caplog):
    import socket

    with socket.socket() as sock:  # a loopback port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cfg = load_config("smoke", overrides=[f"tracking.mlflow_uri=http://127.0.0.1:{port}"])
    _one_round_session(cfg, tmp_path, caplog)
    assert len([r for r in caplog.records if "MLflow" in r.message]) == 1
    assert scalars(tmp_path / TENSORBOARD_DIR)["round/clean_acc"] == [(1, 0.5)]


def test_environment_record_names_what_decides_repetition(tmp_path):
    record = environment_record(device="cpu")
    assert record["torch"]["version"] and record["cpu"]["model"] and record["packages"]["ray"]
    assert record["device"] == "cpu" and record["python"]
    other = json.loads(json.dumps(record))
    other["cpu"]["model"] = "Another CPU"
    assert [d[0] for d in repeat_differences(other, record)] == ["cpu.model"]
    assert repeat_differences(record, json.loads(json.dumps(record, default=str))) == []
    write_environment(tmp_path, record)
    write_environment(tmp_path, other)  # a resumed session is appended, the first record kept
    saved = json.loads((tmp_path / ENVIRONMENT_FILE).read_text())
    assert saved["cpu"]["model"] == record["cpu"]["model"] and saved["resumed"][0]["cpu"]["model"] == "Another CPU"
    phase2 = tmp_path / "phase2-x"
    phase2.mkdir()
    (phase2 / "phase1_run.txt").write_text(str(tmp_path) + "\n")
    assert read_environment(phase2)["cpu"]["model"] == record["cpu"]["model"]


def test_heterogeneity_is_zero_for_iid_and_one_for_disjoint_clients():
    labels = np.repeat(np.arange(4), 10)
    iid = heterogeneity(labels, [np.arange(0, 40, 2), np.arange(1, 40, 2)], 4)
    assert iid["mean_hellinger"] == pytest.approx(0, abs=1e-7)
    assert iid["mean_jensen_shannon"] == pytest.approx(0, abs=1e-7)
    one_class = heterogeneity(labels, [np.arange(10), np.arange(10, 40)], 4)
    first = one_class["clients"][0]
    assert first["samples"] == 10 and first["classes_present"] == 1
    assert first["hellinger"] == pytest.approx(np.sqrt(1 - np.sqrt(0.25)))
    assert 0 < first["jensen_shannon"] < 1 and one_class["class_counts"][0] == [10, 0, 0, 0]
    from scipy.spatial.distance import jensenshannon  # the reference the numpy version must equal

    pool = np.full(4, 0.25)
    assert first["jensen_shannon"] == pytest.approx(jensenshannon([1, 0, 0, 0], pool, base=2), abs=1e-6)


def test_partition_command_shows_the_split_without_training(tmp_path, capsys):
    out = tmp_path / "split"
    assert main(["partition", "--preset", "smoke", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "hellinger" in printed and "class_9" in printed
    table = pd.read_csv(out / "partition.csv")
    assert len(table) == 4 and (table["train"] + table["test"] == table["samples"]).all()
    assert (out / "partition.png").stat().st_size > 0
    saved = json.loads((out / "partition.json").read_text())
    assert saved["heterogeneity"]["mean_hellinger"] == pytest.approx(table["hellinger"].mean(), abs=1e-6)
    assert main(["partition", "--preset", "smoke", "--out", str(out)]) == 2  # never rewrites a split


def test_robustbench_claims_and_why_they_are_not_comparable():
    assert eps_fraction(8 / 255) == "8/255" and eps_fraction(0.05) == "1/20"
    cfg = load_config("smoke")
    summary = {
        "final": {"clean_acc": 0.9, "autoattack_acc": 0.5, "autoattack_acc_samples": 64, "robust_acc": 0.6},
        "per_client": [
            {"client": 0, "clean_acc": 0.9, "autoattack_acc": 0.5, "num_autoattack": 16},
            {"client": 1, "clean_acc": 0.8, "autoattack_acc": 0.4, "num_autoattack": 16, "malicious": True},
        ],
    }
    record = robustbench_record(cfg, summary)
    assert record["comparable_to_robustbench"] is False
    assert record["client_mean"]["clean_acc"] == "90.00" and record["client_mean"]["eps"] == "1/20"
    assert [c["client"] for c in record["per_client"]] == [0]  # malicious clients' own models are left out
    assert any("no RobustBench leaderboard" in r for r in record["not_comparable_because"])
    one = load_config(
        "smoke",
        overrides=[
            "data.name=cifar10",
            "data.root=/nonexistent",
            "model.pretrained=none",
            f"attack.eps={8 / 255}",
            "attack.autoattack_steps=100",
        ],
        check_paths=False,
    )
    full = {"final": {"clean_acc": 0.9, "autoattack_acc": 0.5, "autoattack_acc_samples": 10_000}, "per_client": [{}]}
    assert not_comparable_reasons(one, full) == []
    assert Fraction(eps_fraction(one.attack.eps)) == Fraction(8, 255)
